"""The DPO family's examples, scoring and objectives (``train.dpo`` runs the loop).

Every example is two tokenised sequences scored together in one (2B, T) forward pass. What
differs between the losses is chosen once, by name, in ``OBJECTIVES``: the data kind a loss reads,
how a micro-batch is scored, the pure loss of ``rewardloop.losses``, KTO's reference point and
the implicit-reward accuracy.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rewardloop import losses
from rewardloop.data.records import PairRecord, Record, UnpairedRecord
from rewardloop.errors import UserError
from rewardloop.tokenize import Encoded, collate, collate_pairs, encode_many, sequence_logps
from rewardloop.train.configs import PAIRWISE_FORMATS, UNPAIRED_FORMATS, DPOConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Examples: every item is two tokenised sequences
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One training item as the two sequences the loss scores.

    Pairwise: ``first`` = prompt + chosen, ``second`` = prompt + rejected, ``label`` True.
    KTO: ``first`` = prompt + completion, ``second`` = prompt + another row's completion (only
    for the KL reference point), ``label`` = desirable.
    """

    first: Encoded
    second: Encoded
    label: bool = True
    annotator: str | None = None
    """Who judged the pair, or labelled the KTO row (--exclude-flagged, --weighting,
    --group-balance and the per-group figures)."""

    @property
    def n_tokens(self) -> int:
        return len(self.first) + len(self.second)


def _examples(tokenizer: Any, cfg: DPOConfig, firsts: Sequence[tuple[Any, Any]],
              seconds: Sequence[tuple[Any, Any]]) -> list[tuple[Encoded, Encoded]]:
    """(first, second) encoded (prompt, completion) of each example, tokenised side by side
    (an example's two sequences share their prompt's tokenisation)."""
    got = encode_many(tokenizer, [x for both in zip(firsts, seconds, strict=True) for x in both],
                      max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    return list(zip(got[0::2], got[1::2], strict=True))


def build_pairs(records: Sequence[Record], tokenizer: Any, cfg: DPOConfig) -> list[Example]:
    """Pairs as examples; ties state no preference, so they are left out (and counted)."""
    pairs = [r for r in records if isinstance(r, PairRecord)]
    kept = [p for p in pairs if not p.tie]
    if len(kept) < len(pairs):
        log.warning("left out %d tied pairs (DPO needs a preferred answer)",
                    len(pairs) - len(kept))
    encoded = _examples(tokenizer, cfg, [(p.prompt, p.chosen) for p in kept],
                        [(p.prompt, p.rejected) for p in kept])
    return [Example(first, second, annotator=p.annotator)
            for p, (first, second) in zip(kept, encoded, strict=True)]


def build_unpaired(records: Sequence[Record], tokenizer: Any, cfg: DPOConfig) -> list[Example]:
    """KTO examples, each with a fixed mismatched partner: the next row of a seeded shuffle."""
    rows = [r for r in records if isinstance(r, UnpairedRecord)]
    if len(rows) < 2:
        raise UserError("kto needs at least 2 rows: the KL reference point pairs each prompt "
                        "with another row's completion")
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    n_good = sum(r.label for r in rows)
    ratio = (cfg.desirable_weight * n_good) / max(cfg.undesirable_weight * (len(rows) - n_good),
                                                  1e-9)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        log.warning("KTO: desirable_weight * #desirable / (undesirable_weight * #undesirable) "
                    "= %.2f; the KTO paper recommends 1 to 4/3", ratio)
    encoded = _examples(tokenizer, cfg, [(r.prompt, r.completion) for r in rows],
                        [(r.prompt, rows[partner[i]].completion) for i, r in enumerate(rows)])
    return [Example(first, second, r.label, annotator=r.annotator)
            for r, (first, second) in zip(rows, encoded, strict=True)]


# ---------------------------------------------------------------------------------------------
# Scoring: summed (or mean) completion log-probs of both sequences, (B, 2)
# ---------------------------------------------------------------------------------------------


def score(model: nn.Module, examples: Sequence[Example], pad_id: int, average: bool
          ) -> torch.Tensor:
    """Log-probs of both sequences of each example in ONE forward pass: (B, 2).

    The (2B, T) batch holds every ``first`` row, then every ``second`` row; prompt tokens and
    padding are outside the completion mask, so they never count.
    """
    device = next(model.parameters()).device
    batch = collate_pairs([e.first for e in examples], [e.second for e in examples], pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    logps = sequence_logps(model, batch, average=average)  # (2B,)
    return logps.view(2, len(examples)).T


def score_first(model: nn.Module, examples: Sequence[Example], pad_id: int, average: bool
                ) -> torch.Tensor:
    """Log-probs of the ``first`` sequences only: (B, 1) (KTO's labelled completions)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate([e.first for e in examples], pad_id).items()}
    return sequence_logps(model, batch, average=average).unsqueeze(-1)


def score_all(model: nn.Module, examples: Sequence[Example], pad_id: int, average: bool,
              batch_size: int) -> torch.Tensor:
    """No-grad (N, 2) float32 log-probs of a whole data set, batched by similar length."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
    out = torch.empty(len(examples), 2, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = score(model, [examples[i] for i in idx], pad_id, average).float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Objectives: one per loss name, chosen once
# ---------------------------------------------------------------------------------------------

Forward = Callable[[nn.Module, Sequence[Example], int, bool], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """Everything that differs between the losses, so the training loop does not branch."""

    kind: str
    """Data kind, for messages: "pairwise" or "unpaired"."""
    formats: tuple[str, ...]
    """File formats this objective reads."""
    build: Callable[[Sequence[Record], Any, DPOConfig], list[Example]]
    """Records -> examples (tokenised sequence pairs)."""
    forward: Forward
    """Policy log-probs with gradient of what the loss needs: (B, 2) pairs, (B, 1) KTO."""
    loss: Callable[..., losses.LossOutput]
    """(policy (B, k), ref (B, 2), labels (B,), z0, cfg, global_count) -> (loss, metrics)."""
    reference_point: Callable[..., torch.Tensor]
    """(policy model, examples, ref (B, 2), pad_id, cfg, chunk) -> detached scalar z0."""
    accuracy: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(policy (B, k), ref (B, 2), labels (B,), z0) -> implicit-reward accuracy."""
    reference: bool = True
    """Whether the loss compares with a reference model; without one (SimPO, ORPO) none is
    loaded or scored, and ``ref`` is all zeros."""
    sft_weight: float = 0.0
    """Weight of the chosen answers' token-mean NLL that the loss itself includes (ORPO's SFT
    term), added to --nll-coef's."""


def _pairwise_loss(name: str) -> Callable[..., losses.LossOutput]:
    loss_fn = losses.PREFERENCE_LOSSES[name]

    def loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor,
             cfg: DPOConfig, global_count: float | None) -> losses.LossOutput:
        return loss_fn(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=cfg.beta,
                       label_smoothing=cfg.label_smoothing, global_count=global_count)

    return loss


def _kto_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor,
              cfg: DPOConfig, global_count: float | None) -> losses.LossOutput:
    return losses.kto_loss(policy[:, 0], ref[:, 0], labels, z0, beta=cfg.beta,
                           desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight, global_count=global_count)


def _simpo_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor,
                cfg: DPOConfig, global_count: float | None) -> losses.LossOutput:
    return losses.simpo_loss(policy[:, 0], policy[:, 1], beta=cfg.beta, gamma=cfg.simpo_gamma,
                             label_smoothing=cfg.label_smoothing, global_count=global_count)


def _orpo_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, z0: torch.Tensor,
               cfg: DPOConfig, global_count: float | None) -> losses.LossOutput:
    return losses.orpo_odds_ratio_loss(policy[:, 0], policy[:, 1], beta=cfg.beta,
                                       global_count=global_count)


def _no_reference_point(model: nn.Module, examples: Sequence[Example], ref: torch.Tensor,
                        pad_id: int, cfg: DPOConfig, chunk: int) -> torch.Tensor:
    return torch.zeros((), device=ref.device)


def _kto_reference_point(model: nn.Module, examples: Sequence[Example], ref: torch.Tensor,
                         pad_id: int, cfg: DPOConfig, chunk: int) -> torch.Tensor:
    """z0 over all of ``examples`` (the whole optimizer step): policy vs reference log-probs of
    the mismatched completions, no gradient (KTO treats z0 as a constant)."""
    with torch.no_grad():
        kl_logps = score_all(model, examples, pad_id, cfg.mean_logps, chunk)[:, 1]
    return losses.kto_kl_ref_point(kl_logps.to(ref.device), ref[:, 1].to(torch.float32))


def _pairwise_accuracy(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
                       z0: torch.Tensor) -> torch.Tensor:
    """Share of pairs whose chosen answer has the larger implicit reward β log π/π_ref."""
    logratios = policy - ref
    return (logratios[:, 0] > logratios[:, 1]).float().mean()


def _kto_accuracy(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
                  z0: torch.Tensor) -> torch.Tensor:
    """Share of examples on the right side of the reference point: desirable ones with
    log π/π_ref > z0, undesirable ones below it."""
    above = (policy[:, 0] - ref[:, 0]) > z0
    return (above == labels.bool()).float().mean()


def _pairwise(loss: Callable[..., losses.LossOutput], **kw: Any) -> Objective:
    return Objective("pairwise", PAIRWISE_FORMATS, build_pairs, score, loss,
                     _no_reference_point, _pairwise_accuracy, **kw)


OBJECTIVES: dict[str, Objective] = {
    **{name: _pairwise(_pairwise_loss(name)) for name in losses.PREFERENCE_LOSSES},
    "simpo": _pairwise(_simpo_loss, reference=False),
    "orpo": _pairwise(_orpo_loss, reference=False, sft_weight=1.0),
    "kto": Objective("unpaired", UNPAIRED_FORMATS, build_unpaired, score_first, _kto_loss,
                     _kto_reference_point, _kto_accuracy),
}
