"""Feedback quality: agreement, annotator reliability, bias and spam flags, group differences.

Everything is computed on *pair units* (one unordered pair of responses in one task, see
``feedback.agreement``): a ranking of k answers gives k(k-1)/2 pair values. ``load_records``
reads judgments from the store into plain records; ``analyze`` is a pure function of those
records, so research code can call it on anything.

Whom an annotator is compared with, and when a comparison is a flag (group-aware), is
``feedback.flags``; this module gathers the figures per annotator and reports them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from sqlalchemy import select

from rewardloop.ceiling import Ceiling, label_ceiling
from rewardloop.data.schema import Annotator
from rewardloop.data.store import Store
from rewardloop.feedback import agreement as A
from rewardloop.feedback.bias import BiasStats, bias_stats
from rewardloop.feedback.flags import (
    FLAGS,
    Peers,
    Thresholds,
    Unit,
    agreement,
    annotator_flags,
    group_agreement,
    group_length_rate,
)
from rewardloop.feedback.groups import group_measures
from rewardloop.feedback.records import JudgmentRecord, load_records, pair_values

_VOTE = {A.LO: 1, A.HI: -1, A.TIE: 0}  # pair value -> the ceiling's vote on (lo, hi)

__all__ = ["FLAGS", "AnnotatorQuality", "JudgmentRecord", "QualityReport", "Thresholds",
           "analyze", "annotator_weights", "annotators_from_db", "flagged_annotators",
           "load_records", "quality_report"]


@dataclass
class AnnotatorQuality:
    """Everything `quality` knows about one annotator (see docs/quality.md)."""

    name: str
    groups: tuple[str, ...]
    judgments: int
    compared: int = 0
    agreement: float | None = None
    """Agreement with everyone else's leave-one-out majority (the reported figure)."""
    chance_agreement: float | None = None
    peer_group: str | None = None
    """The annotator's group whose other members the agreement flags also compare with (the
    first of their groups whose others share ``min_compared`` pair units); None: none."""
    peer_agreement: float | None = None
    """Agreement with the majority of ``peer_group``'s other members."""
    length_peer_group: str | None = None
    """The group whose other members' longer-wins rate ``length_bias`` also compares with."""
    reliability: float | None = None
    gold_compared: int = 0
    gold_accuracy: float | None = None
    bias: BiasStats = field(default_factory=BiasStats)
    flags: list[str] = field(default_factory=list)


@dataclass
class QualityReport:
    krippendorff_alpha: float | None
    fleiss_kappa: float | None
    judgments: int
    annotators: dict[str, AnnotatorQuality]
    groups: dict[str, Any]
    ceiling: Ceiling = field(default_factory=lambda: Ceiling(None, 0, 0))
    """The label ceiling: the accuracy the best possible reward model could reach on these
    judgments (``rewardloop.ceiling``)."""

    def to_json(self) -> dict[str, Any]:
        """The ``rewardloop quality --json`` object."""
        return {
            "krippendorff_alpha": self.krippendorff_alpha,
            "fleiss_kappa": self.fleiss_kappa,
            "judgments": self.judgments,
            "annotators": {name: {
                "judgments": q.judgments, "agreement": q.agreement,
                "peer_group": q.peer_group, "peer_agreement": q.peer_agreement,
                "length_peer_group": q.length_peer_group,
                "reliability": q.reliability, "gold_accuracy": q.gold_accuracy,
                "position_bias_p": q.bias.position_p, "length_bias_p": q.bias.length_p,
                "flags": list(q.flags)} for name, q in sorted(self.annotators.items())},
            "groups": self.groups,
            **self.ceiling.to_json(),
        }


def _units(records: Sequence[JudgmentRecord]) -> dict[Unit, list[tuple[str | None, int]]]:
    units: dict[Unit, list[tuple[str | None, int]]] = defaultdict(list)
    for rec in records:
        for (lo, hi), value in pair_values(rec.ranking).items():
            units[(rec.task_id, lo, hi)].append((rec.annotator, value))
    return units


PRIOR_ACCURACY = 0.75
"""What an annotator's accuracy is believed to be before any of their judgments is checked
against others': people agree on about 63-77% of published RLHF pairs (InstructGPT ~73%),
experts ~80%. Dawid–Skene starts every annotator there, and an annotator who shares no unit
with anyone keeps it (``annotator_weights``), so checking an annotator never costs them weight
unless they disagree."""


def _reliability(records: Sequence[JudgmentRecord], units: Mapping[Unit, list]
                 ) -> dict[str, float]:
    """Dawid–Skene accuracy per named annotator, on units judged by 2+ named annotators."""
    shared = [u for u, vals in units.items() if sum(a is not None for a, _ in vals) >= 2]
    if not shared:
        return {}
    unit_index = {u: i for i, u in enumerate(shared)}
    names = sorted({a for u in shared for a, _ in units[u] if a is not None})
    ann_index = {n: i for i, n in enumerate(names)}
    obs = [(ann_index[a], unit_index[u], v) for u in shared for a, v in units[u] if a is not None]
    arr = np.array(obs, dtype=int)
    clamp = {}
    for rec in records:
        if rec.gold_ranking is not None:
            for (lo, hi), value in pair_values(rec.gold_ranking).items():
                if (rec.task_id, lo, hi) in unit_index:
                    clamp[unit_index[(rec.task_id, lo, hi)]] = value
    fit = A.dawid_skene(arr[:, 0], arr[:, 1], arr[:, 2], n_annotators=len(names),
                        n_units=len(shared), clamp=clamp, prior_accuracy=PRIOR_ACCURACY)
    return {n: float(fit.accuracy[i]) for n, i in ann_index.items()}


def _gold(recs: Iterable[JudgmentRecord]) -> tuple[int, int]:
    """(gold pair comparisons, correct ones) over an annotator's judgments of gold tasks."""
    n = correct = 0
    for rec in recs:
        if rec.gold_ranking is None:
            continue
        gold = pair_values(rec.gold_ranking)
        for pair, value in pair_values(rec.ranking).items():
            if pair in gold:
                n += 1
                correct += int(value == gold[pair])
    return n, correct


def _annotators(records: Sequence[JudgmentRecord], units: Mapping[Unit, list],
                th: Thresholds) -> dict[str, AnnotatorQuality]:
    by_name: dict[str, list[JudgmentRecord]] = defaultdict(list)
    for rec in records:
        if rec.annotator is not None:
            by_name[rec.annotator].append(rec)
    members: dict[str, set[str]] = defaultdict(set)
    for name, recs in by_name.items():
        for g in recs[0].groups:
            members[g].add(name)
    reliability = _reliability(records, units)
    biases = bias_stats(by_name, min_reference=th.min_judgments)
    out = {}
    for name, recs in sorted(by_name.items()):
        own = {(r.task_id, lo, hi): v
               for r in recs for (lo, hi), v in pair_values(r.ranking).items()}
        everyone = agreement(name, units, own)
        peer_group, group = group_agreement(name, recs[0].groups, members, units, own, th)
        length_group, group_rate = group_length_rate(name, recs[0].groups, members, biases, th)
        peers = Peers(everyone, group, (biases[name].length_reference,)
                      + (() if group_rate is None else (group_rate,)))
        gold_n, gold_correct = _gold(recs)
        out[name] = AnnotatorQuality(
            name=name, groups=recs[0].groups, judgments=len(recs), compared=everyone.compared,
            agreement=everyone.agreement, chance_agreement=everyone.chance,
            peer_group=peer_group, peer_agreement=group.agreement if group else None,
            length_peer_group=length_group, reliability=reliability.get(name),
            gold_compared=gold_n, gold_accuracy=gold_correct / gold_n if gold_n else None,
            bias=biases[name],
            flags=annotator_flags(biases[name], peers, gold_n, gold_correct, th))
    return out


def _group_view(records: Sequence[JudgmentRecord], top: int = 5) -> dict[str, Any]:
    """Per group: members and judgments; per pair of groups: agreement of majority verdicts on
    shared pair units, and how far their win rates for the same answer differ."""
    members: dict[str, set[str]] = defaultdict(set)
    counts: Counter[str] = Counter()
    # share[g][unit] = [wins of the smaller id (ties count half), votes]
    share: dict[str, dict[Unit, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for rec in records:
        for g in rec.groups:
            members[g].add(rec.annotator or "?")
            counts[g] += 1
            for (lo, hi), v in pair_values(rec.ranking).items():
                cell = share[g][(rec.task_id, lo, hi)]
                cell[0] += {A.LO: 1.0, A.TIE: 0.5, A.HI: 0.0}[v]
                cell[1] += 1
    pairs: dict[str, Any] = {}
    for g1, g2 in combinations(sorted(members), 2):
        shared = sorted(set(share[g1]) & set(share[g2]))
        if not shared:
            continue
        rate1 = np.array([share[g1][u][0] / share[g1][u][1] for u in shared])
        rate2 = np.array([share[g2][u][0] / share[g2][u][1] for u in shared])
        diff = np.abs(rate1 - rate2)
        worst = np.argsort(-diff, kind="stable")[:top]
        pairs[f"{g1} vs {g2}"] = {
            "units": len(shared),
            "agreement": float(np.mean(np.sign(rate1 - 0.5) == np.sign(rate2 - 0.5))),
            "mean_abs_win_rate_diff": float(diff.mean()),
            "top_disagreements": [
                {"task_id": shared[i][0], "a": shared[i][1], "b": shared[i][2],
                 f"win_rate_a_{g1}": float(rate1[i]), f"win_rate_a_{g2}": float(rate2[i])}
                for i in worst if diff[i] > 0],
        }
    return {"members": {g: {"annotators": sorted(m), "judgments": counts[g]}
                        for g, m in sorted(members.items())}, "pairs": pairs}


def analyze(records: Sequence[JudgmentRecord], thresholds: Thresholds | None = None
            ) -> QualityReport:
    """The full quality report of ``records`` (pure: no store access)."""
    th = thresholds or Thresholds()
    units = _units(records)
    alpha = A.krippendorff_alpha({u: [v for _, v in vals] for u, vals in units.items()})
    pairwise = {r.task_id for r in records if r.kind == "pairwise"}
    kappa = A.fleiss_kappa(A.value_counts(
        {u: [v for _, v in vals] for u, vals in units.items() if u[0] in pairwise}))
    return QualityReport(
        krippendorff_alpha=alpha, fleiss_kappa=kappa, judgments=len(records),
        annotators=_annotators(records, units, th),
        groups={**_group_view(records), **group_measures(records)},
        ceiling=label_ceiling((u, a, _VOTE[v]) for u, vals in units.items() for a, v in vals))


def _records_from(source: Any, batch: str | None) -> list[JudgmentRecord]:
    """Records from a Store (opens a read session) or from an open ORM session."""
    if hasattr(source, "read") and hasattr(source, "engine"):
        with source.read() as session:
            return load_records(session, batch)
    return load_records(source, batch)


def quality_report(source: Any, batch: str | None = None,
                   thresholds: Thresholds | None = None) -> QualityReport:
    """``analyze`` of the judgments in the store (``source``: a Store or an ORM session)."""
    return analyze(_records_from(source, batch), thresholds)


def reliability_weight(accuracy: float) -> float:
    """Training weight of a judgment by an annotator of this estimated accuracy: 2p - 1,
    clipped at 0. A coin-flipper (p = 0.5) carries no information and weighs 0, a perfect
    annotator weighs 1. Under symmetric label noise with flip rate 1 - p the expected label
    moves toward 1/2 by exactly this factor (E[y] - 1/2 = (2p - 1)(y - 1/2)), and so does the
    Bradley–Terry gradient where the model has no opinion yet (margin 0); elsewhere the
    factor is a heuristic, not the exact gradient ratio."""
    return max(0.0, 2.0 * accuracy - 1.0)


def annotator_weights(source: Any, batch: str | None = None) -> dict[str, float]:
    """Training weight per annotator name (``reliability_weight`` of the Dawid–Skene accuracy),
    for weighting judgments in reward-model training. An annotator who shares no pair unit with
    anyone has no estimate and weighs what the prior says (``PRIOR_ACCURACY``: 0.5), as much
    as a checked annotator with no evidence either way: avoiding the overlap does not pay."""
    return report_weights(quality_report(source, batch))


def report_weights(report: QualityReport) -> dict[str, float]:
    """``annotator_weights`` of a report already made (``analyze``)."""
    return {n: reliability_weight(PRIOR_ACCURACY if q.reliability is None else q.reliability)
            for n, q in report.annotators.items()}


def flagged_annotators(source: Any, batch: str | None = None,
                       thresholds: Thresholds | None = None,
                       flags: Iterable[str] = FLAGS) -> set[str]:
    """Names of annotators with any of ``flags`` (default: all), e.g. to drop their judgments."""
    wanted = set(flags)
    report = quality_report(source, batch, thresholds)
    return {n for n, q in report.annotators.items() if wanted & set(q.flags)}


def annotators_from_db(db: str, *, weights: bool, flagged: bool
                       ) -> tuple[dict[str, float] | None, set[str], dict[str, list[str]]]:
    """What the store at ``db`` knows about annotators, as plain data for reward-model training
    (``train.reward.train_rm``, which does not open the store itself): reliability weights (when
    ``weights``, else None), the flagged names (when ``flagged``, else none) and each
    annotator's groups."""
    store = Store(db, existing=True)
    try:
        with store.read() as session:
            groups = {a.name: [str(g) for g in a.groups]
                      for a in session.scalars(select(Annotator)) if a.groups}
        return (annotator_weights(store) if weights else None,
                flagged_annotators(store) if flagged else set(), groups)
    finally:
        store.dispose()
