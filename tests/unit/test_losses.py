"""rewardloop.losses and rewardloop.pg_losses against hand-computed values and properties."""

from __future__ import annotations

import math

import pytest
import torch

from rewardloop import losses as L
from rewardloop import pg_losses as P

LN2, LN3 = math.log(2.0), math.log(3.0)


def softplus(x: float) -> float:
    """-log σ(-x) = log(1 + e^x), written out so tests do not reuse the code under test."""
    return math.log1p(math.exp(x))


def close(actual: torch.Tensor, expected: object, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64),
                               atol=tol, rtol=tol)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- Bradley–Terry ---------------------------------------------------------------------------


def test_bradley_terry_hand_values_and_metrics() -> None:
    # Δ = [2, -1]: -log σ(2) = log(1 + e^-2), -log σ(-1) = log(1 + e^1).
    loss, metrics = L.bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0))
    close(loss, (softplus(-2.0) + softplus(1.0)) / 2)
    close(metrics["accuracy"], 0.5)
    close(metrics["margin"], 0.5)
    close(metrics["rewards/chosen"], 1.0)
    assert not metrics["accuracy"].requires_grad


def test_bradley_terry_margin_and_label_smoothing() -> None:
    loss, _ = L.bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0), margin=t(1.0, 0.0))
    close(loss, (softplus(-1.0) + softplus(1.0)) / 2)
    loss, _ = L.bradley_terry_loss(t(2.0), t(0.0), label_smoothing=0.1)
    close(loss, 0.9 * softplus(-2.0) + 0.1 * softplus(2.0))


def test_bradley_terry_tie_is_symmetric_target_pulling_delta_to_zero() -> None:
    tie = torch.tensor([False, True])
    loss, metrics = L.bradley_terry_loss(t(2.0, 0.0), t(0.0, 1.0), margin=t(0.0, 5.0), tie=tie)
    # The tie ignores its margin: ½ log(1 + e^1) + ½ log(1 + e^-1).
    close(loss, (softplus(-2.0) + 0.5 * softplus(1.0) + 0.5 * softplus(-1.0)) / 2)
    close(metrics["accuracy"], 1.0)  # only the non-tie pair is scored
    # d/dΔ of the tie loss is σ(Δ) - ½: zero exactly at Δ = 0, restoring otherwise.
    for d, sign in ((0.0, 0), (1.5, 1), (-1.5, -1)):
        chosen = torch.tensor([d], requires_grad=True)
        L.bradley_terry_loss(chosen, torch.zeros(1), tie=torch.tensor([True]))[0].backward()
        close(chosen.grad, [1 / (1 + math.exp(-d)) - 0.5])
        assert torch.sign(chosen.grad).item() == sign


def test_bradley_terry_global_count_makes_micro_batches_sum_to_the_batch() -> None:
    rc, rr = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    full, _ = L.bradley_terry_loss(rc, rr)
    parts = sum(L.bradley_terry_loss(rc[i : i + 2], rr[i : i + 2], global_count=6)[0]
                for i in range(0, 6, 2))
    close(parts, full)


# --- Plackett–Luce ---------------------------------------------------------------------------

S3 = torch.tensor([[0.0, LN2, LN3]], dtype=torch.float64)  # exp: 1, 2, 3 (sum 6)


def test_plackett_luce_three_way_hand_value() -> None:
    # Order 2 > 1 > 0: P = 3/6 * 2/3 = 1/3.
    loss, metrics = L.plackett_luce_loss(S3, torch.tensor([[2, 1, 0]]))
    close(loss, LN3)
    close(metrics["accuracy"], 1.0)
    loss, metrics = L.plackett_luce_loss(S3, torch.tensor([[0, 1, 2]]))  # 0 > 1 > 2: 1/6 * 2/5
    close(loss, -math.log(1 / 6 * 2 / 5))
    close(metrics["accuracy"], 0.0)


def test_plackett_luce_ties_and_absent_items_hand_values() -> None:
    # {1, 2} tied best over 0: -½(log 2/6 + log 3/6); the last item adds 0.
    loss, _ = L.plackett_luce_loss(S3, torch.tensor([[1, 0, 0]]))
    close(loss, -0.5 * (math.log(2 / 6) + math.log(3 / 6)))
    # 2 best, {0, 1} tied last: -log 3/6 - ½(log 1/3 + log 2/3).
    loss, _ = L.plackett_luce_loss(S3, torch.tensor([[1, 1, 0]]))
    close(loss, -math.log(3 / 6) - 0.5 * (math.log(1 / 3) + math.log(2 / 3)))
    # Item 0 absent (-1): 2 > 1 among {1, 2}: -log 3/5, whatever item 0 scores.
    for junk in (0.0, 100.0):
        scores = S3.clone()
        scores[0, 0] = junk
        close(L.plackett_luce_loss(scores, torch.tensor([[-1, 1, 0]]))[0], -math.log(3 / 5))


def test_plackett_luce_equals_bradley_terry_for_two_items() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(10, 2, generator=g, dtype=torch.float64)
    bt, _ = L.bradley_terry_loss(scores[:, 0], scores[:, 1])
    close(L.plackett_luce_loss(scores, torch.tensor([[0, 1]] * 10))[0], bt, tol=1e-12)
    close(L.plackett_luce_loss(scores, torch.tensor([[0, 7]] * 10))[0], bt, tol=1e-12)
    tie = torch.ones(10, dtype=torch.bool)
    bt_tie, _ = L.bradley_terry_loss(scores[:, 0], scores[:, 1], tie=tie)
    close(L.plackett_luce_loss(scores, torch.tensor([[0, 0]] * 10))[0], bt_tie, tol=1e-12)


def test_plackett_luce_mixed_lengths_in_one_batch() -> None:
    scores = torch.cat([S3, torch.tensor([[1.0, 0.0, 42.0]], dtype=torch.float64)])
    loss, _ = L.plackett_luce_loss(scores, torch.tensor([[2, 1, 0], [0, 1, -1]]))
    close(loss, (LN3 + softplus(-1.0)) / 2)


def test_ranking_accuracy_with_ties() -> None:
    close(L.ranking_accuracy(S3, torch.tensor([[1, 0, 0]])), 1.0)   # pairs (1,0), (2,0)
    close(L.ranking_accuracy(S3, torch.tensor([[0, 0, 1]])), 0.0)   # pairs (0,2), (1,2)
    # Equal scores of a strictly ordered pair earn half: (0,1) tied 0.5, (0,2) and (1,2) right;
    # the absent fourth answer (-1) makes no pair.
    scores = torch.tensor([[1.0, 1.0, 0.0, 5.0]], dtype=torch.float64)
    close(L.ranking_accuracy(scores, torch.tensor([[0, 1, 2, -1]])), 2.5 / 3)


def test_reward_centering_loss() -> None:
    close(L.reward_centering_loss(t(1.0, -2.0, 3.0), coef=0.01), 0.01 * 14 / 3)
    # Pairwise form (Eisenstein et al.): (1 - 2)² and (3 + 1)².
    close(L.reward_centering_loss(torch.tensor([[1.0, -2.0], [3.0, 1.0]]), coef=0.01), 0.085)


def test_preference_accuracy() -> None:
    # right (1 > 0), equal scores (2 = 2: half credit, as the label ceiling's even split), wrong
    close(L.preference_accuracy(t(1.0, 2.0, 3.0), t(0.0, 2.0, 4.0)), (1 + 0.5 + 0) / 3)
    close(L.preference_accuracy(t(1.0, 2.0, 3.0), t(0.0, 2.0, 4.0),
                                tie=torch.tensor([False, True, True])), 1.0)


# --- DPO family --------------------------------------------------------------------------------
# policy chosen/rejected -3/-5, reference -4/-4, β = 0.1: h = 1 - (-1) = 2, βh = 0.2.
PAIR = (t(-3.0), t(-5.0), t(-4.0), t(-4.0))


def test_dpo_hand_value_and_metrics() -> None:
    loss, m = L.dpo_loss(*PAIR, beta=0.1)
    close(loss, softplus(-0.2))
    close(m["rewards/chosen"], 0.1)
    close(m["rewards/rejected"], -0.1)
    close(m["rewards/margins"], 0.2)
    close(m["rewards/accuracies"], 1.0)
    close(m["logps/chosen"], -3.0)
    close(m["logps/rejected"], -5.0)


def test_cdpo_hand_value_and_stationary_point() -> None:
    loss, _ = L.cdpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    close(loss, 0.9 * softplus(-0.2) + 0.1 * softplus(0.2))
    close(L.PREFERENCE_LOSSES["dpo"](*PAIR, beta=0.1, label_smoothing=0.1)[0], loss)
    # It stops pushing where σ(βh) = 1 - ε, i.e. βh = log(0.9 / 0.1).
    chosen = torch.tensor([math.log(9.0) / 0.1], dtype=torch.float64, requires_grad=True)
    L.cdpo_loss(chosen, t(0.0), t(0.0), t(0.0), beta=0.1, label_smoothing=0.1)[0].backward()
    close(chosen.grad, [0.0], tol=1e-9)
    with pytest.raises(ValueError):
        L.cdpo_loss(*PAIR, label_smoothing=0.0)


def test_ipo_hand_value() -> None:
    loss, _ = L.ipo_loss(*PAIR, beta=0.1)
    close(loss, (2.0 - 5.0) ** 2)  # (h - 1/(2β))²
    with pytest.raises(ValueError):
        L.ipo_loss(*PAIR, beta=0.1, label_smoothing=0.1)


def test_robust_dpo_hand_value_and_unbiasedness() -> None:
    eps = 0.1
    loss, _ = L.robust_dpo_loss(*PAIR, beta=0.1, label_smoothing=eps)
    close(loss, (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / 0.8)
    # Expected over a flip with probability ε, it is the clean DPO loss (Chowdhury et al., Lemma).
    pc, pr, rc, rr = PAIR
    flipped, _ = L.robust_dpo_loss(pr, pc, rr, rc, beta=0.1, label_smoothing=eps)
    close((1 - eps) * loss + eps * flipped, softplus(-0.2))
    close(L.robust_dpo_loss(*PAIR, beta=0.1, label_smoothing=0.0)[0], L.dpo_loss(*PAIR)[0])
    with pytest.raises(ValueError):
        L.robust_dpo_loss(*PAIR, label_smoothing=0.5)


def test_simpo_hand_values() -> None:
    # Mean log-probs: pair 1 (-1, -2), pair 2 (-1.5, -1); β = 2, γ = 0.5 -> z = 1.5 and -1.5.
    chosen, rejected = t(-1.0, -1.5), t(-2.0, -1.0)
    loss, m = L.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    close(loss, (softplus(-1.5) + softplus(1.5)) / 2)  # -log σ(z) = softplus(-z)
    close(m["rewards/chosen"], 2.0 * -1.25)  # β ȳ, no reference
    close(m["rewards/margins"], 2.0 * (1.0 - 0.5) / 2)
    close(m["rewards/accuracies"], 0.5)
    # Label smoothing ε: -(1-ε) log σ(z) - ε log σ(-z), on pair 1 alone.
    smoothed, _ = L.simpo_loss(chosen[:1], rejected[:1], beta=2.0, gamma=0.5,
                               label_smoothing=0.1)
    close(smoothed, 0.9 * softplus(-1.5) + 0.1 * softplus(1.5))
    # γ is a margin: at β(ȳ_c - ȳ_r) = γ it still pushes with half the full force.
    c = t(-1.0).requires_grad_(True)
    L.simpo_loss(c, t(-1.25), beta=2.0, gamma=0.5)[0].backward()  # z = 0: d/dȳ_c = -β σ(-z)
    close(c.grad, [-1.0])


def test_orpo_odds_ratio_hand_value() -> None:
    # ȳ_c = -0.5, ȳ_r = -1: log odds = ȳ - log(1 - e^ȳ), written out with math.
    def log_odds(y: float) -> float:
        return y - math.log(1.0 - math.exp(y))

    d = log_odds(-0.5) - log_odds(-1.0)
    loss, m = L.orpo_odds_ratio_loss(t(-0.5), t(-1.0), beta=0.25)
    close(loss, 0.25 * softplus(-d))  # -λ log σ(d)
    close(m["log_odds_ratio"], d)
    close(m["rewards/chosen"], 0.25 * -0.5)


def test_log1mexp_is_stable_at_both_ends() -> None:
    x = torch.tensor([-1e-12, -1e-6, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64,
                     requires_grad=True)
    y = L.log1mexp(x)
    expected = [math.log(-math.expm1(min(v, -1e-6))) for v in x.tolist()]
    close(y, expected, tol=1e-9)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()  # a certain answer (ȳ = 0) must not give NaN gradients
    assert torch.isfinite(L.orpo_odds_ratio_loss(t(0.0), t(-1.0))[0])


def test_preference_loss_registry() -> None:
    assert L.PREFERENCE_LOSSES == {"dpo": L.dpo_loss, "cdpo": L.cdpo_loss, "ipo": L.ipo_loss,
                                   "robust": L.robust_dpo_loss}


def test_dpo_global_count_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    logps = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4)]
    full, _ = L.dpo_loss(*logps)
    parts = sum(L.dpo_loss(*(x[i : i + 1] for x in logps), global_count=4)[0] for i in range(4))
    close(parts, full)


# --- KTO and NLL -------------------------------------------------------------------------------


def test_kto_hand_values() -> None:
    # r = [0.5, -1]; desirable: 1 - σ(0.5 - 0.2); undesirable: 2 (1 - σ(0.2 + 1)).
    loss, m = L.kto_loss(t(-1.0, -2.0), t(-1.5, -1.0), torch.tensor([True, False]),
                         kl_ref_point=torch.tensor(0.2), beta=1.0, undesirable_weight=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    close(loss, ((1 - sigmoid(0.3)) + 2 * (1 - sigmoid(1.2))) / 2)
    close(m["rewards/chosen"], 0.5)
    close(m["rewards/rejected"], -1.0)
    close(m["rewards/margins"], 1.5)
    close(m["kl"], 0.2)
    # A negative reference point is clamped to 0.
    loss, _ = L.kto_loss(t(-1.0), t(-1.5), torch.tensor([True]), kl_ref_point=-3.0, beta=1.0)
    close(loss, 1 - sigmoid(0.5))


def test_kto_kl_ref_point_is_detached_mean_clamped() -> None:
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = L.kto_kl_ref_point(policy, torch.tensor([-2.0, -2.0]))
    close(z0, 0.5)
    assert not z0.requires_grad
    close(L.kto_kl_ref_point(policy, torch.tensor([0.0, 0.0])), 0.0)


def test_nll_loss_token_mean() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(L.nll_loss(logps, mask)[0], 7 / 3)
    close(L.nll_loss(logps, mask, global_tokens=14)[0], 0.5)


# --- PPO, value, entropy, KL penalty -----------------------------------------------------------
# Ratios 1.5, 0.5, 1.1 (+ a masked token) with advantages 1, -1, 1 and ε = 0.2:
# max(-1.5, -1.2) = -1.2 (clipped), max(0.5, 0.8) = 0.8 (clipped), -1.1 (not clipped).
RATIOS = [1.5, 0.5, 1.1, 7.0]
ADV = torch.tensor([[1.0, -1.0, 1.0, 5.0]])
PPO_MASK = torch.tensor([[1, 1, 1, 0]])


def test_ppo_clip_hand_values_and_gradient() -> None:
    logp = torch.tensor([[math.log(r) for r in RATIOS]], requires_grad=True)
    old = torch.zeros(1, 4)
    loss, m = P.ppo_clip_loss(logp, old, ADV, PPO_MASK, clip_eps=0.2)
    close(loss, (-1.2 + 0.8 - 1.1) / 3)
    close(m["clip_frac"], 2 / 3)
    close(m["dual_clip_frac"], 0.0)
    close(m["ratio"], (1.5 + 0.5 + 1.1) / 3)
    k3 = [r - 1 - math.log(r) for r in RATIOS[:3]]
    close(m["approx_kl"], sum(k3) / 3)
    loss.backward()
    # Clipped tokens and padding get no gradient; d(-A ρ)/dlogp = -A ρ.
    close(logp.grad, [[0.0, 0.0, -1.1 / 3, 0.0]])


def test_ppo_clip_higher_and_dual_clip() -> None:
    logp = torch.tensor([[math.log(r) for r in RATIOS]])
    loss, _ = P.ppo_clip_loss(logp, torch.zeros(1, 4), ADV, PPO_MASK, 0.2, clip_eps_high=0.28)
    close(loss, (-1.28 + 0.8 - 1.1) / 3)
    # Negative advantage with ratio 5: max(5, 0.8) = 5, bounded by -c·A = 3.
    logp = torch.tensor([[math.log(5.0), math.log(0.5)]])
    adv, mask = torch.tensor([[-1.0, -1.0]]), torch.ones(1, 2)
    loss, m = P.ppo_clip_loss(logp, torch.zeros(1, 2), adv, mask, 0.2, dual_clip=3.0)
    close(loss, (3.0 + 0.8) / 2)
    close(m["dual_clip_frac"], 0.5)
    close(P.ppo_clip_loss(logp, torch.zeros(1, 2), adv, mask, 0.2)[0], (5.0 + 0.8) / 2)
    with pytest.raises(ValueError):
        P.ppo_clip_loss(logp, torch.zeros(1, 2), adv, mask, 0.2, dual_clip=1.0)


def test_ppo_sequence_advantages_broadcast_and_aggregation_mode() -> None:
    g = torch.Generator().manual_seed(2)
    logp, old = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    adv, mask = torch.randn(3, generator=g), torch.ones(3, 5)
    per_seq, _ = P.ppo_clip_loss(logp, old, adv, mask, mode="seq-mean-token-sum-norm",
                                 norm_length=10)
    per_tok, _ = P.ppo_clip_loss(logp, old, adv[:, None].expand(3, 5), mask,
                                 mode="seq-mean-token-sum-norm", norm_length=10)
    close(per_seq, per_tok)
    # Full rows: token-mean = seq-mean-token-sum / 5, and norm with L = 10 is half of that.
    token_mean, _ = P.ppo_clip_loss(logp, old, adv, mask)
    close(per_seq, token_mean * 5 / 10)


def test_value_loss_clipped_hand_values() -> None:
    # tok0: (1-2)² = 1 vs clip 0.5+0.2 = 0.7 -> (0.7-2)² = 1.69; tok1: 1 vs 1; tok2 masked.
    values, old = torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[0.5, 2.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1, 1, 0]])
    loss, m = P.value_loss(values, old, returns, mask, clip_eps=0.2)
    close(loss, 0.5 * (1.69 + 1.0) / 2)
    close(m["vf_clip_frac"], 0.5)
    close(m["vf_mse"], 1.0)
    close(m["values"], 1.5)
    close(P.value_loss(values, old, returns, mask, clip_eps=None)[0], 0.5)


def test_entropy_bonus() -> None:
    entropy, mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1, 1], [1, 0]])
    loss, m = P.entropy_bonus(entropy, mask, coef=0.01)
    close(loss, -0.02)
    close(m["entropy"], 2.0)


def test_kl_penalty_loss_estimators() -> None:
    logp = torch.tensor([[math.log(0.5), 0.0]])
    ref, mask = torch.tensor([[math.log(0.25), -9.0]]), torch.tensor([[1, 0]])
    loss, m = P.kl_penalty_loss(logp, ref, mask, coef=0.1)
    close(loss, 0.1 * (LN2 - 0.5))
    close(m["kl_k1"], LN2)
    close(m["kl_k3"], LN2 - 0.5)
    close(P.kl_penalty_loss(logp, ref, mask, 0.1, "k1")[0], 0.1 * LN2)
    close(P.kl_penalty_loss(logp, ref, mask, 0.1, "k2")[0], 0.1 * 0.5 * LN2**2)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        P.kl_penalty_loss(logp, ref, mask, 0.1, "k4")
