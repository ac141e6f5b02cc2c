"""Our preference losses equal TRL's on the same log-probs, to 1e-6.

TRL 1.16 computes its losses inline in ``_compute_loss(model, inputs, return_outputs)`` (DPO,
KTO) and ``compute_loss(model, inputs)`` (reward model), after a model forward. We call those
very methods on trainers built with ``object.__new__`` and only the attributes the methods read,
passing a stand-in model whose forward returns the per-token log-probs we chose (the fields of
TRL's ``FusedCausalLMOutput``) and reference log-probs as TRL's precomputed columns. So the
numbers below come from TRL's own code, not from a copy of its formulas.

TRL 1.16's DPO "sigmoid" loss ignores ``label_smoothing``; conservative DPO's formula
-(1-ε) log σ(βh) - ε log σ(-βh) is its "aot" loss on a batch of one pair (sorting one element
is the identity), so cDPO is checked pair by pair through "aot".

GRPO is compared on value AND gradient with respect to the per-token log-probs (the parameter
gradient is that times the same Jacobian on both sides). TRL's ``use_bias_correction_kl``
(default True) multiplies the k3 term by the differentiable ratio π/π_old: the value is
unchanged on-policy but the KL gradient becomes (log π - log π_ref)·∇log π (unbiased reverse
KL) instead of k3's own (1 - π_ref/π)·∇log π, which ours uses; with it off the two agree.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rewardloop import losses as L
from rewardloop import ops, pg_losses

pytestmark = pytest.mark.parity

trl = pytest.importorskip("trl", reason="TRL parity tests need TRL: pip install -e '.[bench]'")
if tuple(int(p) for p in trl.__version__.split(".")[:2]) < (1, 16):
    pytest.skip(f"parity tests drive TRL >= 1.16 internals; found TRL {trl.__version__}",
                allow_module_level=True)

from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402

TOL = {"atol": 1e-6, "rtol": 1e-6}
DT = torch.float64


class _Accelerator:
    """Single-process stand-in: gathering is the identity."""

    device = torch.device("cpu")
    num_processes = 1
    is_main_process = True

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x

    @staticmethod
    def autocast() -> nullcontext:
        return nullcontext()


class _StandInLM:
    """A 'model' whose forward returns fixed per-token log-probs, chosen by ``input_ids[0, 0]``."""

    training = True

    def __init__(self, log_probs_by_key: dict[int, torch.Tensor]) -> None:
        self.log_probs_by_key = log_probs_by_key

    def __call__(self, **kwargs: Any) -> SimpleNamespace:
        log_probs = self.log_probs_by_key[int(kwargs["input_ids"][0, 0])]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool())


def _trainer(cls: type, **attributes: Any) -> Any:
    trainer = object.__new__(cls)
    common = {"accelerator": _Accelerator(), "aux_loss_enabled": False, "_tp_size": 1,
              "_total_train_tokens": 0, "_metrics": defaultdict(lambda: defaultdict(list))}
    for name, value in {**common, **attributes}.items():
        setattr(trainer, name, value)
    return trainer


def _completions(n: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (n, width) of right-padded completions and their mask (n, width)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    logps = -torch.rand(n, width, generator=g, dtype=DT) * 3 * mask
    return logps, mask


def _pairs(n: int = 6, width: int = 5) -> dict[str, torch.Tensor]:
    policy, mask = _completions(2 * n, width, seed=0)  # rows: n chosen, then n rejected
    ref = -torch.rand(2 * n, width, generator=torch.Generator().manual_seed(1), dtype=DT) * 3
    return {"policy": policy, "ref": ref * mask, "mask": mask}


def _trl_dpo(batch: dict[str, torch.Tensor], loss_type: str, beta: float, eps: float
             ) -> tuple[torch.Tensor, dict[str, float]]:
    policy, ref, mask = batch["policy"], batch["ref"], batch["mask"]
    n_rows, width = policy.shape
    trainer = _trainer(DPOTrainer, model=_StandInLM({1: policy}), ld_alpha=None,
                       precompute_ref_logps=True, f_divergence_type="reverse_kl",
                       loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                       label_smoothing=eps, use_weighting=False)
    # TRL shifts by one: position 0 is the prompt token, completion tokens follow.
    completion_mask = torch.cat([torch.zeros(n_rows, 1, dtype=torch.long), mask], dim=1)
    ref_chosen, ref_rejected = ref.sum(-1).chunk(2)
    inputs = {"input_ids": torch.ones(n_rows, width + 1, dtype=torch.long),
              "attention_mask": torch.ones(n_rows, width + 1, dtype=torch.long),
              "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def _ours(batch: dict[str, torch.Tensor], name: str, beta: float, eps: float,
          average: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    policy = ops.sequence_logps(batch["policy"], batch["mask"], average=average).chunk(2)
    ref = ops.sequence_logps(batch["ref"], batch["mask"], average=average).chunk(2)
    return L.PREFERENCE_LOSSES[name](policy[0], policy[1], ref[0], ref[1], beta=beta,
                                     label_smoothing=eps)


@pytest.mark.parametrize(("ours", "theirs", "beta", "eps"), [
    ("dpo", "sigmoid", 0.1, 0.0),
    ("dpo", "sigmoid", 0.5, 0.0),
    ("robust", "robust", 0.1, 0.1),
    ("robust", "robust", 0.3, 0.25),
])
def test_dpo_family_matches_trl(ours: str, theirs: str, beta: float, eps: float) -> None:
    batch = _pairs()
    loss, metrics = _ours(batch, ours, beta, eps)
    trl_loss, trl_metrics = _trl_dpo(batch, theirs, beta, eps)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], abs=1e-6), key


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_matches_trl_with_length_normalised_logps(beta: float) -> None:
    batch = _pairs()
    loss, _ = _ours(batch, "ipo", beta, 0.0, average=True)
    torch.testing.assert_close(loss, _trl_dpo(batch, "ipo", beta, 0.0)[0], **TOL)


@pytest.mark.parametrize(("beta", "eps"), [(0.1, 0.1), (0.5, 0.3)])
def test_cdpo_matches_trl_label_smoothed_sigmoid(beta: float, eps: float) -> None:
    batch = _pairs()
    loss, _ = _ours(batch, "cdpo", beta, eps)
    n = batch["policy"].shape[0] // 2
    per_pair = []
    for i in range(n):
        rows = [i, n + i]
        one = {k: v[rows] for k, v in batch.items()}
        per_pair.append(_trl_dpo(one, "aot", beta, eps)[0])
    torch.testing.assert_close(loss, torch.stack(per_pair).mean(), **TOL)


def _trl_kto(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             kl_policy: torch.Tensor, kl_ref: torch.Tensor, weights: tuple[float, float],
             beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    n_rows, width = policy.shape
    trainer = _trainer(KTOTrainer, model=_StandInLM({1: policy, 2: kl_policy}),
                       calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=beta,
                       desirable_weight=weights[0], undesirable_weight=weights[1])
    completion_mask = torch.cat([torch.zeros(n_rows, 1, dtype=torch.long), mask], dim=1)
    ones = torch.ones(n_rows, width + 1, dtype=torch.long)
    batch = {"input_ids": ones, "attention_mask": ones, "completion_mask": completion_mask,
             "KL_input_ids": 2 * ones, "KL_attention_mask": ones,
             "KL_completion_mask": completion_mask, "label": labels,
             "ref_logps": ref.sum(-1), "ref_KL_logps": kl_ref.sum(-1)}
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(("beta", "weights", "kl_shift"), [
    (0.1, (1.0, 1.0), 0.5),     # z0 > 0
    (0.5, (1.0, 1.33), -0.5),   # z0 clamped to 0
    (2.0, (0.7, 1.0), 0.2),
])
def test_kto_matches_trl(beta: float, weights: tuple[float, float], kl_shift: float) -> None:
    policy, mask = _completions(8, 5, seed=2)
    ref = -torch.rand(8, 5, generator=torch.Generator().manual_seed(3), dtype=DT) * 3 * mask
    kl_policy = policy.roll(1, dims=0)  # mismatched completions: another row's answer
    kl_ref = kl_policy.clone()
    kl_ref[:, 0] -= kl_shift  # every row's log-ratio is kl_shift, so z0 = max(kl_shift, 0)
    labels = torch.tensor([True, False, True, True, False, True, False, False])
    z0 = L.kto_kl_ref_point(kl_policy.sum(-1), kl_ref.sum(-1))
    loss, metrics = L.kto_loss(policy.sum(-1), ref.sum(-1), labels, z0, beta=beta,
                               desirable_weight=weights[0], undesirable_weight=weights[1])
    trl_loss, trl_metrics = _trl_kto(policy, ref, mask, labels, kl_policy, kl_ref, weights, beta)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    assert float(z0) == pytest.approx(max(kl_shift, 0.0), abs=1e-9)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert float(metrics[key]) == pytest.approx(trl_metrics[key], abs=1e-6), key


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (True, 0.01)])
def test_bradley_terry_matches_trl_reward_loss(with_margin: bool, center: float | None) -> None:
    g = torch.Generator().manual_seed(4)
    r_chosen, r_rejected = torch.randn(6, generator=g, dtype=DT), torch.randn(6, generator=g,
                                                                             dtype=DT)
    margin = torch.rand(6, generator=g, dtype=DT) if with_margin else None

    class RewardModel:
        training = True

        def __call__(self, **kwargs: Any) -> SimpleNamespace:
            return SimpleNamespace(logits=torch.cat([r_chosen, r_rejected])[:, None])

    trainer = _trainer(RewardTrainer, model=RewardModel(),
                       args=SimpleNamespace(center_rewards_coefficient=center))
    inputs: dict[str, Any] = {"attention_mask": torch.ones(12, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    trl_loss = trainer.compute_loss(trainer.model, inputs)

    loss, metrics = L.bradley_terry_loss(r_chosen, r_rejected, margin=margin)
    if center is not None:
        loss = loss + L.reward_centering_loss(torch.stack([r_chosen, r_rejected], dim=-1), center)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    trl_metrics = trainer._metrics["train"]
    assert float(metrics["accuracy"]) == pytest.approx(trl_metrics["accuracy"][-1], abs=1e-6)
    assert float(metrics["margin"]) == pytest.approx(trl_metrics["margin"][-1], abs=1e-6)


def _trl_grpo(logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, beta: float, bias_correction: bool) -> torch.Tensor:
    """TRL's GRPO "dapo" loss on one optimizer step (no accumulation), on-policy."""
    n_rows, width = logps.shape
    args = SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None,
                           steps_per_generation=1)
    # The stand-in returns (B, 1 + C) log-probs; TRL keeps the last C (the completion).
    model = _StandInLM({1: torch.cat([logps.new_zeros(n_rows, 1), logps], dim=1)})
    trainer = _trainer(GRPOTrainer, model=model, args=args, beta=beta, loss_type="dapo",
                       epsilon_low=0.2, epsilon_high=0.2, importance_sampling_level="token",
                       top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                       use_vllm=False, current_gradient_accumulation_steps=1,
                       _entropy_bonus_enabled=False)
    ones = torch.ones(n_rows, 1, dtype=torch.long)
    inputs = {"prompt_ids": ones, "prompt_mask": ones,
              "completion_ids": torch.ones(n_rows, width, dtype=torch.long),
              "completion_mask": mask, "advantages": advantages,
              "num_items_in_batch": mask.sum(), "ref_per_token_logps": ref}
    return trainer._compute_loss(trainer.model, inputs)


def _grpo_batch() -> tuple[torch.Tensor, ...]:
    """4 prompts x 4 completions: log-probs, reference log-probs (the policy has drifted from
    the reference, so the KL term has a gradient), mask and group-normalised advantages."""
    logps, mask = _completions(16, 7, seed=5)
    g = torch.Generator().manual_seed(6)
    ref = (logps + 0.3 * torch.randn(16, 7, generator=g, dtype=DT)) * mask
    scores = torch.randn(16, generator=g, dtype=DT)
    return logps, ref, mask, ops.group_advantages(scores, 4)[0]


def _ours_grpo(logps: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
               advantages: torch.Tensor, beta: float) -> torch.Tensor:
    """Our GRPO loss as ``train/grpo.py``'s micro_step builds it: token-mean clipped surrogate
    plus the k3 penalty in the loss."""
    common = {"mode": "token-mean", "global_tokens": float(mask.sum())}
    pg, _ = pg_losses.ppo_clip_loss(logps, logps.detach(), advantages, mask, 0.2, **common)
    kl, _ = pg_losses.kl_penalty_loss(logps, ref, mask, beta, "k3", **common)
    return pg + kl


def _loss_and_grad(fn: Any, logps: torch.Tensor, *args: Any) -> tuple[torch.Tensor, ...]:
    leaf = logps.clone().requires_grad_(True)
    loss = fn(leaf, *args)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


@pytest.mark.parametrize("beta", [0.0, 0.04, 0.5])
def test_grpo_loss_and_gradient_match_trl_without_kl_bias_correction(beta: float) -> None:
    logps, ref, mask, adv = _grpo_batch()
    loss, grad = _loss_and_grad(_ours_grpo, logps, ref, mask, adv, beta)
    trl_loss, trl_grad = _loss_and_grad(_trl_grpo, logps, ref, mask, adv, beta, False)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, **TOL)


def test_trl_default_kl_bias_correction_changes_only_the_kl_gradient() -> None:
    """Why the benchmark turns TRL's default off: same loss value, different KL gradient."""
    logps, ref, mask, adv = _grpo_batch()
    beta = 0.04
    loss, grad = _loss_and_grad(_ours_grpo, logps, ref, mask, adv, beta)
    trl_loss, trl_grad = _loss_and_grad(_trl_grpo, logps, ref, mask, adv, beta, True)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    # TRL's KL gradient per token is beta * (log π - log π_ref) / tokens; ours is k3's.
    tokens = float(mask.sum())
    log_ratio = (logps - ref) * mask
    expected = grad - beta * (1 - torch.exp(-log_ratio)) * mask / tokens \
        + beta * log_ratio / tokens
    torch.testing.assert_close(trl_grad, expected, **TOL)
    assert not torch.allclose(grad, trl_grad, atol=1e-4)


def _mean_logps(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) mean log-probs per completion token, (n,) each."""
    chosen, rejected = ops.sequence_logps(batch["policy"], batch["mask"], average=True).chunk(2)
    return chosen, rejected


@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0),
                                                    (0.1, 0.5, 0.2)])
def test_simpo_matches_trl_cpo_simpo_loss(beta: float, gamma: float, eps: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected = _mean_logps(_pairs())
    ours, metrics = L.simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
    trainer = _trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                       label_smoothing=eps, alpha=0.0)
    theirs, chosen_rewards, rejected_rewards = trainer.cpo_loss(chosen, rejected)
    torch.testing.assert_close(ours, theirs.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), **TOL)
    torch.testing.assert_close(metrics["rewards/rejected"], rejected_rewards.mean(), **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_odds_ratio_matches_trl(beta: float) -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected = _mean_logps(_pairs())
    ours, metrics = L.orpo_odds_ratio_loss(chosen, rejected, beta=beta)
    trainer = _trainer(ORPOTrainer, beta=beta)
    # TRL returns β log σ(log odds) per pair and subtracts its mean from the NLL.
    theirs, _, _, _, log_odds = trainer.odds_ratio_loss(chosen, rejected)
    torch.testing.assert_close(ours, -theirs.mean().double(), **TOL)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds.double(), **TOL)
