"""Reading the store back as records: what exports write and what trainers consume.

Judgments come out in insertion order. A judgment's ranking is mapped from response ids to
indices into its task's answers (in task order), so a ranking record reads exactly like the
file row it was imported from.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from rewardloop.data.formats import (
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Text,
    UnpairedRecord,
)
from rewardloop.data.schema import (
    Annotator,
    Batch,
    ComparisonTask,
    Judgment,
    Prompt,
    Rating,
    Response,
    TaskItem,
    ranking_pairs,
)
from rewardloop.data.store import Store
from rewardloop.data.values import length_stats
from rewardloop.errors import UserError

_CHUNK = 500


def stored_value(row: Prompt | Response) -> Text:
    """The stored text or chat list, exactly as it was given."""
    return row.messages if row.messages is not None else row.text  # type: ignore[return-value]


# -- records -------------------------------------------------------------------------------------


def _judgments(s: Session, batch: str | None) -> Iterator[Judgment]:
    """Judgments in insertion order with their task, items, prompt and annotator loaded."""
    task = selectinload(Judgment.task)
    query = select(Judgment).order_by(Judgment.id).options(
        task.selectinload(ComparisonTask.items).selectinload(TaskItem.response),
        task.selectinload(ComparisonTask.prompt), selectinload(Judgment.annotator))
    if batch is not None:
        batch_id = s.scalar(select(Batch.id).where(Batch.name == batch))
        if batch_id is None:
            raise UserError(f"--batch: no batch named {batch!r}")
        query = query.join(Judgment.task).where(ComparisonTask.batch_id == batch_id)
    yield from s.scalars(query.execution_options(yield_per=_CHUNK))


def _ranked(j: Judgment) -> tuple[Text, list[Text], list[list[int]]]:
    """(prompt, answers in task order, ranking as groups of indices into the answers)."""
    items = j.task.items
    index = {item.response_id: i for i, item in enumerate(items)}
    groups = [[index[rid] for rid in (g if isinstance(g, list) else [g])] for g in j.ranking]
    return stored_value(j.task.prompt), [stored_value(item.response) for item in items], groups


def _dimension_filter(dimensions: set[str | None], dimension: str | None) -> None:
    named = sorted(d for d in dimensions if d)
    if dimension is None and len(named) > 1:
        raise UserError(f"the judgments are on several dimensions ({', '.join(named)}); "
                        "choose one with --dimension")
    if dimension is not None and dimension not in named:
        raise UserError(f"--dimension {dimension}: no judgments on it (the store has "
                        f"{', '.join(named) or 'none with a dimension'})")


def _how(j: Judgment) -> dict[str, Any]:
    """What a judgment says besides its ranking, as record fields."""
    meta = j.meta or {}
    return {"annotator": j.annotator.name if j.annotator else None, "id": j.external_id,
            "margin": j.margin, "dimension": meta.get("dimension"),
            "both_bad": bool(meta.get("both_bad")), "strength": j.strength,
            "rationale": j.rationale, "time_ms": j.time_ms,
            "guideline_version": j.guideline_version}


def _shown(j: Judgment) -> list[int] | None:
    """The order the answers were shown in, as indices into the task's answers."""
    index = {item.response_id: i for i, item in enumerate(j.task.items)}
    shown = j.shown_order or []
    if sorted(index.get(rid, -1) for rid in shown) != list(range(len(index))):
        return None  # not recorded (imported), or not a whole order of these answers
    return [index[rid] for rid in shown]


def load_rankings(store: Store, *, batch: str | None = None, dimension: str | None = None
                  ) -> list[RankingRecord]:
    """Every judgment as a ranking of its task's answers (ties kept), oldest first, with all
    it holds (models, margin, dimension, strength, rationale, time, shown order, guidelines);
    ``dimension`` as in :func:`load_pairs`."""
    return list(iter_rankings(store, batch=batch, dimension=dimension))


def iter_rankings(store: Store, *, batch: str | None = None, dimension: str | None = None
                  ) -> Iterator[RankingRecord]:
    """``load_rankings`` one at a time, read in chunks (memory stays flat: exports). The
    dimension check comes after the last row: a writer must not keep what it wrote before."""
    with store.read() as s:
        dimensions: set[str | None] = set()
        for j in _judgments(s, batch):
            dimensions.add((j.meta or {}).get("dimension"))
            if dimension is not None and (j.meta or {}).get("dimension") != dimension:
                continue
            prompt, answers, groups = _ranked(j)
            models = [item.model or item.response.model for item in j.task.items]
            yield RankingRecord(prompt, answers, groups, **_how(j),
                                models=models if any(models) else None, shown_order=_shown(j))
        _dimension_filter(dimensions, dimension)


def load_pairs(store: Store, *, batch: str | None = None, dimension: str | None = None
               ) -> list[PairRecord]:
    """Every judgment as pairs (a k-way ranking gives all its pairs); ties have ``tie=True``.

    Judgments made on a named dimension (PKU-SafeRLHF's ``better``/``safer``) carry it; when
    the store holds several, ``dimension`` must pick one. Model names come from the responses;
    each pair carries its judgment's margin, strength, rationale, time and guideline version.
    """
    return list(iter_pairs(store, batch=batch, dimension=dimension))


def iter_pairs(store: Store, *, batch: str | None = None, dimension: str | None = None
               ) -> Iterator[PairRecord]:
    """``load_pairs`` one at a time, as ``iter_rankings``."""
    with store.read() as s:
        dimensions: set[str | None] = set()
        for j in _judgments(s, batch):
            meta = j.meta or {}
            dimensions.add(meta.get("dimension"))
            if dimension is not None and meta.get("dimension") != dimension:
                continue
            prompt, answers, groups = _ranked(j)
            models = [item.model or item.response.model for item in j.task.items]
            how = _how(j)
            yield from (PairRecord(
                prompt, answers[a], answers[b], tie=tie, **how,
                models=[models[a], models[b]] if models[a] or models[b] else None)
                for a, b, tie in ranking_pairs(groups))
        _dimension_filter(dimensions, dimension)


def load_unpaired(store: Store) -> list[UnpairedRecord]:
    """Every thumbs-up/down rating (ratings with only a score are left out), oldest first."""
    return list(iter_unpaired(store))


def iter_unpaired(store: Store) -> Iterator[UnpairedRecord]:
    """``load_unpaired`` one at a time, read in chunks."""
    with store.read() as s:
        names: dict[int | None, str] = dict(s.execute(select(Annotator.id, Annotator.name)).all())
        query = (select(Rating).where(Rating.label.is_not(None)).order_by(Rating.id)
                 .options(selectinload(Rating.response).selectinload(Response.prompt)))
        for r in s.scalars(query.execution_options(yield_per=_CHUNK)):
            yield UnpairedRecord(stored_value(r.response.prompt), stored_value(r.response),
                                 bool(r.label), names.get(r.annotator_id), r.external_id)


def load_prompts(store: Store) -> list[PromptRecord]:
    return list(iter_prompts(store))


def iter_prompts(store: Store) -> Iterator[PromptRecord]:
    """Every prompt, oldest first, read in chunks."""
    with store.read() as s:
        query = select(Prompt).order_by(Prompt.id).execution_options(yield_per=_CHUNK)
        for p in s.scalars(query):
            yield PromptRecord(stored_value(p), p.external_id, dict(p.meta or {}))


def load_candidates(store: Store) -> list[CandidatesRecord]:
    """Each prompt that has answers, with their texts and models, oldest first."""
    return list(iter_candidates(store))


def iter_candidates(store: Store) -> Iterator[CandidatesRecord]:
    """``load_candidates`` one at a time, read in chunks."""
    with store.read() as s:
        query = (select(Prompt).order_by(Prompt.id).options(selectinload(Prompt.responses))
                 .execution_options(yield_per=_CHUNK))
        for p in s.scalars(query):
            responses = sorted(p.responses, key=lambda r: r.id)
            if responses:
                models = [r.model for r in responses]
                yield CandidatesRecord(stored_value(p), [r.text for r in responses],
                                       models if any(models) else None, p.external_id)


# -- stats -------------------------------------------------------------------------------------


def _per_annotator(s: Session) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for model, column in ((Judgment, "judgments"), (Rating, "ratings")):
        query = (select(Annotator.name, func.count(model.id)).select_from(model)
                 .outerjoin(Annotator, model.annotator_id == Annotator.id)
                 .group_by(Annotator.name))
        for name, n in s.execute(query):
            row = totals.setdefault(name or "(unknown)", {"judgments": 0, "ratings": 0})
            row[column] = n
    return dict(sorted(totals.items()))


def stats(store: Store) -> dict[str, Any]:
    """Counts, per-annotator totals, response lengths (chars/words) and the tie rate."""
    tables = {"prompts": Prompt, "responses": Response, "batches": Batch,
              "tasks": ComparisonTask, "judgments": Judgment, "ratings": Rating,
              "annotators": Annotator}
    with store.read() as s:
        counts = {name: s.scalar(select(func.count()).select_from(model)) or 0
                  for name, model in tables.items()}
        by_source = dict(s.execute(select(Judgment.source, func.count())
                                   .group_by(Judgment.source)).all())
        annotators = _per_annotator(s)
        # Streamed: the lengths are kept, not the texts (100k answers held 300 MB at once).
        chars, words = [], []
        for text in s.scalars(select(Response.text).execution_options(yield_per=2000)):
            chars.append(len(text))
            words.append(len(text.split()))
        tied = judged = 0
        for ranking in s.scalars(select(Judgment.ranking).execution_options(yield_per=5000)):
            judged += 1
            tied += any(isinstance(g, list) and len(g) > 1 for g in ranking)
    return {
        "counts": counts,
        "judgments_by_source": dict(sorted(by_source.items())),
        "annotators": annotators,
        "response_length": length_stats(chars=chars, words=words),
        "tie_rate": tied / judged if judged else None,
    }
