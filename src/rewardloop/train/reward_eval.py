"""Held-out figures of a reward model: accuracy, calibration, per-annotator and per-group
accuracy, length correlation, and the reward statistics saved next to the weights."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rewardloop.metrics import expected_calibration_error, pair_credit
from rewardloop.train.comparisons import OBJECTIVES, Comparison, score_comparisons
from rewardloop.train.configs import RewardConfig
from rewardloop.train.runtime import Runtime

log = logging.getLogger(__name__)

LENGTH_CORRELATION_WARNING = 0.5
"""|Pearson r| of held-out reward and answer length above which the run warns."""


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


def standardized(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each head's scores over all answers to mean 0 / std 1: a --group-heads model's reward is
    the mean of its heads so normalised (``score.RewardScorer`` does it with the stats that
    ``reward_stats`` saves from these scores), the groups' equal mix."""
    flat = torch.cat(list(scores))  # (N, H)
    mean, std = flat.mean(0), flat.std(0, unbiased=False).clamp(min=1e-8)
    return [(s - mean) / std for s in scores]


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
