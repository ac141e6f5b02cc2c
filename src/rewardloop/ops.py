"""Pure tensor functions shared by every trainer: log-probs, masks, masked statistics, KL
estimators, advantages (GAE, GRPO, RLOO, REINFORCE++), KL controllers and loss aggregation.

Conventions: ``B`` batch (sequences), ``T`` tokens, ``V`` vocabulary, ``G`` samples per prompt.
A ``mask`` is 1 (or True) on real completion tokens and 0 on padding/prompt; it may be bool or
float. Nothing here keeps state except the two KL controllers, whose state is explicit
(``state_dict``/``load_state_dict``) so checkpoints can restore it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_HALF = (torch.float16, torch.bfloat16)
# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------


# Temporary (rows x T x V) elements one logsumexp call may allocate: 32M floats = 128 MiB.
_LOGSUMEXP_CHUNK_ELEMENTS = 32 * 1024 * 1024


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., index]: (B, T, V), (B, T) -> (B, T).

    Computes ``logit[index] - logsumexp(logit)`` a chunk of rows at a time, so no full
    (B, T, V) log-softmax copy is made when the vocabulary is large (it dominates memory), while
    small problems go in one call instead of paying per-row overhead. Half-precision logsumexp
    is inaccurate, so bf16/fp16 rows go through a float32 log_softmax instead.
    ``index`` must hold valid token ids (replace ignore-index labels before calling).
    """
    low_precision = logits.dtype in _HALF
    out_dtype = torch.float32 if low_precision else logits.dtype
    out = torch.empty(index.shape, dtype=out_dtype, device=logits.device)
    per_row = max(1, logits[0].numel()) if logits.shape[0] else 1
    step = max(1, _LOGSUMEXP_CHUNK_ELEMENTS // per_row)
    for start in range(0, logits.shape[0], step):
        chunk, chunk_index = logits[start:start + step], index[start:start + step]
        if low_precision:
            chunk_logp = torch.log_softmax(chunk.float(), dim=-1)
            out[start:start + step] = chunk_logp.gather(-1, chunk_index.unsqueeze(-1)).squeeze(-1)
        else:
            picked = chunk.gather(-1, chunk_index.unsqueeze(-1)).squeeze(-1)
            out[start:start + step] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs of ``labels`` under ``softmax(logits / temperature)``.

    Shapes (B, T, V), (B, T) -> (B, T). Use the sampling temperature so the log-probs belong to
    the distribution the tokens were drawn from. Logits must already be aligned with labels
    (logits at position t predict labels[t]).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return selective_log_softmax(logits, labels)
    # Scale one row at a time: ``logits / T`` on the whole batch would copy (B, T, V).
    rows = [selective_log_softmax(logits[i : i + 1] / temperature, labels[i : i + 1])
            for i in range(logits.shape[0])]
    return torch.cat(rows, dim=0)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical softmax(logits) at each position: (B, T, V) -> (B, T).

    H = -sum_v p_v log p_v with 0 log 0 = 0, so -inf logits (banned tokens) are fine; computed
    one row at a time to bound memory.
    """
    rows = []
    for row_logits in logits:
        z = row_logits.float() if row_logits.dtype in _HALF else row_logits
        probs = torch.softmax(z, dim=-1)
        rows.append(-torch.special.xlogy(probs, probs).sum(dim=-1))
    return torch.stack(rows, dim=0)


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False
                   ) -> torch.Tensor:
    """Sequence log-prob from per-token log-probs: (B, T) -> (B,).

    ``average=False`` sums (the likelihood DPO's derivation uses); ``average=True`` divides by
    the number of real tokens (length-normalised, as SimPO / TRL's IPO do).
    """
    total = masked_sum(token_logps, mask, dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1).to(total.dtype) if average else total


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def completion_mask(
    completion_ids: torch.Tensor, eos_id: int | Sequence[int], pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens that belong to each completion, and whether it ended with EOS.

    ``eos_id`` may be several ids (instruct models stop on each of their generation config's
    EOS ids, e.g. Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``); the first of any ends a row.

    completion_ids (B, T) -> mask (B, T) long, has_eos (B,) bool. A row keeps every token up to
    and including its first EOS. A row without EOS (cut at max length) keeps all its tokens
    (except ``pad_id`` tokens) and gets ``has_eos=False``, so the caller can penalise it or drop
    it (``mask * has_eos[:, None]``). ``pad_id == eos_id`` is refused: the real EOS would be
    indistinguishable from padding and the model would never learn to stop (TRL #1623).
    """
    eos_ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    if pad_id is not None and pad_id in eos_ids:
        raise ValueError(
            f"pad_id == eos_id ({pad_id}): the EOS token would be masked as padding and the "
            "model would never learn to stop; give the tokenizer a distinct pad token")
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=-1)
    width = completion_ids.shape[-1]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=-1),
                            torch.full_like(has_eos, width - 1, dtype=torch.long))
    positions = torch.arange(width, device=completion_ids.device)
    mask = positions.unsqueeze(0) <= first_eos.unsqueeze(-1)
    if pad_id is not None:
        mask = mask & (completion_ids != pad_id)
    return mask.long(), has_eos


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token in each row: (B, T) -> (B,) long.

    Works for right padding (``1 1 1 0``), left padding (``0 0 1 1``) and both. The sequence
    reward of a reward model is read at this position (an off-by-one here is a classic silent
    bug). An all-padding row is refused.
    """
    real = mask.bool()
    if not bool(real.any(dim=-1).all()):
        raise ValueError("last_token_index: a row of the mask has no real token")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(real, positions, -1).amax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, T) -> (B, T).

    ``generate`` numbers a left-padded prompt's tokens from 0 at its first real token; a plain
    forward pass would number them from the first (padding) column, so a trainer or a reward
    model would score the tokens under different positions than they were sampled with.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is set; over all entries (dim=None) or along ``dim``."""
    masked = x * mask.to(x.dtype)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is set. An empty mask gives 0, not NaN."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is set (Bessel-corrected by default)."""
    count = int(mask.sum())
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, "
                         f"got {count}")
    centred = x - masked_mean(x, mask)
    var = masked_sum(centred**2, mask)
    return var / (count - 1) if unbiased else var / count


ReduceSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel processes (``Runtime.all_reduce``)."""


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    reduce_sum: ReduceSum | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0.

    The statistics ignore padding entirely (Huang et al. 2022, "The N Implementation Details of
    RLHF with PPO", detail on advantage whitening). ``shift_mean=False`` rescales but keeps the
    mean (used for rewards, whose sign carries meaning). ``reduce_sum``: with the batch split
    over processes, the mean and the (Bessel-corrected) variance are those of the whole batch.
    """
    if reduce_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        count, total = reduce_sum(torch.stack([m.sum(), (x * m).sum()])).unbind()
        if count < 2:
            raise ValueError(f"masked_whiten needs at least 2 masked entries, got {int(count)}")
        mean = total / count
        var = reduce_sum(((x - mean) ** 2 * m).sum()) / (count - 1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce_sum: ReduceSum | None = None) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over masked tokens: (B, T) x3 -> scalar.

    1 is a perfect critic, 0 is no better than predicting the mean, < 0 is worse than that;
    not finite when the returns have no variance. ``reduce_sum``: with the batch split over
    processes, the variances are those of the whole batch (not a mean of the processes'),
    from sums in float64 (one pass over sums of squares loses float32's digits).
    """
    if reduce_sum is None:
        return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)
    returns, values = returns.double(), values.double()
    m = mask.to(returns.dtype)
    errors = returns - values
    sums = reduce_sum(torch.stack([m.sum(), (returns * m).sum(), (returns**2 * m).sum(),
                                   (errors * m).sum(), (errors**2 * m).sum()]))
    count, r1, r2, e1, e2 = sums.unbind()
    return 1.0 - (e2 - e1 * e1 / count) / (r2 - r1 * r1 / count)


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020), samples drawn from the policy
# ---------------------------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log p - log q: unbiased for KL(p||q), high variance, can be negative. (B, T)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log p - log q)²: biased, low variance, always >= 0. (B, T)."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = q/p - 1 - log(q/p): unbiased, low variance, always >= 0 (GRPO's choice). (B, T)."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


# ---------------------------------------------------------------------------------------------
# Returns and advantages
# ---------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) -> (advantages, returns).

    rewards, values, mask: (B, T); both outputs (B, T), zero where ``mask`` is 0.
    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where
    "t+1" past the end of the completion (a masked position) contributes 0: the episode ends at
    the last real token, so nothing is bootstrapped from padding. Left padding works too: the
    scan runs backwards, so masked positions before a completion cannot affect it. Returns are
    A + V (the value targets). A reverse scan over T, vectorised over B.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = adv_t
        # A masked position resets the carry, so it acts as "after the end" for the token before.
        next_value = values[:, t] * m[:, t]
        next_adv = adv_t
    return advantages, (advantages + values) * m


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float
                       ) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each completion: (B, T), (B, T) -> (B, T), 0 on pads."""
    m = mask.to(token_rewards.dtype)
    returns = torch.zeros_like(token_rewards)
    carry = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        carry = (token_rewards[:, t] + gamma * carry) * m[:, t]
        returns[:, t] = carry
    return returns


def kl_shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Token rewards r_t = -kl_coef * kl_t, plus the sequence score on the last real token.

    scores (B,), kl (B, T) per-token estimate (k1 is the principled choice, Ziegler et al. 2019),
    mask (B, T) -> (B, T), zero on padding. This is the reward PPO and REINFORCE++ optimise.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def reinforce_pp_advantages(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, gamma: float = 1.0,
    reduce_sum: ReduceSum | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025, eqs. 6-8) -> (advantages, returns), both (B, T).

    Token rewards carry the per-token KL penalty and the sequence score at the end
    (``kl_shaped_rewards``); returns are their discounted sums; advantages are the returns
    whitened over all real tokens of the whole batch (a global baseline instead of a critic).
    """
    returns = discounted_returns(kl_shaped_rewards(scores, kl, mask, kl_coef), mask, gamma)
    return masked_whiten(returns, mask, reduce_sum=reduce_sum), returns


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P * G,) -> (P, G), refusing group sizes with no baseline or that do not divide."""
    if group_size < 2:
        raise ValueError(f"group methods need group_size >= 2 (samples per prompt), got "
                         f"{group_size}: with one sample every advantage is 0")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size "
                         f"{group_size}, got shape {tuple(rewards.shape)}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath §4.1.2) -> (advantages (N,), std (P,)).

    rewards (N,) with the G samples of each prompt contiguous (N = P * G). A_i = r_i - mean(group),
    divided by (std(group) + eps) when ``scale_by_std`` (Dr. GRPO, Liu et al. 2025, argues for
    False: the division up-weights easy and hard prompts). The per-group (unbiased) std is
    returned so callers can report ``frac_reward_zero_std``: those groups give no signal.
    """
    grouped = _groups(rewards, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1)
    advantages = grouped - mean
    if scale_by_std:
        advantages = advantages / (std.unsqueeze(1) + eps)
    return advantages.reshape(-1), std


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6): r_i - mean_{j != i} r_j. (N,)->(N,).

    Rewards of one prompt's G samples are contiguous. Each baseline excludes the sample itself,
    so it is unbiased; group_size < 2 has no baseline and is refused.
    """
    grouped = _groups(rewards, group_size)
    loo_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - loo_mean).reshape(-1)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning LMs from Human Prefs", §2.2).

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon): a proportional
    controller that moves the measured KL toward ``target``; the ±0.2 clip keeps one noisy
    measurement from jerking the coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError("AdaptiveKLController needs init_kl_coef >= 0, target > 0, "
                             "horizon > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust the coefficient after ``n_steps`` samples measured KL ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by ``state_dict``."""
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with the ``AdaptiveKLController`` interface."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Keep the coefficient unchanged (the interface of the adaptive controller)."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        """The coefficient, for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the coefficient saved by ``state_dict``."""
        self.value = float(state["value"])


# ---------------------------------------------------------------------------------------------
# Loss aggregation (per-token loss (B, T) -> scalar)
# ---------------------------------------------------------------------------------------------
# Every mode divides by a count the caller may give for the WHOLE optimizer step (all
# gradient-accumulation micro-batches and data-parallel ranks), so summing the micro-batch
# losses gives the same value and gradient as one big batch. Left as None, the count is this
# micro-batch's own. See docs/math.md for the length bias of each mode.


def token_mean(loss: torch.Tensor, mask: torch.Tensor, global_tokens: float | None = None,
               global_seqs: float | None = None, norm_length: float | None = None
               ) -> torch.Tensor:
    """Sum over all real tokens / number of real tokens (DAPO, Yu et al. 2025, eq. 12).

    Every token weighs the same, whatever its sequence's length. Uses ``global_tokens``.
    """
    count = global_tokens if global_tokens is not None else mask.sum().clamp(min=1)
    return masked_sum(loss, mask) / count


def _rows_in_loss(mask: torch.Tensor) -> torch.Tensor:
    """The number of rows with at least one real token (at least 1: an empty batch sums 0)."""
    return (mask.sum(dim=-1) > 0).sum().clamp(min=1)


def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor,
                        global_tokens: float | None = None, global_seqs: float | None = None,
                        norm_length: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (original GRPO, eq. 3).

    Tokens of short answers weigh more (a length bias). Uses ``global_seqs`` (default: the
    rows with a real token; a row with none is not in the loss).
    """
    count = global_seqs if global_seqs is not None else _rows_in_loss(mask)
    return masked_mean(loss, mask, dim=-1).sum() / count


def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor,
                       global_tokens: float | None = None, global_seqs: float | None = None,
                       norm_length: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum. Uses ``global_seqs`` (default: as
    ``seq_mean_token_mean``)."""
    count = global_seqs if global_seqs is not None else _rows_in_loss(mask)
    return masked_sum(loss, mask, dim=-1).sum() / count


def seq_mean_token_sum_norm(loss: torch.Tensor, mask: torch.Tensor,
                            global_tokens: float | None = None, global_seqs: float | None = None,
                            norm_length: float | None = None) -> torch.Tensor:
    """Token sums divided by a constant length, averaged over sequences (Dr. GRPO, Liu et al.
    2025, eq. 3): no length bias. Uses ``global_seqs`` and ``norm_length`` (the configured
    maximum completion length, a constant; the padded width of a batch would vary with it)."""
    if norm_length is None:
        raise ValueError("seq-mean-token-sum-norm needs norm_length (max completion length)")
    return seq_mean_token_sum(loss, mask, global_seqs=global_seqs) / norm_length


Aggregation = Callable[..., torch.Tensor]

AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    loss_per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar with the ``AGGREGATIONS[mode]`` rule.

    ``global_tokens`` / ``global_seqs``: real tokens / sequences in the whole optimizer step
    (all accumulation micro-batches and ranks); ``norm_length``: Dr. GRPO's constant.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; choose from {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](loss_per_token, mask, global_tokens=global_tokens,
                              global_seqs=global_seqs, norm_length=norm_length)
