"""Preference losses: reward models (Bradley–Terry, Plackett–Luce, centering) and direct
preference optimisation (DPO, cDPO, IPO, robust DPO, KTO, the RPO NLL term; and without a
reference model, SimPO and ORPO's odds-ratio term).

Every loss returns ``(loss, metrics)``: ``loss`` a scalar tensor to backpropagate, ``metrics`` a
dict of detached scalar tensors (batch means) for logging. Policy-gradient losses (PPO, value,
entropy, KL-in-loss) live in ``rewardloop.pg_losses``.

Gradient accumulation: a loss averaged over its own micro-batch changes with how a batch is
split. Pass ``global_count`` (pairs / examples in the whole optimizer step, over all micro-batches
and ranks) and sum the micro-batch losses: the result equals the one-big-batch loss.

Shapes: ``B`` pairs or examples, ``K`` responses per ranking. "logps" are sequence log-probs
(B,) -- summed over the completion tokens, or length-normalised, as the caller chooses
(``ops.sequence_logps``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812

from rewardloop.ops import aggregate

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _batch_mean(per_item: torch.Tensor, global_count: float | None) -> torch.Tensor:
    """Sum / global count when given (accumulation-invariant), else the plain mean."""
    if global_count is None:
        return per_item.mean()
    return per_item.sum() / global_count


def _soft_bce(logits: torch.Tensor, target: torch.Tensor | float) -> torch.Tensor:
    """-y log σ(z) - (1 - y) log σ(-z): cross-entropy of a Bernoulli target y (elementwise)."""
    return -target * F.logsigmoid(logits) - (1.0 - target) * F.logsigmoid(-logits)


# ---------------------------------------------------------------------------------------------
# Reward models
# ---------------------------------------------------------------------------------------------


def _pair_credit(margin: torch.Tensor) -> torch.Tensor:
    """1 / 0.5 / 0 for a positive / exactly zero / negative margin (``metrics.pair_credit`` on
    tensors, which stay on their device)."""
    return (torch.sign(margin) + 1.0) / 2.0


def preference_accuracy(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, tie: torch.Tensor | None = None
) -> torch.Tensor:
    """Fraction of non-tie pairs with r_chosen > r_rejected, an exact tie of the two scores
    counting half (``metrics.pair_credit``'s rule, that of the label ceiling).

    (B,), (B,), optional tie mask (B,) -> scalar. NaN if every pair is a tie.
    """
    correct = _pair_credit(r_chosen - r_rejected)
    if tie is None:
        return correct.mean()
    strict = ~tie.bool()
    return correct[strict].sum() / strict.sum()


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    tie: torch.Tensor | None = None,
    global_count: float | None = None,
) -> LossOutput:
    """Bradley–Terry reward-model loss (Ouyang et al. 2022, eq. 1): -log σ(r_c - r_r - margin).

    r_chosen, r_rejected: (B,) scalar rewards. ``margin`` (B,): how much better chosen must be
    (Llama 2, Touvron et al. 2023, eq. 2). ``label_smoothing`` ε: the target probability that
    chosen wins is 1 - ε instead of 1. ``tie`` (B,) bool: a tie is a soft target of 0.5,
    -½ log σ(Δ) - ½ log σ(-Δ), minimised at Δ = 0 -- "ties as half wins" as in Chatbot Arena;
    margins are ignored on ties. Metrics: accuracy (non-tie pairs), margin, reward means.
    """
    delta = r_chosen - r_rejected
    logits = delta if margin is None else delta - margin.to(delta.dtype)
    target = torch.full_like(delta, 1.0 - label_smoothing)
    if tie is not None:
        tie = tie.bool()
        target = torch.where(tie, 0.5, target)
        logits = torch.where(tie, delta, logits)
    loss = _batch_mean(_soft_bce(logits, target), global_count)
    metrics = {
        "accuracy": preference_accuracy(r_chosen, r_rejected, tie).detach(),
        "margin": delta.mean().detach(),
        "rewards/chosen": r_chosen.mean().detach(),
        "rewards/rejected": r_rejected.mean().detach(),
    }
    return loss, metrics


def plackett_luce_loss(
    scores: torch.Tensor, ranks: torch.Tensor, global_count: float | None = None
) -> LossOutput:
    """Plackett–Luce negative log-likelihood of k-way rankings with ties.

    scores (B, K) rewards; ranks (B, K) long: 0 for the best group, larger is worse, equal ranks
    are a tie, -1 marks an absent response (rankings may have different lengths).

    Plackett (1975): a ranking is a sequence of choices, each from the items not yet placed:
    log P = Σ_stage log softmax_{remaining}(s)[chosen]. Ties are handled stage-wise with a soft
    target: when a tied group G is placed from the remaining set S, the observed choice is
    "one of G, each equally likely", whose cross-entropy is -(1/|G|) Σ_{i∈G} log softmax_S(s)_i;
    then all of G leaves S. This is Breslow's (1974) tie approximation averaged over the group,
    and it generalises BT's tie target 0.5: for K=2 it is exactly ``bradley_terry_loss`` (no tie:
    -log σ(s_0 - s_1); tie: -½ log σ(Δ) - ½ log σ(-Δ)). A last group of one item adds 0.
    Metrics: pairwise accuracy over strictly ordered pairs.
    """
    present = ranks >= 0
    # remaining[b, i, j]: item j is still unplaced when item i's group is placed.
    remaining = (ranks.unsqueeze(1) >= ranks.unsqueeze(2)) & present.unsqueeze(1)
    group_size = ((ranks.unsqueeze(1) == ranks.unsqueeze(2)) & present.unsqueeze(1)).sum(-1)
    masked_scores = scores.unsqueeze(1).masked_fill(~remaining, float("-inf"))
    log_denominator = torch.logsumexp(masked_scores, dim=-1)  # (B, K)
    per_item = -(scores - log_denominator) / group_size.clamp(min=1)
    per_ranking = torch.where(present, per_item, 0.0).sum(dim=-1)
    loss = _batch_mean(per_ranking, global_count)
    return loss, {"accuracy": ranking_accuracy(scores, ranks).detach()}


def ordered_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """The number of strictly ordered answer pairs (i ranked above j, both present) in (B, K)
    ranks: the denominator of ``preference_accuracy`` (non-tie pairs, K = 2) and of
    ``ranking_accuracy``, so that accuracies of several batches combine as credit / pairs."""
    present = ranks >= 0
    both = present.unsqueeze(2) & present.unsqueeze(1)
    return ((ranks.unsqueeze(2) < ranks.unsqueeze(1)) & both).sum()


def ranking_accuracy(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Fraction of strictly ordered pairs (i better than j) with score_i > score_j, an exact
    tie of the two scores counting half (as ``preference_accuracy``).

    scores, ranks: (B, K) as in ``plackett_luce_loss`` -> scalar (NaN if no ordered pair).
    """
    present = ranks >= 0
    both = present.unsqueeze(2) & present.unsqueeze(1)
    better = (ranks.unsqueeze(2) < ranks.unsqueeze(1)) & both  # [b, i, j]: i ranked above j
    credit = _pair_credit(scores.unsqueeze(2) - scores.unsqueeze(1))  # (B, K, K)
    return torch.where(better, credit, 0.0).sum() / better.sum()


def reward_centering_loss(rewards: torch.Tensor, coef: float) -> torch.Tensor:
    """Auxiliary loss that keeps rewards centred on 0 (Eisenstein et al. 2023, §3).

    rewards (N,) -> coef * mean(r²); or (N, k), the k responses to one prompt in a row ->
    coef * mean_n (Σ_k r_nk)², the paper's (and TRL's) pairwise form (r_chosen + r_rejected)².
    BT only sees differences, so without it the reward offset drifts freely.
    """
    per_row = rewards if rewards.dim() == 1 else rewards.sum(dim=-1)
    return coef * (per_row**2).mean()


# ---------------------------------------------------------------------------------------------
# Direct preference optimisation on (chosen, rejected) pairs
# ---------------------------------------------------------------------------------------------


def _dpo_metrics(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Implicit rewards β·log(π/π_ref) and their statistics, as TRL names them."""
    chosen = beta * chosen_logratios.detach()
    rejected = beta * rejected_logratios.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def _log_ratio_difference(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """h = log π(y_c)/π_ref(y_c) - log π(y_r)/π_ref(y_r), (B,), with the DPO metrics."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    metrics = _dpo_metrics(chosen_logratios, rejected_logratios, beta,
                           policy_chosen_logps, policy_rejected_logps)
    return chosen_logratios - rejected_logratios, metrics


def dpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0, global_count: float | None = None,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β h), h the log-ratio difference.

    All inputs (B,). ``label_smoothing`` ε > 0 is conservative DPO (cDPO, Mitchell 2023): the
    label is trusted with probability 1 - ε, loss -(1-ε) log σ(βh) - ε log σ(-βh); it stops
    pushing once σ(βh) = 1 - ε. Metrics: rewards/{chosen,rejected,accuracies,margins},
    logps/{chosen,rejected}.
    """
    h, metrics = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps, beta)
    return _batch_mean(_soft_bce(beta * h, 1.0 - label_smoothing), global_count), metrics


def cdpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.1, global_count: float | None = None,
) -> LossOutput:
    """Conservative DPO: ``dpo_loss`` with a required label_smoothing ε in (0, 0.5)."""
    if not 0.0 < label_smoothing < 0.5:
        raise ValueError(f"cdpo needs 0 < label_smoothing < 0.5, got {label_smoothing}")
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta, label_smoothing, global_count)


def ipo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.0, global_count: float | None = None,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2β))², β being the paper's τ.

    A squared loss toward a finite margin, so it does not push h to infinity on deterministic
    preferences as DPO can. TRL computes h from length-normalised log-probs (mean over the
    completion tokens, the IPO authors' choice): pass ``ops.sequence_logps(..., average=True)``
    to match it and keep β comparable across lengths. IPO has no label smoothing (must be 0).
    """
    if label_smoothing != 0.0:
        raise ValueError("ipo has no label smoothing; use label_smoothing=0")
    h, metrics = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps, beta)
    return _batch_mean((h - 1.0 / (2.0 * beta)) ** 2, global_count), metrics


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float = 0.1, label_smoothing: float = 0.1, global_count: float | None = None,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label-flip rate ε.

    [(1-ε) ℓ(βh) - ε ℓ(-βh)] / (1 - 2ε), ℓ(z) = -log σ(z): in expectation over flips it equals
    the clean DPO loss. Unlike cDPO it can be negative. ε = ``label_smoothing`` in [0, 0.5).
    """
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    h, metrics = _log_ratio_difference(policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps, beta)
    clean, flipped = -F.logsigmoid(beta * h), -F.logsigmoid(-beta * h)
    per_pair = ((1 - eps) * clean - eps * flipped) / (1 - 2 * eps)
    return _batch_mean(per_pair, global_count), metrics


def simpo_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
    global_count: float | None = None,
) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6): -log σ(β (ȳ_c - ȳ_r) - γ), no reference model.

    Inputs (B,) are MEAN log-probs per completion token (``average=True``): the implicit reward
    β ȳ is length-normalised, and γ is the target reward margin. ``label_smoothing`` ε > 0 gives
    the conservative form -(1-ε) log σ(z) - ε log σ(-z), as cDPO (and TRL's CPO trainer).
    Metrics as DPO's, the rewards being β ȳ.
    """
    metrics = _dpo_metrics(policy_chosen_logps, policy_rejected_logps, beta,
                           policy_chosen_logps, policy_rejected_logps)
    z = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    return _batch_mean(_soft_bce(z, 1.0 - label_smoothing), global_count), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 without cancellation (Mächler 2012): log(-expm1 x) near 0,
    log1p(-e^x) below -log 2. x is clamped just below 0, where 1 - e^x underflows to 0 (a
    certain answer, log-prob 0, has infinite odds)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_odds_ratio_loss(
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
    beta: float = 0.1, global_count: float | None = None,
) -> LossOutput:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7): -λ log σ(log odds_c - log odds_r).

    Inputs (B,) are MEAN log-probs per completion token ȳ, so P(y|x) = e^ȳ and
    log odds = ȳ - log(1 - e^ȳ); λ = ``beta``. ORPO's full loss adds the token-mean NLL of the
    chosen answers (its SFT term): the caller adds it, normalised by the step's chosen tokens.
    No reference model. Metrics as DPO's with rewards β ȳ (as TRL logs them), plus
    ``log_odds_ratio`` (mean log odds_c - log odds_r).
    """
    log_odds = ((policy_chosen_logps - policy_rejected_logps)
                - (log1mexp(policy_chosen_logps) - log1mexp(policy_rejected_logps)))  # (B,)
    metrics = _dpo_metrics(policy_chosen_logps, policy_rejected_logps, beta,
                           policy_chosen_logps, policy_rejected_logps)
    metrics["log_odds_ratio"] = log_odds.detach().mean()
    return _batch_mean(-beta * F.logsigmoid(log_odds), global_count), metrics


PairwiseLoss = Callable[..., LossOutput]

PREFERENCE_LOSSES: dict[str, PairwiseLoss] = {
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "ipo": ipo_loss,
    "robust": robust_dpo_loss,
}


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO) and the RPO NLL term
# ---------------------------------------------------------------------------------------------


def kto_kl_ref_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x))), detached.

    (B,), (B,) -> scalar. y' are *mismatched* completions (the answer of another prompt in the
    batch), so z0 estimates KL(π || π_ref) without depending on the labelled answers
    (Ethayarajh et al. 2024, §4.1). Average over all ranks before passing it to ``kto_loss``.
    """
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
    kl_ref_point: torch.Tensor | float, beta: float = 0.1, desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0, global_count: float | None = None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 7) on unpaired examples.

    policy_logps, ref_logps (B,); labels (B,) bool (desirable or not); ``kl_ref_point`` z0 from
    ``kto_kl_ref_point`` (detached and clamped >= 0 here too). With r = log π/π_ref:
    desirable: λ_D (1 - σ(β(r - z0))); undesirable: λ_U (1 - σ(β(z0 - r))); averaged over all
    examples. Metrics: rewards/{chosen,rejected,margins} (NaN when a side is absent), kl.
    """
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype,
                         device=policy_logps.device).detach().clamp(min=0)
    desirable = labels.bool()
    logratios = policy_logps - ref_logps
    per_example = torch.where(desirable,
                              desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                              undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    rewards = beta * logratios.detach()
    chosen, rejected = rewards[desirable].mean(), rewards[~desirable].mean()
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected,
               "rewards/margins": chosen - rejected, "kl": z0}
    return _batch_mean(per_example, global_count), metrics


def nll_loss(
    token_logps: torch.Tensor, mask: torch.Tensor, global_tokens: float | None = None
) -> LossOutput:
    """Negative log-likelihood per token of the chosen answers, token-mean: (B, T) -> scalar.

    The SFT loss, and RPO's extra term (Pang et al. 2024, eq. 1: L_DPO + α·NLL on the chosen).
    """
    loss = aggregate(-token_logps, mask, "token-mean", global_tokens=global_tokens)
    return loss, {"nll": loss.detach()}
