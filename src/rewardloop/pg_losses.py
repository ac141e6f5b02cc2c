"""Policy-gradient losses: PPO's clipped surrogate, the clipped value loss, the entropy bonus,
the KL-in-loss penalty (GRPO), and the truncated importance-sampling weights that correct for a
sampling engine (vLLM) whose log-probs differ from the trainer's.

Each returns ``(loss, metrics)`` like ``rewardloop.losses``: a scalar loss and a dict of detached
scalar tensors (token means over the micro-batch). Inputs are per-token (B, T) with a completion
``mask``; the per-token loss is reduced by ``ops.aggregate`` with ``mode`` and the global counts
of the optimizer step (``global_tokens``, ``global_seqs``), so gradient accumulation and
data-parallel sharding do not change the result. ``norm_length`` is Dr. GRPO's constant.
"""

from __future__ import annotations

import torch

from rewardloop.losses import LossOutput
from rewardloop.ops import KL_ESTIMATORS, aggregate, masked_mean


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    is_weights: torch.Tensor | None = None,
    mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: float | None = None,
) -> LossOutput:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    logp, old_logp (B, T): log-probs of the sampled tokens under the current policy and the one
    that sampled them; advantages (B, T), or (B,) for one advantage per sequence (GRPO/RLOO);
    mask (B, T). With ratio ρ = exp(logp - old_logp):
    loss_t = max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε_high)), ε_high defaulting to ε (DAPO's
    "clip-higher", Yu et al. 2025, uses a larger ε_high). ``dual_clip`` c > 1 (Ye et al. 2020,
    eq. 5) also bounds the loss of negative-advantage tokens by -c·A, so a huge ratio on a bad
    token cannot blow up the update. ``is_weights`` (B, T), constants from
    :func:`truncated_is_weights`, multiply each token's loss when the samples came from another
    engine. Metrics: clip_frac (tokens whose clipped branch is active),
    dual_clip_frac, approx_kl (k3 estimate of KL(old || new)), ratio (mean).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual_active, bound, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights
    loss = aggregate(per_token, mask, mode, global_tokens, global_seqs, norm_length)
    with torch.no_grad():
        # Samples come from the old policy, so k3 with r = π_new/π_old estimates KL(old || new).
        approx_kl = masked_mean(ratio - 1.0 - log_ratio, mask)
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "dual_clip_frac": masked_mean(dual_active.float(), mask),
            "approx_kl": approx_kl,
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    *,
    mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: float | None = None,
) -> LossOutput:
    """Clipped value loss: ½ max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±ε).

    values, old_values (value model at rollout time), returns: (B, T). Clipping keeps the critic
    near its rollout-time predictions (Huang et al. 2022, "N implementation details", detail 9);
    ``clip_eps=None`` gives the plain ½ (V - R)². Metrics: vf_clip_frac, values (mean), vf_mse.
    """
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token = unclipped
        clipped_active = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    loss = 0.5 * aggregate(per_token, mask, mode, global_tokens, global_seqs, norm_length)
    with torch.no_grad():
        metrics = {
            "vf_clip_frac": masked_mean(clipped_active.float(), mask),
            "values": masked_mean(values, mask),
            "vf_mse": masked_mean(unclipped, mask),
        }
    return loss, metrics


def entropy_bonus(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    *,
    mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: float | None = None,
) -> LossOutput:
    """-coef · aggregated entropy (B, T): add it to the loss to reward exploration.

    ``entropy`` from ``ops.entropy_from_logits``. Metric: entropy (token mean, for monitoring
    collapse even when coef = 0).
    """
    loss = -coef * aggregate(entropy, mask, mode, global_tokens, global_seqs, norm_length)
    return loss, {"entropy": masked_mean(entropy.detach(), mask)}


def kl_penalty_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    estimator: str = "k3",
    *,
    mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: float | None = None,
) -> LossOutput:
    """coef · aggregated per-token KL estimate of KL(π || π_ref), for KL-in-loss mode (GRPO).

    logp, ref_logp, mask (B, T); ``estimator`` a key of ``ops.KL_ESTIMATORS`` (GRPO uses k3,
    Shao et al. 2024, eq. 4; its gradient is biased, see docs/math.md). Metrics: kl (the
    chosen estimator), kl_k1 and kl_k3 (both logged whichever is optimised).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from "
                         f"{sorted(KL_ESTIMATORS)}")
    per_token = KL_ESTIMATORS[estimator](logp, ref_logp)
    loss = coef * aggregate(per_token, mask, mode, global_tokens, global_seqs, norm_length)
    with torch.no_grad():
        metrics = {
            "kl": masked_mean(per_token, mask),
            "kl_k1": masked_mean(KL_ESTIMATORS["k1"](logp, ref_logp), mask),
            "kl_k3": masked_mean(KL_ESTIMATORS["k3"](logp, ref_logp), mask),
        }
    return loss, metrics


IS_LEVELS = ("token", "sequence", "off")


def truncated_is_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
    level: str = "token",
) -> torch.Tensor:
    """Importance weights (B, T) correcting samples drawn by another engine, without gradient.

    trainer_logp, sampler_logp, mask (B, T): the sampled tokens' log-probs under the trainer's
    old policy and under the engine that drew them (vLLM), whose numerics differ. The PPO
    ratio is taken against the trainer's old policy, so the samples' own distribution enters
    through ρ_t = π_trainer / π_sampler (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"):
    - ``token``: w_t = min(ρ_t, cap), truncated importance sampling (bounded variance);
    - ``sequence``: w_t = 1 for every token of a sequence whose ratio Π_t ρ_t is at most
      ``cap``, 0 for all tokens of the others (a sequence mask: rare, badly mismatched samples
      are dropped rather than reweighted);
    - ``off``: all ones.
    Padding gets weight 0.
    """
    if cap <= 0:
        raise ValueError(f"the importance-sampling cap must be > 0, got {cap}")
    with torch.no_grad():
        # where, not a product: padding that holds -inf (an engine's marker) gives 0, not NaN
        log_ratio = torch.where(mask.bool(), trainer_logp - sampler_logp, 0.0)
        if level == "token":
            weights = torch.exp(log_ratio).clamp(max=cap)
        elif level == "sequence":
            keep = log_ratio.sum(dim=-1, keepdim=True) <= torch.log(torch.tensor(cap))
            weights = keep.to(trainer_logp.dtype).expand_as(trainer_logp)
        elif level == "off":
            weights = torch.ones_like(trainer_logp)
        else:
            raise ValueError(f"level must be one of {', '.join(IS_LEVELS)}, got {level!r}")
        return weights * mask


def sampler_mismatch(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """How far the sampling engine is from the trainer on the engine's own samples (B, T).

    ``sampler_kl`` estimates KL(sampler || trainer) per token by k1 (mean of log π_s - log π_t,
    unbiased on the sampler's samples) and ``sampler_kl_k3`` by k3 (always >= 0);
    ``is_ratio_mean`` / ``is_ratio_max`` are the token ratio π_trainer / π_sampler over real
    tokens. Healthy bf16 engines show KL ~1e-3 and a max ratio of a few units.
    """
    with torch.no_grad():
        # log(π_t / π_s); 0 on padding, whatever it holds (-inf would make NaN in the means)
        log_ratio = torch.where(mask.bool(), trainer_logp - sampler_logp, 0.0)
        ratio = torch.exp(log_ratio)
        real = mask.bool()
        return {
            "sampler_kl": float(masked_mean(-log_ratio, mask)),
            "sampler_kl_k3": float(masked_mean(ratio - 1.0 - log_ratio, mask)),
            "is_ratio_mean": float(masked_mean(ratio, mask)),
            "is_ratio_max": float(ratio[real].max()) if bool(real.any()) else 1.0,
        }
