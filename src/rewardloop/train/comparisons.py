"""What a reward model learns from: comparisons, read from preference files, and their scores.

A *comparison* is K tokenised answers to one prompt and their ranks (0 = best, equal ranks
tie): a pair is K = 2, a ranking row K >= 2. This module reads them (``train_and_eval_records``,
``comparisons_of``), applies the annotator policy (flagged annotators out, reliability
weights), scores a batch of them in one forward pass (``score_comparisons``) and names the two
objectives (``OBJECTIVES``). ``train.reward`` trains on them, ``train.reward_eval`` evaluates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardloop import losses
from rewardloop.data.formats import read_training_records
from rewardloop.data.records import PairRecord, RankingRecord, Record
from rewardloop.errors import UserError
from rewardloop.options import AnnotatorOptions
from rewardloop.score import rewards_of
from rewardloop.tokenize import Encoded, collate, encode_many
from rewardloop.train.configs import PAIRWISE_FORMATS, RANKING_FORMATS, RewardConfig
from rewardloop.train.data import read_json_mapping
from rewardloop.train.group_balance import read_groups_file
from rewardloop.train.split import split_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """K tokenised answers to one prompt and their ranks (0 best; equal ranks are a tie)."""

    responses: tuple[Encoded, ...]
    ranks: tuple[int, ...]
    margin: float = 0.0
    annotator: str | None = None
    weight: float = 1.0

    @property
    def n_tokens(self) -> int:
        return sum(len(e) for e in self.responses)


def _ranks(ranking: Sequence[Sequence[int]], k: int) -> tuple[int, ...]:
    ranks = [0] * k
    for place, group in enumerate(ranking):
        for i in group:
            ranks[i] = place
    return tuple(ranks)


def to_comparisons(records: Sequence[Record], tokenizer: Any, cfg: RewardConfig
                   ) -> list[Comparison]:
    """Pairs and rankings as comparisons (a tied pair keeps both answers at rank 0)."""
    kept = [r for r in records if isinstance(r, PairRecord | RankingRecord)]
    answers = [(r.chosen, r.rejected) if isinstance(r, PairRecord) else r.responses
               for r in kept]
    encoded = iter(encode_many(tokenizer, [(r.prompt, a) for r, each in zip(kept, answers,
                                                                           strict=True)
                                           for a in each],
                               max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length))
    out = []
    for r, each in zip(kept, answers, strict=True):
        responses = tuple(next(encoded) for _ in each)
        if isinstance(r, PairRecord):
            out.append(Comparison(responses, (0, 0) if r.tie else (0, 1),
                                  float(r.margin or 0.0), r.annotator))
        else:
            out.append(Comparison(responses, _ranks(r.ranking, len(r.responses)), 0.0,
                                  r.annotator))
    return out


def read_preferences(path: Path, cfg: RewardConfig) -> tuple[str, list[Record]]:
    """(format, records) of a preference file; other data kinds are refused."""
    fmt, records = read_training_records(path, cfg.data_format)
    if fmt not in PAIRWISE_FORMATS + RANKING_FORMATS:
        raise UserError(f"{path}: looks like {fmt} rows, but train rm needs preferences: "
                        "pairwise rows (prompt, chosen, rejected), hh, ultrafeedback or ranking "
                        "rows")
    return fmt, records


def comparisons_of(path: Path, fmt: str, records: Sequence[Record], tokenizer: Any,
                   cfg: RewardConfig) -> tuple[str, list[Comparison]]:
    """(objective name, comparisons) of the preference records read from ``path``."""
    items = to_comparisons(records, tokenizer, cfg)
    answers = [e for c in items for e in c.responses]
    cut = sum(not e.has_eos for e in answers)
    if cut:
        log.warning("%s: %d of %d answers were cut at max_length=%d (no EOS): the reward is "
                    "read at the cut; raise --max-length", path, cut, len(answers),
                    cfg.max_length)
    if not items:
        raise UserError(f"{path}: no comparison to learn from (ultrafeedback rows with equal "
                        "ratings give none)")
    return ("bradley-terry" if fmt in PAIRWISE_FORMATS else "plackett-luce"), items


def read_comparisons(path: Path, tokenizer: Any, cfg: RewardConfig) -> tuple[str, list[Comparison]]:
    """(objective name, comparisons) of a preference file; other data kinds are refused."""
    fmt, records = read_preferences(path, cfg)
    return comparisons_of(path, fmt, records, tokenizer, cfg)


def train_and_eval_records(cfg: RewardConfig, groups: Mapping[str, Sequence[str]],
                           flagged: Set[str] = frozenset()
                           ) -> tuple[tuple[str, list[Record]], tuple[str, list[Record]] | None]:
    """((format, training records), (format, held-out records) or None): --eval-data, or
    --eval-fraction of --data split by prompt (stratified by annotator group). The judgments of
    ``flagged`` annotators are left out of the held-out records too: a model should not be
    scored against labels the user chose not to trust (nor its label ceiling)."""
    fmt, records = read_preferences(cfg.data, cfg)
    if cfg.eval_data is not None:
        eval_fmt, held = read_preferences(cfg.eval_data, cfg)
    elif cfg.eval_fraction > 0:
        records, held = split_records(records, groups, cfg.eval_fraction, cfg.seed)
        eval_fmt = fmt
        log.info("rm: held out %d rows (%g of --data, split by prompt)", len(held),
                 cfg.eval_fraction)
    else:
        return (fmt, records), None
    trusted = [r for r in held if getattr(r, "annotator", None) not in flagged]
    if not trusted:
        raise UserError("every held-out judgment is by a flagged annotator; nothing to "
                        "evaluate on")
    return (fmt, records), (eval_fmt, trusted)


def apply_annotator_policy(items: list[Comparison], weights: Mapping[str, float] | None,
                           flagged: set[str]) -> list[Comparison]:
    """Drop comparisons judged by ``flagged`` annotators; weigh the rest by ``weights``.

    Annotators ``weights`` does not name (and rows without one: imported data) weigh 1;
    ``feedback.quality.annotator_weights`` names every annotator of the store.
    """
    kept = [c for c in items if c.annotator not in flagged] if flagged else list(items)
    if len(kept) < len(items):
        log.warning("left out %d comparisons by %d flagged annotators",
                    len(items) - len(kept), len(flagged))
    if not kept:
        raise UserError("every comparison was judged by a flagged annotator; nothing to train on")
    if weights is None:
        return kept
    out = [Comparison(c.responses, c.ranks, c.margin, c.annotator,
                      annotator_weight(c.annotator, weights)) for c in kept]
    if sum(c.weight for c in out) <= 0:
        raise UserError("every comparison has weight 0; nothing to train on")
    return out


def annotator_weight(annotator: str | None, weights: Mapping[str, float]) -> float:
    """The weight of a row judged by ``annotator``: 1 for an annotator ``weights`` does not
    name and for a row without one (imported data); a UserError for a negative or infinite
    weight."""
    w = float(weights.get(annotator, 1.0)) if annotator is not None else 1.0
    if not w >= 0 or math.isinf(w):
        raise UserError(f"annotator {annotator!r} has weight {w}; weights must be >= 0")
    return w


StoredAnnotators = tuple[Mapping[str, float] | None, Set[str], Mapping[str, Sequence[str]]]
"""(weights or None, flagged names, groups by name) as read from the store by the caller
(``feedback.quality.annotators_from_db``): the trainer itself does not open the store."""


def annotator_info(cfg: AnnotatorOptions, stored: StoredAnnotators | None
                   ) -> tuple[dict[str, float] | None, set[str], dict[str, list[str]]]:
    """(weights or None, flagged annotators, groups by annotator) from the files and ``stored``
    (needed when ``cfg.db`` is set)."""
    if cfg.db is not None and stored is None:
        raise ValueError("cfg.db is set: pass what the store knows about annotators "
                         "(feedback.quality.annotators_from_db)")
    weights: dict[str, float] | None = None
    flagged: set[str] = set()
    groups: dict[str, list[str]] = {}
    if cfg.annotator_groups is not None:
        groups.update(read_groups_file(cfg.annotator_groups))
    if cfg.weighting == "reliability" and cfg.annotator_weights is not None:
        raw = read_json_mapping(cfg.annotator_weights, "weights")
        try:
            weights = {str(k): float(v) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise UserError(f"{cfg.annotator_weights}: every weight must be a number") from None
    if stored is not None:
        store_weights, store_flagged, store_groups = stored
        if cfg.weighting == "reliability" and weights is None and store_weights is not None:
            weights = dict(store_weights)
        if cfg.exclude_flagged:
            flagged = set(store_flagged)
        for name, gs in store_groups.items():
            groups.setdefault(name, []).extend(
                str(g) for g in gs if str(g) not in groups.get(name, []))
    return weights, flagged, groups


def score_comparisons(model: nn.Module, items: Sequence[Comparison], pad_id: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """All answers of ``items`` in ONE forward pass -> (scores (B, K, H), ranks (B, K)).

    Rows are laid out answer-position-major (every first answer, then every second, ...), so a
    pair batch is exactly ``collate_pairs``'s chosen-then-rejected layout. Absent answers of
    shorter rankings have rank -1 and score 0.
    """
    k_max = max(len(c.responses) for c in items)
    where = [(b, k) for k in range(k_max) for b, c in enumerate(items) if k < len(c.responses)]
    batch = collate([items[b].responses[k] for b, k in where], pad_id)
    rewards = rewards_of(model, {k: v.to(device) for k, v in batch.items()})  # (N, H)
    b_idx = torch.tensor([b for b, _ in where], device=device)
    k_idx = torch.tensor([k for _, k in where], device=device)
    scores = rewards.new_zeros(len(items), k_max, rewards.shape[1])
    scores = scores.index_put((b_idx, k_idx), rewards)
    ranks = torch.full((len(items), k_max), -1, dtype=torch.long, device=device)
    for b, c in enumerate(items):
        ranks[b, :len(c.ranks)] = torch.tensor(c.ranks)
    return scores, ranks


def _bradley_terry(scores: torch.Tensor, ranks: torch.Tensor, margins: torch.Tensor,
                   cfg: RewardConfig, global_count: float) -> losses.LossOutput:
    """BT on (B, 2) scores of one head; ties are half wins, margins only with use_margin."""
    return losses.bradley_terry_loss(
        scores[:, 0], scores[:, 1], margin=margins if cfg.use_margin else None,
        label_smoothing=cfg.label_smoothing, tie=ranks[:, 0] == ranks[:, 1],
        global_count=global_count)


def _plackett_luce(scores: torch.Tensor, ranks: torch.Tensor, margins: torch.Tensor,
                   cfg: RewardConfig, global_count: float) -> losses.LossOutput:
    """Plackett–Luce on (B, K) scores of one head (margins and smoothing do not apply)."""
    return losses.plackett_luce_loss(scores, ranks, global_count=global_count)


Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, RewardConfig, float],
                     losses.LossOutput]
OBJECTIVES: dict[str, Objective] = {
    "bradley-terry": _bradley_terry,
    "plackett-luce": _plackett_luce,
}
