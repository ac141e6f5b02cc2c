"""Whose preferences? Measurements of annotator groups, pure numpy: no store, no model.

A reward model trained on pooled feedback serves the majority: a group that is small, or whose
taste differs, can be outvoted without anyone noticing. These functions make that visible:

- ``group_alpha``: Krippendorff's alpha *within* each group (do its members agree?);
- ``agreement_matrix``: for every two groups (and each group with itself), the chance that a
  judgment by one and a judgment by the other, by different annotators, give the same verdict on
  the same pair of answers; the diagonal is within-group agreement, so a row that drops off the
  diagonal shows a group whose taste differs;
- ``group_counts``: annotators and judgments per group, and the group that falls behind.

Every rate comes with a percentile bootstrap interval over its pair units. The per-group figures
of trained models (accuracy, training-weight share, ``primary_group``) live in ``metrics``,
which the trainers may import (this module reads judgments, which they may not).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rewardloop.feedback import agreement as A
from rewardloop.feedback.records import JudgmentRecord, pair_values
from rewardloop.metrics import GROUP_N_BOOT as N_BOOT
from rewardloop.metrics import UNGROUPED, ratio_ci

Unit = tuple[int, int, int]  # (task_id, smaller response id, larger response id)


def _unit_values(records: Sequence[JudgmentRecord]
                 ) -> dict[str, dict[Unit, list[tuple[str | None, int]]]]:
    """group -> pair unit -> [(annotator, value)] over the group's judgments."""
    out: dict[str, dict[Unit, list[tuple[str | None, int]]]] = defaultdict(
        lambda: defaultdict(list))
    for rec in records:
        for g in rec.groups or (UNGROUPED,):
            for (lo, hi), value in pair_values(rec.ranking).items():
                out[g][(rec.task_id, lo, hi)].append((rec.annotator, value))
    return out


def group_alpha(records: Sequence[JudgmentRecord], *, n_boot: int = N_BOOT, seed: int = 0
                ) -> dict[str, dict[str, Any]]:
    """Per group: Krippendorff's alpha (nominal) of its members' judgments, with a bootstrap
    interval over pair units, and the number of units two or more members judged."""
    out = {}
    for g, units in sorted(_unit_values(records).items()):
        counts = A.value_counts({u: [v for _, v in vals] for u, vals in units.items()
                                 if len(vals) >= 2})
        alpha = A.krippendorff_alpha_counts(counts)
        ci = None
        if alpha is not None:
            rng = np.random.default_rng(seed)
            boots = [A.krippendorff_alpha_counts(counts[rng.integers(0, len(counts),
                                                                      size=len(counts))])
                     for _ in range(n_boot)]
            kept = [b for b in boots if b is not None]
            if kept:
                ci = [float(np.quantile(kept, 0.025)), float(np.quantile(kept, 0.975))]
        out[g] = {"alpha": alpha, "alpha_ci": ci, "units": len(counts)}
    return out


def _pair_agreement(a: Sequence[tuple[str | None, int]], b: Sequence[tuple[str | None, int]]
                    ) -> tuple[int, int]:
    """(agreeing, all) pairs of one judgment from ``a`` and one from ``b`` by different
    annotators (an unnamed judgment is never paired with itself: it appears once)."""
    agree = total = 0
    for i, (name_a, va) in enumerate(a):
        for j, (name_b, vb) in enumerate(b):
            if a is b and i >= j:
                continue
            if name_a is not None and name_a == name_b:
                continue
            total += 1
            agree += int(va == vb)
    return agree, total


def agreement_matrix(records: Sequence[JudgmentRecord], *, n_boot: int = N_BOOT, seed: int = 0
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """matrix[g1][g2]: share of agreeing verdicts over all pairs (one judgment of g1, one of g2,
    different annotators, same pair unit), with a bootstrap interval over units and the number
    of units. The diagonal is within-group agreement. Cells without a shared unit are left out."""
    by_group = _unit_values(records)
    names = sorted(by_group)
    out: dict[str, dict[str, dict[str, Any]]] = {g: {} for g in names}
    for x, g1 in enumerate(names):
        for g2 in names[x:]:
            agree, total = [], []
            for unit in set(by_group[g1]) & set(by_group[g2]):
                a, n = _pair_agreement(by_group[g1][unit], by_group[g2][unit])
                if n:
                    agree.append(a)
                    total.append(n)
            if not total:
                continue
            cell = {"agreement": float(sum(agree) / sum(total)),
                    "agreement_ci": ratio_ci(np.array(agree), np.array(total), n_boot=n_boot,
                                             seed=seed),
                    "units": len(total)}
            out[g1][g2] = cell
            out[g2][g1] = cell
    return out


def group_measures(records: Sequence[JudgmentRecord], *, seed: int = 0) -> dict[str, Any]:
    """The group measurements of ``rewardloop quality --json`` (``groups`` section): per group
    its annotators, judgments and alpha (with interval), and the agreement matrix."""
    annotators: dict[str, set[str]] = defaultdict(set)
    judgments: dict[str, int] = defaultdict(int)
    for rec in records:
        for g in rec.groups or (UNGROUPED,):
            judgments[g] += 1
            if rec.annotator is not None:
                annotators[g].add(rec.annotator)
    alphas = group_alpha(records, seed=seed)
    per_group = {g: {"annotators": len(annotators[g]), "judgments": judgments[g],
                     **alphas.get(g, {"alpha": None, "alpha_ci": None, "units": 0})}
                 for g in sorted(judgments)}
    return {"by_group": per_group, "agreement_matrix": agreement_matrix(records, seed=seed)}


def group_counts(members: Mapping[str, Sequence[str]], judged_by: Sequence[str | None],
                 lag_share: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per group: registered ``annotators`` (``members``: annotator -> groups), ``judgments``
    (one entry of ``judged_by`` per judgment: its annotator) and ``lagging``: the group has
    fewer than ``lag_share`` of an equal share of the judgments (total / groups), so new work
    should go to it. Judgments whose annotator has no group count under ``UNGROUPED``, which
    is no group of people: it takes no part in the equal share (60 imported judgments must not
    mark every real group behind) and is never lagging; its ``annotators`` are the named people
    of no group who judged (as ``quality`` counts them)."""
    annotators: dict[str, int] = defaultdict(int)
    for groups in members.values():
        for g in groups:
            annotators[g] += 1
    ungrouped = {n for n in judged_by if n is not None and not members.get(n)}
    if ungrouped:
        annotators[UNGROUPED] = len(ungrouped)
    judgments: dict[str, int] = {g: 0 for g in annotators}
    for name in judged_by:
        for g in (members.get(name) or (UNGROUPED,)) if name is not None else (UNGROUPED,):
            judgments[g] = judgments.get(g, 0) + 1
    real = {g: n for g, n in judgments.items() if g != UNGROUPED}
    fair = sum(real.values()) / len(real) if real else 0.0
    return {g: {"annotators": annotators.get(g, 0), "judgments": n,
                "lagging": g != UNGROUPED and fair > 0 and n < lag_share * fair}
            for g, n in sorted(judgments.items())}
