"""rewardloop.ops against hand-computed values, plus invariance and equivalence tests."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rewardloop import ops

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual: torch.Tensor, expected: object, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64),
                               atol=tol, rtol=tol)


# --- log-probs and entropy --------------------------------------------------------------------


def test_selective_log_softmax_hand_values() -> None:
    # softmax([0, ln2, ln3]) = [1/6, 2/6, 3/6]; softmax([ln4, 0, 0]) = [4/6, 1/6, 1/6].
    logits = torch.tensor([[[0.0, LN2, LN3], [math.log(4.0), 0.0, 0.0]],
                           [[0.0, 0.0, 0.0], [LN2, LN2, 0.0]]])
    index = torch.tensor([[2, 0], [1, 2]])
    expected = [[math.log(1 / 2), math.log(2 / 3)], [math.log(1 / 3), math.log(1 / 5)]]
    close(ops.selective_log_softmax(logits, index), expected)
    close(ops.token_log_probs(logits, index), expected)


def test_token_log_probs_scales_by_temperature() -> None:
    # [0, 2 ln2] / 2 = [0, ln2] -> probs [1/3, 2/3].
    logits = torch.tensor([[[0.0, 2 * LN2]]])
    close(ops.token_log_probs(logits, torch.tensor([[1]]), temperature=2.0), [[math.log(2 / 3)]])
    with pytest.raises(ValueError):
        ops.token_log_probs(logits, torch.tensor([[1]]), temperature=0.0)


def test_selective_log_softmax_half_precision_is_float32_and_accurate() -> None:
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    index = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(1))
    out = ops.selective_log_softmax(logits.bfloat16(), index)
    assert out.dtype == torch.float32
    reference = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, index[..., None])
    close(out, reference.squeeze(-1), tol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_log_probs_gradient_matches_full_log_softmax(temperature: float) -> None:
    """The row-by-row computation must still backpropagate like the textbook formula."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 4), generator=g)
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((ops.token_log_probs(logits, labels, temperature)
                                   * weights).sum(), logits)
    textbook = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])
    (expected,) = torch.autograd.grad((textbook.squeeze(-1) * weights).sum(), logits)
    close(ours, expected, tol=1e-10)


def test_entropy_from_logits_hand_values() -> None:
    # Uniform over 4 -> ln 4; softmax([0, ln3, -inf, -inf]) = [1/4, 3/4, 0, 0].
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -math.inf, -math.inf]]])
    h_quarter = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(ops.entropy_from_logits(logits), [[math.log(4.0), h_quarter]])


def test_sequence_logps_sum_and_average() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    close(ops.sequence_logps(logps, mask), [-3.0, -11.0])
    close(ops.sequence_logps(logps, mask, average=True), [-1.5, -5.5])


# --- masks ---------------------------------------------------------------------------------------


def test_completion_mask_first_eos_padding_and_truncation() -> None:
    eos, pad = 2, 0
    ids = torch.tensor([[5, 2, 7, 2],    # EOS at 1: keep 0..1, ignore the later EOS
                        [5, 6, 7, 8],    # no EOS: cut at max length, all kept, flagged
                        [2, 0, 0, 0],    # EOS first
                        [5, 6, 0, 0]])   # no EOS but padded: pads are not completion
    mask, has_eos = ops.completion_mask(ids, eos, pad)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert has_eos.tolist() == [True, False, True, False]
    mask_no_pad, _ = ops.completion_mask(ids, eos)
    assert mask_no_pad[3].tolist() == [1, 1, 1, 1]


def test_completion_mask_refuses_pad_equal_to_eos() -> None:
    with pytest.raises(ValueError, match="pad_id == eos_id"):
        ops.completion_mask(torch.tensor([[1, 2]]), eos_id=2, pad_id=2)


def test_last_token_index_right_left_and_both_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right padding
                         [0, 0, 1, 1, 1],    # left padding
                         [0, 1, 1, 0, 0],    # both
                         [1, 1, 1, 1, 1],    # none
                         [0, 0, 0, 1, 0]])   # one token
    assert ops.last_token_index(mask).tolist() == [2, 4, 2, 4, 3]
    assert ops.last_token_index(mask.bool()).tolist() == [2, 4, 2, 4, 3]
    with pytest.raises(ValueError, match="no real token"):
        ops.last_token_index(torch.tensor([[1, 0], [0, 0]]))


# --- masked statistics ----------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])  # selects 1, 2, 4: mean 7/3, unbiased var 7/3


def test_masked_sum_mean_var_hand_values() -> None:
    close(ops.masked_sum(X, M), 7.0)
    close(ops.masked_sum(X, M, dim=-1), [3.0, 4.0])
    close(ops.masked_mean(X, M), 7 / 3)
    close(ops.masked_mean(X, M, dim=-1), [1.5, 4.0])
    close(ops.masked_mean(X, M, dim=0), [2.5, 2.0, 0.0])  # an empty column gives 0, not NaN
    close(ops.masked_var(X, M), 7 / 3)              # (16/9 + 1/9 + 25/9) / 2
    close(ops.masked_var(X, M, unbiased=False), 14 / 9)
    with pytest.raises(ValueError):
        ops.masked_var(X, torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_masked_whiten_hand_values_and_ignores_masked_entries() -> None:
    std = math.sqrt(7 / 3 + 1e-8)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    close(ops.masked_whiten(X, M), expected)
    junk = X.clone()
    junk[M == 0] = torch.tensor([1e6, -3e4, 17.0])
    close(ops.masked_whiten(junk, M), expected)
    unshifted = [[v + 7 / 3 if m else 0.0 for v, m in zip(row, mrow, strict=True)]
                 for row, mrow in zip(expected, M.tolist(), strict=True)]
    close(ops.masked_whiten(X, M, shift_mean=False), unshifted)
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(4, 9, generator=g) * 5 + 3, torch.randint(0, 2, (4, 9), generator=g)
    mask[0, :2] = 1
    whitened = ops.masked_whiten(x, mask)
    real = whitened[mask.bool()].double()
    close(real.mean(), 0.0, tol=1e-6)
    close(real.std(), 1.0, tol=1e-6)


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    close(ops.explained_variance(returns.clone(), returns, mask), 1.0)
    close(ops.explained_variance(torch.full_like(returns, 2.5), returns, mask), 0.0)
    # values = returns + [1, -1, 1, -1]: residual var 4/3, returns var 5/3 -> 1 - 4/5.
    values = returns + torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0]])
    close(ops.explained_variance(values, returns, mask), 0.2)


# --- KL estimators -----------------------------------------------------------------------------


def test_kl_estimators_hand_values() -> None:
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(ops.KL_ESTIMATORS["k1"](logp, ref), [LN2])
    close(ops.KL_ESTIMATORS["k2"](logp, ref), [0.5 * LN2**2])
    close(ops.KL_ESTIMATORS["k3"](logp, ref), [0.5 + LN2 - 1.0])  # q/p - 1 - log(q/p)
    assert set(ops.KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k3_and_k2_nonnegative_k1_can_be_negative() -> None:
    g = torch.Generator().manual_seed(0)
    logp, ref = -torch.rand(1000, generator=g) * 5, -torch.rand(1000, generator=g) * 5
    assert (ops.kl_k3(logp, ref) >= 0).all() and (ops.kl_k2(logp, ref) >= 0).all()
    assert (ops.kl_k1(logp, ref) < 0).any()


def test_k1_and_k3_unbiased_k2_biased_under_exact_expectation() -> None:
    # E_{x~p}[k(x)] computed exactly over a 3-way categorical, against KL(p||q) by hand.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = 0.5 * math.log(0.5 / 0.2) + 0.3 * 0.0 + 0.2 * math.log(0.2 / 0.5)
    close((p * ops.kl_k1(p.log(), q.log())).sum(), kl, tol=1e-12)
    close((p * ops.kl_k3(p.log(), q.log())).sum(), kl, tol=1e-12)
    assert abs(float((p * ops.kl_k2(p.log(), q.log())).sum()) - kl) > 1e-3


# --- GAE and returns ---------------------------------------------------------------------------


def gae_reference(rewards: list[list[float]], values: list[list[float]], mask: list[list[int]],
                  gamma: float, lam: float) -> tuple[list[list[float]], list[list[float]]]:
    """Plain-Python GAE, one row and one step at a time: the test oracle for ops.gae."""
    all_adv, all_ret = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask, strict=True):
        adv = [0.0] * len(r_row)
        following_adv, following_value = 0.0, 0.0
        for t in range(len(r_row) - 1, -1, -1):
            if not m_row[t]:
                following_adv, following_value = 0.0, 0.0
                continue
            delta = r_row[t] + gamma * following_value - v_row[t]
            adv[t] = delta + gamma * lam * following_adv
            following_adv, following_value = adv[t], v_row[t]
        all_adv.append(adv)
        all_ret.append([a + v if m else 0.0 for a, v, m in zip(adv, v_row, m_row, strict=True)])
    return all_adv, all_ret


def test_gae_hand_values() -> None:
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = ops.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.4, 0.3]])   # Monte Carlo: 1 - V_t
    close(ret, [[1.0, 1.0, 1.0]])
    # gamma 0.9, lam 0.5: d2 = .3, d1 = .9*.7 - .6 = .03, d0 = .9*.6 - .5 = .04; gl = .45.
    adv, _ = ops.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    close(adv, [[0.04 + 0.45 * (0.03 + 0.45 * 0.3), 0.03 + 0.45 * 0.3, 0.3]])


def test_gae_right_and_left_padding() -> None:
    # Completion (r=[0, 1], V=[.5, .7]); padding holds junk that must not leak in.
    rewards = torch.tensor([[0.0, 1.0, 5.0], [5.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.7, 9.0], [9.0, 0.5, 0.7]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    adv, ret = ops.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    a1, a0 = 0.3, 0.9 * 0.7 - 0.5 + 0.45 * 0.3
    close(adv, [[a0, a1, 0.0], [0.0, a0, a1]])
    close(ret, [[a0 + 0.5, a1 + 0.7, 0.0], [0.0, a0 + 0.5, a1 + 0.7]])


@pytest.mark.parametrize("seed", range(5))
def test_gae_equals_python_loop_on_random_masked_inputs(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 11
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    starts = torch.randint(0, t, (b,), generator=g) * (seed % 2)  # odd seeds: left/both padding
    pos = torch.arange(t)
    mask = ((pos >= starts[:, None]) & (pos < (starts + lengths)[:, None])).long()
    mask[:, 0] |= (mask.sum(-1) == 0).long()
    gamma, lam = 0.5 + 0.5 * torch.rand(1, generator=g).item(), torch.rand(1, generator=g).item()
    adv, ret = ops.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    close(adv, ref_adv, tol=1e-5)
    close(ret, ref_ret, tol=1e-5)


def test_discounted_returns_hand_values() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    close(ops.discounted_returns(rewards, mask, gamma=0.5), [[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]])


def test_kl_shaped_rewards_puts_score_on_last_real_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = ops.kl_shaped_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    close(out, [[-0.05, -0.1 + 1.0, 0.0], [0.0, -0.25, -0.3 + 2.0]])


def test_reinforce_pp_advantages_whitened_over_batch() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    adv, ret = ops.reinforce_pp_advantages(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    # Token rewards [[-.05, .9, 0], [0, -.25, 1.7]]; gamma 1 returns:
    close(ret, [[0.85, 0.9, 0.0], [0.0, 1.45, 1.7]])
    real = [0.85, 0.9, 1.45, 1.7]
    mean, std = statistics.mean(real), statistics.stdev(real)
    close(adv, [[(0.85 - mean) / std, (0.9 - mean) / std, 0.0],
                [0.0, (1.45 - mean) / std, (1.7 - mean) / std]], tol=1e-5)


# --- group advantages ---------------------------------------------------------------------------


def test_group_advantages_hand_values_and_zero_std_groups() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv, std = ops.group_advantages(rewards, group_size=3)
    close(adv, [-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0])
    close(std, [1.0, 0.0])
    adv, _ = ops.group_advantages(rewards, group_size=3, scale_by_std=False)
    close(adv, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv, std = ops.group_advantages(torch.full((8,), 0.7), group_size=4)
    assert (adv == 0).all() and (std == 0).all()


def test_group_methods_refuse_bad_group_sizes() -> None:
    for fn in (ops.group_advantages, ops.rloo_advantages):
        with pytest.raises(ValueError, match="group_size >= 2"):
            fn(torch.ones(4), 1)
        with pytest.raises(ValueError, match="divisible"):
            fn(torch.ones(5), 2)


def test_rloo_leave_one_out_baseline() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 8.0, 0.0])
    # 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; 4 - (8+0)/2, 8 - (4+0)/2, 0 - (4+8)/2.
    close(ops.rloo_advantages(rewards, 3), [-1.5, 0.0, 1.5, 0.0, 6.0, -6.0])
    # RLOO is the group-mean advantage scaled by G/(G-1).
    centred, _ = ops.group_advantages(rewards, 3, scale_by_std=False)
    close(ops.rloo_advantages(rewards, 3), centred * 3 / 2)


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_controller_clips_proportional_error() -> None:
    ctl = ops.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    assert ctl.update(current_kl=12.0, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 0.0256))
    ctl = ops.AdaptiveKLController(0.1, 6.0, 10000)
    assert ctl.update(3.0, 256) == pytest.approx(0.1 * (1 - 0.2 * 0.0256))     # -0.5 -> -0.2
    ctl = ops.AdaptiveKLController(0.1, 6.0, 10000)
    assert ctl.update(6.6, 1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))        # within the clip
    restored = ops.AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    assert restored.update(7.0, 10) == ctl.update(7.0, 10)
    with pytest.raises(ValueError):
        ops.AdaptiveKLController(0.1, 0.0, 10)


def test_fixed_kl_controller_same_interface() -> None:
    ctl = ops.FixedKLController(0.05)
    assert ctl.update(100.0, 256) == 0.05 and ctl.value == 0.05
    other = ops.FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --- aggregation ---------------------------------------------------------------------------


def test_aggregations_hand_values() -> None:
    assert set(ops.AGGREGATIONS) == {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                     "seq-mean-token-sum-norm"}
    close(ops.aggregate(X, M), 7 / 3)
    close(ops.aggregate(X, M, "token-mean", global_tokens=7), 1.0)
    close(ops.aggregate(X, M, "seq-mean-token-mean"), (1.5 + 4.0) / 2)
    close(ops.aggregate(X, M, "seq-mean-token-sum"), (3.0 + 4.0) / 2)
    close(ops.aggregate(X, M, "seq-mean-token-sum", global_seqs=7), 1.0)
    close(ops.aggregate(X, M, "seq-mean-token-sum-norm", norm_length=4), (3.0 + 4.0) / 2 / 4)
    with pytest.raises(ValueError, match="norm_length"):
        ops.aggregate(X, M, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="unknown aggregation"):
        ops.aggregate(X, M, "sum")


def test_sequence_means_count_only_rows_in_the_loss() -> None:
    """A row without a trained token (an answer cut under --mask-truncated) is no sequence of
    the loss: counting it shrank the step with the truncation rate (audit s14, math L2)."""
    x = torch.cat([X, torch.full((2, X.shape[1]), 9.0)])
    m = torch.cat([M, torch.zeros(2, M.shape[1], dtype=M.dtype)])
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        close(ops.aggregate(x, m, mode), ops.aggregate(X, M, mode))
    close(ops.aggregate(x[2:], m[2:], "seq-mean-token-mean"), 0.0)  # nothing in the loss


def test_grpo_minibatches_count_the_sequences_in_the_loss() -> None:
    from types import SimpleNamespace

    from rewardloop.train.grpo import minibatches

    cfg = SimpleNamespace(mini_batch_size=4, micro_batch_size=2,
                          loss_aggregation="seq-mean-token-mean", max_new_tokens=3)
    rt = SimpleNamespace(world_size=1, sum_floats=lambda *v: v)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    (mb,) = minibatches(cfg, rt, mask, torch.arange(4))
    assert mb.common["global_seqs"] == 2.0 and mb.common["global_tokens"] == 3.0
    (mb,) = minibatches(cfg, rt, torch.zeros_like(mask), torch.arange(4))
    assert mb.common["global_seqs"] == 1.0 and mb.common["global_tokens"] == 1.0


@pytest.mark.parametrize("mode", sorted(ops.AGGREGATIONS))
def test_aggregation_is_gradient_accumulation_invariant(mode: str) -> None:
    """Batch of 8 == 8 micro-batches of 1 normalised by the global counts: value and gradient."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(8, 7, generator=g)
    mask = (torch.arange(7) < torch.randint(1, 8, (8, 1), generator=g)).long()
    counts = {"global_tokens": int(mask.sum()), "global_seqs": 8, "norm_length": 7}

    weight_full = torch.tensor(0.3, requires_grad=True)
    full = ops.aggregate(torch.sin(weight_full * features) ** 2, mask, mode, **counts)
    full.backward()

    weight_acc = torch.tensor(0.3, requires_grad=True)
    total = torch.zeros(())
    for i in range(8):
        micro = ops.aggregate(torch.sin(weight_acc * features[i : i + 1]) ** 2, mask[i : i + 1],
                              mode, **counts)
        micro.backward()
        total = total + micro.detach()
    own_counts = {"norm_length": 7}  # the batch's own counts equal the global ones here
    close(ops.aggregate(torch.sin(0.3 * features) ** 2, mask, mode, **own_counts), full.detach())
    close(total, full.detach())
    close(weight_acc.grad, weight_full.grad)


def test_token_mean_without_global_count_is_not_accumulation_invariant() -> None:
    """Why the global count matters: per-micro-batch token means weigh short rows up."""
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    full = ops.aggregate(loss, mask)                                   # 7 / 4
    naive = sum(ops.aggregate(loss[i : i + 1], mask[i : i + 1]) for i in range(2)) / 2  # 2.5
    close(full, 1.75)
    close(naive, 2.5)


def test_selective_log_softmax_chunking_does_not_change_results(monkeypatch) -> None:
    torch.manual_seed(0)
    logits, index = torch.randn(5, 3, 11), torch.randint(0, 11, (5, 3))
    whole = ops.selective_log_softmax(logits, index)
    monkeypatch.setattr(ops, "_LOGSUMEXP_CHUNK_ELEMENTS", 40)  # 1 row of 3 x 11 per chunk
    assert torch.allclose(ops.selective_log_softmax(logits, index), whole, atol=1e-6)
    assert torch.allclose(whole, torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0],
                          atol=1e-6)
