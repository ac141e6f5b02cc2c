"""Figures for the admin dashboard, kept simple: progress, counts, raw pairwise agreement
between annotators who judged the same task, gold accuracy, position bias and recent activity.

Agreement and gold accuracy are computed on *pair units*: each unordered pair of responses in
a task gets a value from each judgment (which one won, or a tie), so a ranking of k answers
counts k(k-1)/2 times. ``feedback.quality`` has the chance-corrected statistics.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.orm import Session

from rewardloop.data.schema import Annotator, Batch, ComparisonTask, Judgment
from rewardloop.feedback.audience import open_aimed_labels
from rewardloop.feedback.groups import group_counts
from rewardloop.feedback.records import pair_values
from rewardloop.feedback.tasks import batch_progress

RECENT = 20


def _ratio(hits: float, n: float) -> float | None:
    return round(hits / n, 4) if n else None


Votes = dict[int, list[tuple[str, dict[tuple[int, int], int]]]]


UNKNOWN = "(unknown)"
"""Where the admin page counts judgments without an annotator (imported, or of a deleted
account): counted, but several of them are not one person, so they have no agreement."""


def _agreement(by_task: Votes) -> tuple[dict[str, list[int]], list[int]]:
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = [0, 0]
    for judged in by_task.values():
        for (name_a, va), (name_b, vb) in combinations(judged, 2):
            for unit in va.keys() & vb.keys():
                same = int(va[unit] == vb[unit])
                for name in (name_a, name_b):
                    if name != UNKNOWN:  # judgments of nobody known: no one's agreement
                        per[name][0] += same
                        per[name][1] += 1
                total[0] += same
                total[1] += 1
    return per, total


def _groups(session: Session, members: dict[str, list[str]], judged_by: list[str | None]
            ) -> dict[str, dict[str, Any]]:
    """The Groups card: ``group_counts`` plus ``aimed_open``, the labels still wanted by open
    tasks aimed at the group (``generate --for-groups``), i.e. work only it can do."""
    if not members:
        return {}
    aimed = open_aimed_labels(session)
    return {g: {**c, "aimed_open": aimed.get(g, 0)}
            for g, c in group_counts(members, judged_by).items()}


def _judgment_rows(session: Session) -> list[tuple[Any, ...]]:
    """(task_id, annotator_id, ranking, shown_order, gold_ranking) of every judgment, oldest
    first: plain columns, the JSON ones decoded here (SQLAlchemy's JSON type costs more than
    the decoding itself, at 200k judgments a second)."""
    query = (select(Judgment.task_id, Judgment.annotator_id,
                    cast(Judgment.ranking, Text),
                    cast(Judgment.shown_order, Text),
                    cast(ComparisonTask.gold_ranking, Text))
             .join(ComparisonTask, ComparisonTask.id == Judgment.task_id)
             .order_by(Judgment.id))
    loads = json.loads
    return [(task_id, aid, loads(ranking), loads(shown) if shown else None,
             loads(gold) if gold else None)
            for task_id, aid, ranking, shown, gold in session.execute(query)]


def admin_stats(session: Session) -> dict[str, Any]:
    """Everything the admin page and ``GET /api/admin/stats`` show."""
    people = {aid: name for aid, name in session.execute(select(Annotator.id, Annotator.name))}
    rows = _judgment_rows(session)
    by_task: Votes = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    gold: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    first_wins = [0, 0]
    judged_by: list[str | None] = []
    for task_id, annotator_id, ranking, shown_order, gold_ranking in rows:
        known = people.get(annotator_id) if annotator_id is not None else None
        judged_by.append(known)
        name = known or UNKNOWN
        values = pair_values(ranking)
        counts[name] += 1
        by_task[task_id].append((name, values))
        if gold_ranking:
            truth = pair_values(gold_ranking)
            gold[name][0] += sum(values.get(u) == v for u, v in truth.items())
            gold[name][1] += len(truth)
        top = ranking[0]
        if shown_order and len(top) == 1:  # ties say nothing about position
            first_wins[0] += int(top[0] == shown_order[0])
            first_wins[1] += 1
    per_agree, total_agree = _agreement(by_task)
    batches = session.scalars(select(Batch).order_by(Batch.id)).all()
    members = {a.name: [str(g) for g in a.groups]
               for a in session.scalars(select(Annotator)) if a.groups}
    recent = session.execute(
        select(Judgment.created_at, Annotator.name, Judgment.task_id, Judgment.time_ms)
        .outerjoin(Annotator, Annotator.id == Judgment.annotator_id)
        .order_by(Judgment.id.desc()).limit(RECENT)).all()
    return {
        "judgments": len(rows),
        "progress": batch_progress(session),
        "batches": [batch_progress(session, b) for b in batches],
        "annotators": [
            {"name": name, "judgments": n,
             "agreement": _ratio(*per_agree[name]) if name in per_agree else None,
             "gold_accuracy": _ratio(*gold[name]) if name in gold else None}
            for name, n in sorted(counts.items())],
        "agreement": _ratio(*total_agree),
        "agreement_pairs": total_agree[1],
        "gold_accuracy": _ratio(sum(g[0] for g in gold.values()), sum(g[1] for g in gold.values())),
        "position_bias": _ratio(*first_wins),
        "position_bias_n": first_wins[1],
        "groups": _groups(session, members, judged_by),
        "recent": [
            {"at": r.created_at.isoformat(), "annotator": r.name, "task_id": r.task_id,
             "time_ms": r.time_ms} for r in recent],
    }
