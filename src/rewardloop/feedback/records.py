"""Judgments as plain records for quality analysis, and their pair values.

A record carries what the statistics need and nothing that ties them to the ORM, so
``feedback.quality.analyze`` runs on records built by hand just as well as on the store's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rewardloop.data.schema import (
    Annotator,
    Batch,
    ComparisonTask,
    Judgment,
    Response,
    TaskItem,
    ranking_pairs,
)
from rewardloop.errors import UserError
from rewardloop.feedback.agreement import HI, LO, TIE


@dataclass(frozen=True)
class JudgmentRecord:
    """One judgment: who gave it, on which task, what they ranked and what they were shown."""

    judgment_id: int
    annotator: str | None
    """Annotator name; None for imported judgments without one (they still count in alpha)."""
    groups: tuple[str, ...]
    task_id: int
    kind: str
    ranking: Sequence[Sequence[int]]
    """Groups of response ids, best first (a group of 2+ is a tie)."""
    shown_order: Sequence[int] | None = None
    """Response ids in the order shown (first = left/top); None when not recorded."""
    gold_ranking: Sequence[Sequence[int]] | None = None
    """The task's known answer when it is a gold task."""
    lengths: Mapping[int, int] = field(default_factory=dict)
    """Characters of each response of the task, by response id."""


def pair_values(ranking: Sequence[Sequence[int]]) -> dict[tuple[int, int], int]:
    """Value of each unordered pair (smaller id, larger id) in a ranking: LO, HI or TIE."""
    if len(ranking) == 2 and len(ranking[0]) == 1 and len(ranking[1]) == 1:  # most: a pair
        better, worse = ranking[0][0], ranking[1][0]
        return {(better, worse): LO} if better < worse else {(worse, better): HI}
    out = {}
    for better, worse, tie in ranking_pairs([list(g) for g in ranking]):
        lo, hi = sorted((better, worse))
        out[(lo, hi)] = TIE if tie else (LO if better == lo else HI)
    return out


def load_records(session: Session, batch: str | None = None) -> list[JudgmentRecord]:
    """All judgments (of tasks in ``batch`` when given) as records, oldest first. Plain
    columns, each annotator read once: loading an ORM object per judgment, task and annotator
    was a quarter of `quality` at 200k judgments."""
    query = (select(Judgment.id, Judgment.annotator_id, Judgment.ranking, Judgment.shown_order,
                    ComparisonTask.id, ComparisonTask.kind, ComparisonTask.is_gold,
                    ComparisonTask.gold_ranking)
             .join(ComparisonTask, ComparisonTask.id == Judgment.task_id)
             .order_by(Judgment.id))
    if batch is not None:
        batch_id = session.scalar(select(Batch.id).where(Batch.name == batch))
        if batch_id is None:
            raise UserError(f"--batch: no batch named {batch!r} in the store")
        query = query.where(ComparisonTask.batch_id == batch_id)
    rows = session.execute(query).all()
    people = {aid: (name, tuple(str(g) for g in (groups or []))) for aid, name, groups in
              session.execute(select(Annotator.id, Annotator.name, Annotator.groups))}
    task_ids = sorted({row[4] for row in rows})
    lengths: dict[int, dict[int, int]] = {t: {} for t in task_ids}
    for start in range(0, len(task_ids), 500):
        chunk = task_ids[start:start + 500]
        for task_id, rid, n in session.execute(
                select(TaskItem.task_id, Response.id, func.length(Response.text))
                .join(Response, Response.id == TaskItem.response_id)
                .where(TaskItem.task_id.in_(chunk))):
            lengths[task_id][rid] = int(n)
    nobody: tuple[str | None, tuple[str, ...]] = (None, ())
    records = []
    for jid, aid, ranking, shown, task_id, kind, is_gold, gold in rows:
        name, groups = people.get(aid, nobody) if aid is not None else nobody
        records.append(JudgmentRecord(
            judgment_id=jid, annotator=name, groups=groups, task_id=task_id, kind=kind,
            ranking=ranking, shown_order=shown, gold_ranking=gold if is_gold else None,
            lengths=lengths[task_id]))
    return records

