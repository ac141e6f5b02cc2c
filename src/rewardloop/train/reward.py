"""Reward models from preferences (``rewardloop train rm``): Bradley–Terry and Plackett–Luce.

One explicit loop (``train_rm``). Every training item is a *comparison*: K answers to one prompt
and their ranks (0 = best, equal ranks tie). A pair is K = 2 (ranks 0/1, or 0/0 for a tie); a
ranking row is K >= 2. The data kind picks the objective once, by name (``OBJECTIVES``):
pairwise files (trl, hh, ultrafeedback) train with Bradley–Terry (optional margin, label
smoothing, ties as half wins), ranking files with Plackett–Luce (ties stage-wise, see
``losses.plackett_luce_loss``). All answers of a micro-batch go through the model in ONE forward
pass (a pair batch holds every chosen row, then every rejected row), and the reward is read at
the last real token (``score.rewards_of``).

Losses are normalised by the summed weight of all comparisons in the optimizer step (the number
of comparisons unless annotators are weighted by reliability), so gradient accumulation does not
change the update (except ``--length-debias``: ODIN's correlation term is a Pearson correlation
over the answers of each micro-batch, so it changes with --grad-accum and the number of
processes; the run warns when micro-batches are small). ``ensemble`` K > 1 puts K heads on one
shared trunk (one forward pass, K rewards); each head is trained on the same loss from its own
random start, the reward is their mean and their standard deviation is the model's
uncertainty.

After training the model is evaluated (accuracy, loss, calibration, per-annotator and per-group
accuracy, correlation of reward with answer length) and ``reward_stats.json`` (mean/std of the
rewards, ensemble size, tokenisation limits) is saved next to the weights for ``score`` and RL.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewardloop import losses
from rewardloop.ceiling import label_ceiling, record_votes
from rewardloop.data.formats import read_training_records
from rewardloop.data.records import PairRecord, RankingRecord, Record
from rewardloop.errors import UserError
from rewardloop.metrics import (
    annotator_groups,
    expected_calibration_error,
    pair_credit,
    primary_group,
)
from rewardloop.models import (
    HFModel,
    LoraSettings,
    apply_lora,
    load_reward_model,
    load_tokenizer,
    match_tokenizer,
)
from rewardloop.score import ENSEMBLE_KEY, GROUP_HEADS_KEY, STATS_FILE, rewards_of
from rewardloop.tokenize import Encoded, collate, encode
from rewardloop.train.checkpoint import restore_weights
from rewardloop.train.configs import PAIRWISE_FORMATS, RANKING_FORMATS, RewardConfig
from rewardloop.train.data import (
    LengthGroupedSampler,
    rank_micro_batches,
    read_json_mapping,
    scheduler,
)
from rewardloop.train.early_stop import BestPoint, evaluation_due
from rewardloop.train.group_balance import (
    GroupDRO,
    balanced_group_names,
    equal_weights,
    group_metric_sums,
    group_summary,
    read_groups_file,
    split_group_sums,
)
from rewardloop.train.length_debias import (
    drop_length_head,
    odin_correlation_loss,
    orthogonality_loss,
)
from rewardloop.train.run import (
    RunDir,
    adamw,
    save_checkpoint,
)
from rewardloop.train.runtime import Runtime, runtime_for
from rewardloop.train.split import split_records
from rewardloop.train.step import MicroLoss, accumulate_and_step
from rewardloop.util.files import atomic_write_text
from rewardloop.util.progress import progress_bar
from rewardloop.util.seed import seed_everything

log = logging.getLogger(__name__)

LENGTH_CORRELATION_WARNING = 0.5


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


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
    def enc(prompt: Any, answer: Any) -> Encoded:
        return encode(tokenizer, prompt, answer, max_length=cfg.max_length,
                      max_prompt_length=cfg.max_prompt_length)

    out = []
    for r in records:
        if isinstance(r, PairRecord):
            out.append(Comparison((enc(r.prompt, r.chosen), enc(r.prompt, r.rejected)),
                                  (0, 0) if r.tie else (0, 1), float(r.margin or 0.0),
                                  r.annotator))
        elif isinstance(r, RankingRecord):
            out.append(Comparison(tuple(enc(r.prompt, a) for a in r.responses),
                                  _ranks(r.ranking, len(r.responses)), 0.0, r.annotator))
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
    out = []
    for c in kept:
        w = float(weights.get(c.annotator, 1.0)) if c.annotator is not None else 1.0
        if not w >= 0 or math.isinf(w):
            raise UserError(f"annotator {c.annotator!r} has weight {w}; weights must be >= 0")
        out.append(Comparison(c.responses, c.ranks, c.margin, c.annotator, w))
    if sum(c.weight for c in out) <= 0:
        raise UserError("every comparison has weight 0; nothing to train on")
    return out


StoredAnnotators = tuple[Mapping[str, float] | None, Set[str], Mapping[str, Sequence[str]]]
"""(weights or None, flagged names, groups by name) as read from the store by the caller
(``feedback.quality.annotators_from_db``): the trainer itself does not open the store."""


def annotator_info(cfg: RewardConfig, stored: StoredAnnotators | None
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


# ---------------------------------------------------------------------------------------------
# Scoring and objectives
# ---------------------------------------------------------------------------------------------


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


def comparison_loss(objective: Objective, scores: torch.Tensor, ranks: torch.Tensor,
                    items: Sequence[Comparison], cfg: RewardConfig, step_weight: float,
                    step_count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_i w_i loss_i / ``step_weight`` averaged over heads, plus reward centering.

    scores (B, K, H), ranks (B, K); ``step_weight`` / ``step_count``: summed weight / number of
    the comparisons in the whole optimizer step. The losses take one global count, so
    comparisons are grouped by weight: a group of weight w divides its summed loss by
    step_weight / w, which gives Σ_i w_i loss_i / step_weight exactly.
    """
    device = scores.device
    odin = None
    if cfg.length_debias:  # rank by r_Q + r_L; ODIN's terms on the split (see length_debias)
        odin = length_terms(scores, ranks, items) * len(items) / step_count
        scores = scores[..., :-1] + scores[..., -1:]
    weights = torch.tensor([c.weight for c in items], device=device)
    margins = torch.tensor([c.margin for c in items], device=device, dtype=scores.dtype)
    heads = scores.shape[-1]
    loss = scores.new_zeros(())
    for w in torch.unique(weights).tolist():
        if w == 0:
            continue
        sel = weights == w
        for h in range(heads):
            part, _ = objective(scores[sel][..., h], ranks[sel], margins[sel], cfg,
                                step_weight / w)
            loss = loss + part / heads
    if cfg.center_rewards_coef > 0:
        # A batch mean over this micro-batch; x B_micro / B_step makes it a share of the step.
        centering = torch.stack([losses.reward_centering_loss(scores[..., h],
                                                              cfg.center_rewards_coef)
                                 for h in range(heads)]).mean()
        loss = loss + centering * len(items) / step_count
    if odin is not None:
        loss = loss + cfg.length_debias_coef * odin
    with torch.no_grad():  # metrics of the ensemble's reward, the mean over heads (B, K)
        _, metrics = objective(scores.mean(-1), ranks, margins, cfg, float(len(items)))
    return loss, metrics


def length_terms(scores: torch.Tensor, ranks: torch.Tensor, items: Sequence[Comparison]
                 ) -> torch.Tensor:
    """ODIN's correlation term over the answers of a micro-batch: scores (B, K, H + 1), the
    last head tracking length; absent answers (rank -1) are left out."""
    lengths = torch.tensor([[sum(e.completion_mask) for e in c.responses]
                            + [0] * (scores.shape[1] - len(c.responses)) for c in items],
                           device=scores.device)
    present = ranks >= 0
    return odin_correlation_loss(scores[..., :-1][present], scores[..., -1][present],
                                 lengths[present])


ODIN_MIN_COMPARISONS = 8
"""Comparisons per micro-batch below which ODIN's correlation term is noisy (a pair gives two
answers, whose correlation with length is +-1)."""


def warn_small_debias_batches(cfg: RewardConfig, world_size: int) -> bool:
    """Warn (and return True) when --length-debias correlates over micro-batches of fewer than
    ``ODIN_MIN_COMPARISONS`` comparisons."""
    per_micro = cfg.batch_size // max(cfg.grad_accum, 1) // max(world_size, 1)
    if not cfg.length_debias or per_micro >= ODIN_MIN_COMPARISONS:
        return False
    log.warning("--length-debias computes its length correlation over each micro-batch, here "
                "%d comparisons (--batch-size / --grad-accum / processes): a noisy term, and "
                "one that changes with --grad-accum and the number of processes. Give it at "
                "least %d a micro-batch.", per_micro, ODIN_MIN_COMPARISONS)
    return True


def score_head(model: nn.Module) -> nn.Linear:
    """The reward head (``score``) of a plain or DDP-wrapped reward model."""
    head = Runtime.unwrap(model).score
    if not isinstance(head, nn.Linear):
        raise UserError("--length-debias needs a reward model whose head (score) is one linear "
                        f"layer, not {type(head).__name__}")
    return head
def group_loss_sums(objective: Objective, scores: torch.Tensor, ranks: torch.Tensor,
                    items: Sequence[Comparison], cfg: RewardConfig, group_ids: Sequence[str],
                    groups: Sequence[str]) -> dict[str, float]:
    """No-grad loss sum and count per group of one micro-batch (ensemble-mean reward), as the
    metric sums ``train.group_balance`` reads; scores (B, K, H), ranks (B, K)."""
    with torch.no_grad():
        mean = scores.detach().mean(-1)
        margins = torch.tensor([c.margin for c in items], device=mean.device, dtype=mean.dtype)
        sums, counts = {}, {}
        for g in sorted(set(group_ids)):
            sel = torch.tensor([x == g for x in group_ids], device=mean.device)
            loss, _ = objective(mean[sel], ranks[sel], margins[sel], cfg, 1.0)
            sums[g], counts[g] = float(loss), int(sel.sum())
    return group_metric_sums(sums, counts, groups)


PAIRS_KEY = "_ordered_pairs"
"""The micro-batch metric sum holding the ordered pairs that accuracy is a share of."""


def step_metrics(sums: Mapping[str, float], count: int) -> dict[str, float]:
    """A step's logged figures from its summed metrics (``micro_loss``) over ``count``
    comparisons: means per comparison, and accuracy per ordered pair (left out of a step whose
    comparisons are all ties)."""
    pairs = sums.get(PAIRS_KEY, 0.0)
    out = {k: v / count for k, v in sums.items() if k not in ("accuracy", PAIRS_KEY)}
    if "accuracy" in sums and pairs > 0:
        out["accuracy"] = sums["accuracy"] / pairs
    return out


def micro_loss(model: nn.Module, objective: Objective, items: Sequence[Comparison],
               batch: Sequence[int], cfg: RewardConfig, pad_id: int, device: torch.device,
               group_ids: Sequence[str] | None = None, groups: Sequence[str] = (),
               heads: Sequence[int] | None = None) -> MicroLoss:
    """The loss of one micro-batch of the step ``batch``: divided by the summed weight (and
    count) of the WHOLE step's comparisons, so the accumulated gradient is the one-big-batch
    gradient. Metrics come back as sums over the micro-batch's comparisons, plus the loss per
    annotator group when ``group_ids`` (one per item) are given. With ``heads`` (one head index
    per item: --group-heads) each comparison is scored and trained by its own head only."""
    step_weight = max(sum(items[i].weight for i in batch), 1e-12)

    def loss_of(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        mb = [items[i] for i in indices]
        scores, ranks = score_comparisons(model, mb, pad_id, device)
        if heads is not None:  # (B, K, H) -> (B, K, 1): each comparison's own head
            own = torch.tensor([heads[i] for i in indices], device=scores.device)
            scores = scores.gather(-1, own.view(-1, 1, 1).expand(-1, scores.shape[1], 1))
        loss, metrics = comparison_loss(objective, scores, ranks, mb, cfg, step_weight,
                                        len(batch))
        # Accuracy is a share of the ordered pairs, which micro-batches hold in different
        # numbers (ties have none): summed as credit and pairs, divided once per step.
        pairs = float(losses.ordered_pairs(ranks))
        sums = {k: float(v) * len(mb) for k, v in metrics.items() if k != "accuracy"}
        sums["accuracy"] = float(metrics["accuracy"]) * pairs if pairs else 0.0
        sums[PAIRS_KEY] = pairs
        if group_ids is not None:
            sums.update(group_loss_sums(objective, scores, ranks, mb, cfg,
                                        [group_ids[i] for i in indices], groups))
        if cfg.length_debias:
            loss = loss + (cfg.length_debias_coef * orthogonality_loss(score_head(model))
                           * len(mb) / len(batch))
        return loss, sums

    return loss_of


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def score_all(model: nn.Module, items: Sequence[Comparison], pad_id: int, device: torch.device,
              batch_size: int, rt: Runtime | None = None) -> list[torch.Tensor]:
    """No-grad rewards of every answer: one (K_i, H) float32 tensor per comparison. With a
    runtime, each rank scores its share of the batches and all get every score."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: items[i].n_tokens)
    starts = list(range(0, len(order), batch_size))

    def chunk(k: int) -> list[torch.Tensor]:
        idx = order[starts[k]:starts[k] + batch_size]
        scores, _ = score_comparisons(model, [items[i] for i in idx], pad_id, device)
        return [scores[j, :len(items[i].responses)].float().cpu() for j, i in enumerate(idx)]

    chunks = (rt.map_chunks(len(starts), chunk) if rt is not None
              else [chunk(k) for k in range(len(starts))])
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    for k, scored in enumerate(chunks):
        for i, row in zip(order[starts[k]:starts[k] + batch_size], scored, strict=True):
            out[i] = row
    model.train(was_training)
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def reward_stats(scores: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Mean/std of the (ensemble-mean) rewards of all answers, and of each head."""
    flat = torch.cat(list(scores))  # (N, H)
    mean = flat.mean(-1)
    return {"mean": float(mean.mean()), "std": float(mean.std(unbiased=False)),
            "n": int(flat.shape[0]), "ensemble": int(flat.shape[1]),
            "head_mean": flat.mean(0).tolist(), "head_std": flat.std(0, unbiased=False).tolist()}


def pair_figures(deltas: np.ndarray, who: Sequence[str | None],
                 groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Accuracy, calibration and per-annotator/group accuracy of r_better - r_worse (P,); an
    exact tie of the two rewards earns half credit (``metrics.pair_credit``)."""
    credit = pair_credit(deltas)
    probs = 1.0 / (1.0 + np.exp(-deltas))
    ece, bins = expected_calibration_error(np.concatenate([probs, 1 - probs]),
                                           np.concatenate([np.ones_like(probs),
                                                           np.zeros_like(probs)]))
    figures: dict[str, Any] = {"eval_accuracy": float(credit.mean()), "eval_ece": ece,
                               "calibration_bins": bins}
    by_name: dict[str, list[float]] = defaultdict(list)
    by_group: dict[str, list[float]] = defaultdict(list)
    for ok, name in zip(credit.tolist(), who, strict=True):
        if name is None:
            continue
        by_name[name].append(ok)
        for g in groups.get(name, ()):
            by_group[g].append(ok)
    for key, table in (("accuracy_by_annotator", by_name), ("accuracy_by_group", by_group)):
        if table:
            figures[key] = {n: {"accuracy": float(np.mean(v)), "pairs": len(v)}
                            for n, v in sorted(table.items())}
    return figures


def length_correlation(items: Sequence[Comparison], scores: Sequence[torch.Tensor]
                       ) -> float | None:
    """Pearson r of the (ensemble-mean) reward and answer length in tokens, over all answers."""
    rewards = [float(r) for s in scores for r in s.mean(-1)]
    lengths = [sum(e.completion_mask) for c in items for e in c.responses]
    return _pearson(rewards, lengths)


def split_length_head(scores: Sequence[torch.Tensor], cfg: RewardConfig
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """(reward-head scores, r_Q + r_L or None) of (K, H [+ 1]) scores: with --length-debias the
    last column is the length head, which the saved model will not have."""
    if not cfg.length_debias:
        return list(scores), None
    return [s[:, :-1] for s in scores], [s[:, :-1] + s[:, -1:] for s in scores]
def pair_deltas(items: Sequence[Comparison], mean: torch.Tensor
                ) -> tuple[list[float], list[str | None]]:
    """r_better - r_worse of every strictly ordered answer pair of ``items`` and who judged it;
    ``mean``: (B, K) ensemble-mean rewards. Left out, as the label ceiling leaves them out:
    judged ties, and pairs of one answer twice (the same tokens), which no model can order."""
    deltas, who = [], []
    for b, c in enumerate(items):
        for i in range(len(c.ranks)):
            for j in range(len(c.ranks)):
                preferred = c.ranks[i] < c.ranks[j]  # i was preferred to j
                if preferred and c.responses[i].input_ids != c.responses[j].input_ids:
                    deltas.append(float(mean[b, i] - mean[b, j]))
                    who.append(c.annotator)
    return deltas, who


def evaluate(objective_name: str, items: Sequence[Comparison], scores: Sequence[torch.Tensor],
             cfg: RewardConfig, groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Held-out figures of the ensemble-mean reward.

    - ``eval_loss``: the objective's NLL (no margin, no smoothing: the data's log-likelihood);
    - ``eval_accuracy``: share of strictly ordered answer pairs the reward orders right, an
      exact tie of rewards counting half (judged ties and pairs of identical answers are left
      out, as in the label ceiling); per annotator and per annotator group as well;
    - ``eval_ece`` and ``calibration_bins``: calibration of σ(r_better - r_worse), counted in
      both orientations so the reliability diagram is symmetric;
    - ``length_correlation``: Pearson r of reward and answer length in tokens.
    """
    k_max = max(len(c.responses) for c in items)
    mean = torch.zeros(len(items), k_max)
    ranks = torch.full((len(items), k_max), -1, dtype=torch.long)
    for b, (c, s) in enumerate(zip(items, scores, strict=True)):
        mean[b, :len(c.responses)] = s.mean(-1)
        ranks[b, :len(c.ranks)] = torch.tensor(c.ranks)
    plain = RewardConfig(model=cfg.model, data=cfg.data, out=cfg.out)
    loss, _ = OBJECTIVES[objective_name](mean, ranks, torch.zeros(len(items)), plain,
                                         float(len(items)))
    deltas, who = pair_deltas(items, mean)
    figures: dict[str, Any] = {"eval_loss": float(loss), "eval_comparisons": len(items)}
    if deltas:
        figures.update(pair_figures(np.asarray(deltas), who, groups))
    corr = length_correlation(items, scores)
    figures["length_correlation"] = corr
    if corr is not None and abs(corr) > LENGTH_CORRELATION_WARNING:
        log.warning("reward and answer length correlate on the held-out answers (Pearson r = "
                    "%.2f): unless what your annotators prefer is itself longer, the model may "
                    "be rewarding length; compare with --length-debias "
                    "(docs/reward-models.md)", corr)
    if scores and scores[0].shape[-1] > 1:
        figures["eval_uncertainty_mean"] = float(torch.cat(list(scores)).std(
            -1, unbiased=False).mean())
    return figures


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def load_tokenizer_for(cfg: RewardConfig) -> Any:
    """The model's right-padding tokenizer (pad == EOS refused unless add_pad_token)."""
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code,
                          add_pad_token=cfg.add_pad_token, padding_side="right",
                          chat_template=cfg.chat_template)


def load_model(cfg: RewardConfig, tokenizer: Any, rt: Runtime,
               head_groups: Sequence[str] = ()) -> nn.Module:
    """The reward model in fp32 master weights: K fresh heads for an ensemble (or one per
    group of ``head_groups``, recorded in the config), LoRA when asked."""
    model: HFModel = load_reward_model(cfg.model, dtype=rt.weights_dtype(cfg.dtype),
                              device=str(rt.device), trust_remote_code=cfg.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id)
    match_tokenizer(model, tokenizer)
    # --group-heads: one head per group; ODIN's length head (--length-debias) is the last output
    reward_heads = len(head_groups) or cfg.ensemble
    heads = reward_heads + int(cfg.length_debias)
    if heads > 1:
        old = model.score
        head = nn.Linear(old.in_features, heads, bias=old.bias is not None,
                         dtype=old.weight.dtype, device=old.weight.device)
        nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        if reward_heads == 1:  # one reward head: keep the model's own (a warm start's)
            with torch.no_grad():
                head.weight[0].copy_(old.weight[0])
                if head.bias is not None:
                    head.bias[0].copy_(old.bias[0])
        model.score = head
        model.config.num_labels = heads
        if reward_heads > 1:
            setattr(model.config, ENSEMBLE_KEY, reward_heads)
        if head_groups:
            setattr(model.config, GROUP_HEADS_KEY, list(head_groups))
    if cfg.lora_r:
        model = apply_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    return model


def _write_stats(model_dir: Path, stats: Mapping[str, Any]) -> None:
    atomic_write_text(model_dir / STATS_FILE, json.dumps(dict(stats), indent=2) + "\n")


def balance_groups(items: list[Comparison], group_ids: Sequence[str], cfg: RewardConfig
                   ) -> tuple[list[Comparison], GroupDRO | None]:
    """``--group-balance``: equal reweighs the comparisons once; minmax returns the group DRO
    state that weighs every step (``train.group_balance``)."""
    names = balanced_group_names(group_ids, cfg.group_balance, "comparisons", "give groups "
                                 "with --annotator-groups or --db, and an annotator on every row")
    if cfg.group_balance == "none":
        return items, None
    if cfg.group_balance == "equal":
        weights = equal_weights(group_ids, [c.weight for c in items])
        return [replace(c, weight=w) for c, w in zip(items, weights, strict=True)], None
    return items, GroupDRO(names, cfg.group_step_size)


def step_items(items: list[Comparison], batch: Sequence[int], group_ids: Sequence[str],
               dro: GroupDRO | None) -> list[Comparison]:
    """The comparisons as this step weighs them: under group DRO, w_i q_g / W_g."""
    if dro is None:
        return items
    out = list(items)
    weights = dro.item_weights([group_ids[i] for i in batch], [items[i].weight for i in batch])
    for i, w in zip(batch, weights, strict=True):
        out[i] = replace(items[i], weight=w)
    return out


def group_figures(cfg: RewardConfig, items: Sequence[Comparison], group_ids: Sequence[str],
                  groups: Mapping[str, Sequence[str]], dro: GroupDRO | None,
                  eval_items: Sequence[Comparison], eval_scores: Sequence[torch.Tensor],
                  head_groups: Sequence[str] = ()) -> dict[str, Any]:
    """The summary's ``groups`` section (``train.group_balance.group_summary``): a group's
    accuracy is that of its own head under --group-heads, else of the (mean) reward."""
    correct: list[float] = []
    eval_groups: list[str] = []
    units: list[int] = []
    for k, (c, s) in enumerate(zip(eval_items, eval_scores, strict=True)):
        for g in annotator_groups(c.annotator, groups):
            reward = s[:, head_groups.index(g)] if g in head_groups else s.mean(-1)
            deltas, _ = pair_deltas([c], reward[None])
            correct += pair_credit(deltas).tolist()
            eval_groups += [g] * len(deltas)
            units += [k] * len(deltas)
    section = group_summary(cfg.group_balance, group_ids, [c.annotator for c in items],
                            [c.weight for c in items], dro, correct, eval_groups, units)
    return {**section, "group_heads": list(head_groups)} if head_groups else section


def head_groups_of(cfg: RewardConfig, tracked: Sequence[str]) -> tuple[str, ...]:
    """--group-heads: the groups that get a head, in head order (needs 2+ groups)."""
    if not cfg.group_heads:
        return ()
    if len(tracked) < 2:
        raise UserError(f"--group-heads needs comparisons from 2 or more annotator groups, got "
                        f"{list(tracked)}: give groups with --annotator-groups or --db")
    return tuple(tracked)


def train_rm(cfg: RewardConfig, stored: StoredAnnotators | None = None) -> dict[str, Any]:
    """Train a reward model; returns the summary written to ``summary.json``. ``stored``: what
    the store knows about annotators, when ``cfg.db`` is set."""
    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt, stored)


def _train(cfg: RewardConfig, rt: Runtime,  # noqa: C901 (the loop)
           stored: StoredAnnotators | None) -> dict[str, Any]:
    # Data first: a refused file must not leave a half-made run directory behind.
    rt.check_divisible(cfg.batch_size // cfg.grad_accum, "--batch-size / --grad-accum")
    rt.check_merge_lora(cfg.merge_lora)
    if cfg.length_debias and rt.strategy == "fsdp":
        raise UserError("--length-debias drops a head when saving, which FSDP's sharded head "
                        "does not allow; use --strategy ddp")
    warn_small_debias_batches(cfg, rt.world_size)
    tokenizer = load_tokenizer_for(cfg)
    pad_id = tokenizer.pad_token_id
    weights, flagged, groups = annotator_info(cfg, stored)
    (fmt, records), held_out = train_and_eval_records(cfg, groups, flagged)
    objective_name, items = comparisons_of(cfg.data, fmt, records, tokenizer, cfg)
    eval_name, eval_items = (comparisons_of(cfg.eval_data or cfg.data, *held_out, tokenizer, cfg)
                             if held_out else (objective_name, []))
    ceiling = label_ceiling(record_votes(held_out[1])).to_json() if held_out else {}
    if objective_name == "plackett-luce" and (cfg.use_margin or cfg.label_smoothing):
        raise UserError("--use-margin and --label-smoothing apply to pairwise data; ranking "
                        "rows train with Plackett-Luce, which has neither")
    n_read = len(items)
    items = apply_annotator_policy(items, weights, flagged)
    group_ids = [primary_group(c.annotator, groups) for c in items]
    items, dro = balance_groups(items, group_ids, cfg)
    tracked = sorted(set(group_ids)) if len(set(group_ids)) > 1 else []
    head_groups = head_groups_of(cfg, tracked)
    heads = [head_groups.index(g) for g in group_ids] if head_groups else None
    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, runtime=rt,
                 report_to=cfg.report_to, start=False)
    seed_everything(cfg.seed)
    model = load_model(cfg, tokenizer, rt, head_groups)
    objective = OBJECTIVES[objective_name]
    lengths = [c.n_tokens for c in items]
    sampler = LengthGroupedSampler(lengths, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.batches_per_epoch
    log.info("rm: %d comparisons (%s), %d steps", len(items), objective_name, total_steps)

    model.train()
    model = rt.prepare(model)  # FSDP2 replaces the parameters: collect them after
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    sched = scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule)
    ckpt = run.restore(models={"reward": model}, optimizers={"reward": optimizer},
                       schedulers={"reward": sched}, runtime=rt)
    best = BestPoint(cfg.early_stopping_patience)
    step = 0
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
        best.load_state_dict(ckpt.extra.get("best", best.state_dict()))
        if dro is not None:
            dro.restore(ckpt.sampler_state)
    run.start()  # everything loaded and the checkpoint accepted: only now is --out changed

    def held_out_figures() -> tuple[dict[str, Any], list[torch.Tensor]]:
        with rt.autocast():
            raw = score_all(model, eval_items, pad_id, rt.device, cfg.eval_batch_size, rt)
        scores, with_length = split_length_head(raw, cfg)
        figures = evaluate(eval_name, eval_items, scores, cfg, groups)
        if with_length is not None:  # what the reward would be with the length head kept
            figures["length_correlation_with_length_head"] = length_correlation(
                eval_items, with_length)
        return figures, scores

    def checkpoint(at: int) -> None:
        save_checkpoint(run, at, models={"reward": model}, optimizers={"reward": optimizer},
                        schedulers={"reward": sched}, sampler_state={**sampler.state_dict(), **(
                            {"group_dro": dro.state_dict()} if dro is not None else {})},
                        extra={"best": best.state_dict()}, keep=best.keep, runtime=rt)

    figures: dict[str, Any] = {}
    stats_scores: list[torch.Tensor] | None = None
    with progress_bar(total_steps, "rm", start=step) as show:
        while step < total_steps:
            batch = sampler.next_batch()
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it after)
            out = accumulate_and_step(
                rt, model, optimizer, params,
                rank_micro_batches(batch, lengths, cfg.grad_accum, rt.rank, rt.world_size),
                micro_loss(model, objective, step_items(items, batch, group_ids, dro), batch, cfg,
                           pad_id, rt.device, group_ids if tracked else None, tracked, heads),
                max_grad_norm=cfg.max_grad_norm, step=step + 1, run=run, scheduler=sched)
            metric_sums, group_losses = split_group_sums(out.metric_sums)
            if dro is not None:
                dro.update(group_losses)
            step += 1
            run.meter.step(samples=len(batch), tokens=sum(lengths[i] for i in batch))
            if step % cfg.log_every == 0 or step == total_steps:
                run.log_metrics(step, {"loss": out.loss, "grad_norm": out.grad_norm,
                                       "lr": lr, "epoch": sampler.epoch,
                                       **step_metrics(metric_sums, len(batch)),
                                       **{f"group_loss/{g}": v for g, v in group_losses.items()},
                                       **({f"group_weight/{g}": dro.weight_of(g)
                                           for g in dro.groups} if dro is not None else {})})
            improved = False
            if eval_items and evaluation_due(step, total_steps, cfg.eval_every):
                figures, stats_scores = held_out_figures()
                run.log_metrics(step, {k: v for k, v in figures.items() if isinstance(v, float)})
                improved = cfg.eval_every > 0 and best.update(step, figures["eval_loss"],
                                                              figures)
            if improved or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint(step)
            show(step, f"loss {out.loss:.3f}")
            if best.should_stop:
                log.info("rm: no lower eval loss in %d evaluations; stopping at step %d (best: "
                         "step %s)", best.evals_since_best, step, best.best_step)
                break

    if eval_items and not figures:  # resumed after the last step: evaluate what was saved
        figures, stats_scores = held_out_figures()
    if best.best_step is not None and best.best_step != step:
        restore_weights(run.checkpoints_dir / f"step-{best.best_step}",
                        models={"reward": model})
        stats_scores = None
    stats_items, source = (eval_items, "eval") if eval_items else (items, "train")
    if stats_scores is None:
        with rt.autocast():
            stats_scores, _ = split_length_head(score_all(
                model, stats_items, pad_id, rt.device, cfg.eval_batch_size, rt), cfg)
    if cfg.length_debias:  # model/ keeps the reward heads only
        inner = rt.unwrap(model)
        inner.score = drop_length_head(score_head(inner))
        model_config: Any = inner.config
        model_config.num_labels = cfg.ensemble
    stats = {**reward_stats(stats_scores), "source": source, "max_length": cfg.max_length,
             "max_prompt_length": cfg.max_prompt_length}
    rt.save_model(model, tokenizer, run.model_dir, merge_lora=cfg.merge_lora)
    if rt.is_main:
        _write_stats(run.model_dir, stats)
    return run.write_summary({
        **figures, **best.summary(), **ceiling, "objective": objective_name,
        "ensemble": cfg.ensemble, "train_comparisons": len(items),
        "eval_source": ("eval_data" if cfg.eval_data else "eval_fraction" if eval_items
                        else None),
        "dropped_flagged": n_read - len(items),
        "reward_mean": stats["mean"], "reward_std": stats["std"],
        **({"groups": group_figures(cfg, items, group_ids, groups, dro, eval_items,
                                    stats_scores if eval_items else [], head_groups)}
           if tracked else {})})
