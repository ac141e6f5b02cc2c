"""Writing imported records into the store a chunk at a time, with few statements per chunk.

An import of 200k rows must neither hold 200k rows of ORM objects nor pay a query per row. So
each chunk of records costs a handful of statements: one ``IN (...)`` lookup per table for what
already exists, then one multi-row INSERT (with RETURNING where ids are needed) per table. Only
ids and hashes of the chunk stay in memory. Everything runs inside the caller's transaction, so
an error in a later chunk still rolls back the earlier ones. Rows written by earlier chunks are
visible to later lookups in that transaction, which is how repeats across chunks are found.

A comparison is a repeat when its content key is stored (an earlier import), and also when a
judgment in the store already says it: the same annotator's ranking of the same answers on the
same dimension, whatever its source (judgments made through the server carry the client's key,
so an export imported back is found only this way). That costs one more lookup per chunk, for
the chunk's prompts that were in the store before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from rewardloop.data.prepared import Driver, Prepared
from rewardloop.data.records import (
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    Text,
    UnpairedRecord,
    response_text,
)
from rewardloop.data.schema import (
    Annotator,
    ComparisonTask,
    Judgment,
    Prompt,
    Rating,
    Response,
    TaskItem,
    utcnow,
)
from rewardloop.data.values import IMPORT_KEY_PREFIX, content_hash

SKIP_IDENTICAL = "pairs whose chosen and rejected answers are identical"


@dataclass
class ImportReport:
    """What an import did. ``records`` counts records read (UltraFeedback rows give several)."""

    path: str
    format: str
    records: int = 0
    imported: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    created: Counter[str] = field(default_factory=Counter)


@dataclass
class _Comparison:
    """A judgment to write: answers in task order and the ranking as groups of indices."""

    prompt: Text
    answers: list[Text]
    groups: list[list[int]]
    key: str
    models: Sequence[str | None]
    fields: dict[str, Any]
    shown_order: list[int] | None = None  # indices into ``answers``


# What a judgment says: (annotator id, ranking as groups of response ids, dimension). Response
# ids are per prompt and text, and a ranking names each of its task's answers, so this also
# fixes the prompt and the answers.
Said = tuple[int | None, tuple[frozenset[int], ...], str | None]


def _said(annotator_id: int | None, ranking: Sequence[Sequence[int]],
          meta: dict[str, Any] | None) -> Said:
    # Order inside a tie group says nothing, as in judgment_key.
    return annotator_id, tuple(frozenset(g) for g in ranking), (meta or {}).get("dimension")


def _key(kind: str, parts: Any) -> str:
    return f"{IMPORT_KEY_PREFIX}{kind}:{content_hash(parts)}"


Digest = Callable[[Text], str]


def judgment_key(prompt: Text, answers: Sequence[Text], groups: list[list[int]],
                 annotator: str | None, dimension: str | None = None,
                 digest: Digest = content_hash) -> str:
    """Content key of an imported judgment; the dimension only enters when there is one, so
    keys of files without dimensions stay what they were."""
    # Order inside a tie group does not change what was said, so it does not change the key.
    hashed = [sorted(digest(answers[i]) for i in group) for group in groups]
    parts: list[Any] = [digest(prompt), hashed, annotator]
    return _key("judgment", parts + [dimension] if dimension else parts)


def pair_groups(r: PairRecord) -> list[list[int]]:
    return [[0, 1]] if r.tie else [[0], [1]]


def record_key(r: Record, digest: Digest = content_hash) -> str | None:
    """The idempotency key of a record that becomes a judgment or rating (else None)."""
    if isinstance(r, PairRecord):
        if digest(r.chosen) == digest(r.rejected):
            return None
        return judgment_key(r.prompt, [r.chosen, r.rejected], pair_groups(r), r.annotator,
                            r.dimension, digest)
    if isinstance(r, RankingRecord):
        return judgment_key(r.prompt, r.responses, r.ranking, r.annotator, r.dimension, digest)
    if isinstance(r, UnpairedRecord):
        return _key("rating", [digest(r.prompt), digest(r.completion), r.label, r.annotator])
    return None


def _same(rows: list[dict[str, Any]], *keys: str) -> dict[str, Any]:
    """The ``keys`` whose value is the same in every row, taken out of the rows: a shared value
    is encoded once, not once a row (JSON ``{}`` and ``null`` for plain-text data)."""
    shared = {}
    for key in keys:
        first = rows[0][key]
        if all(row[key] == first for row in rows):
            shared[key] = first
            for row in rows:
                del row[key]
    return shared


def _judgment_meta(r: PairRecord | RankingRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if r.dimension:
        meta["dimension"] = r.dimension
    if r.both_bad:
        meta["both_bad"] = True
    return meta


def _insert(table: Any, columns: str, returning: bool = False) -> Prepared:
    statement = insert(table).values({c: bindparam(c) for c in columns.split()})
    return Prepared(statement.returning(table.c.id) if returning else statement)


# Every column with a Python-side default is given: prepared statements do not apply them.
_PROMPT = _insert(Prompt.__table__, "text messages external_id meta content_hash created_at",
                  returning=True)
_RESPONSE = _insert(Response.__table__, "prompt_id text messages model gen_settings meta "
                    "content_hash created_at", returning=True)
_TASK = _insert(ComparisonTask.__table__, "prompt_id batch_id kind overlap is_gold priority "
                "n_judgments done external_id meta created_at", returning=True)
_ITEM = _insert(TaskItem.__table__, "task_id response_id position")
_JUDGMENT = _insert(Judgment.__table__, "task_id annotator_id ranking margin idempotency_key "
                    "source external_id meta created_at strength rationale time_ms "
                    "guideline_version shown_order")
_RATING = _insert(Rating.__table__, "response_id annotator_id label idempotency_key source "
                  "external_id created_at")


class Importer:
    """Writes chunks of records through one session; ``report`` counts what it did."""

    def __init__(self, session: Session, report: ImportReport, batch_id: int | None,
                 source: str) -> None:
        self.s, self.report, self.batch_id, self.source = session, report, batch_id, source
        # Writes go through prepared statements on the session's own driver connection (same
        # transaction): SQLAlchemy's per-row cost, not SQLite's, bounded an import's speed.
        self.db = Driver(session)
        self.annotators: dict[str, int] = {}
        self.hashes: dict[str, str] = {}  # text -> content hash, for one chunk

    def digest(self, value: Text) -> str:
        """``content_hash`` remembered for the current chunk: a pair's texts are hashed for
        its key, its prompt and its responses, and a prompt repeats across rows."""
        if not isinstance(value, str):
            return content_hash(value)
        found = self.hashes.get(value)
        if found is None:
            found = self.hashes[value] = content_hash(value)
        return found

    def _new_ids(self, statement: Prepared, rows: list[dict[str, Any]],
                 shared: dict[str, Any]) -> list[int]:
        """Insert ``rows`` one statement each (RETURNING gives no row order for a multi-row
        INSERT); on the driver connection each costs a few microseconds. ``shared`` values
        are the same for every row and encoded once."""
        return statement.first_column(self.db, rows, {**shared, "created_at": utcnow()})

    # -- rows that need ids ---------------------------------------------------------------

    def _prompts(self, wanted: Sequence[tuple[Text, str | None, dict[str, Any]]]
                 ) -> tuple[dict[str, int], set[str]]:
        """Ids of these prompts by content hash (created when new), and the hashes created."""
        first: dict[str, tuple[Text, str | None, dict[str, Any]]] = {}
        for item in wanted:
            first.setdefault(self.digest(item[0]), item)
        ids: dict[str, int] = {}
        for h, i, ext, meta in self.s.execute(
                select(Prompt.content_hash, Prompt.id, Prompt.external_id, Prompt.meta)
                .where(Prompt.content_hash.in_(list(first)))):
            ids[h] = i
            self._fill_prompt(i, ext, meta, first[h][1], first[h][2])
        new: list[dict[str, Any]] = [{"text": None if isinstance(v, list) else v,
                "messages": v if isinstance(v, list) else None, "external_id": ext,
                "meta": dict(meta), "content_hash": digest}
               for digest, (v, ext, meta) in first.items() if digest not in ids]
        if new:
            ids.update(zip([r["content_hash"] for r in new],
                           self._new_ids(_PROMPT, new, _same(new, "messages", "meta")),
                           strict=True))
            self.report.created["prompts"] += len(new)
        return ids, {row["content_hash"] for row in new}

    def _fill_prompt(self, prompt_id: int, ext: str | None, meta: dict[str, Any] | None,
                     given_ext: str | None, given_meta: dict[str, Any]) -> None:
        """A prompt already stored without an id or meta takes the ones this file gives (a
        prompts file imported after the judgments on its prompts); what it has is kept."""
        values: dict[str, Any] = {}
        if ext is None and given_ext is not None:
            values["external_id"] = given_ext
        if not meta and given_meta:
            values["meta"] = dict(given_meta)
        if values:
            self.s.execute(update(Prompt).where(Prompt.id == prompt_id).values(**values))
            self.report.created["prompt ids or meta filled"] += 1

    def _responses(self, wanted: Sequence[tuple[int, Text, str | None]]
                   ) -> tuple[dict[tuple[int, str], int], set[tuple[int, str]]]:
        """Ids of (prompt id, answer) responses, created when new, and the ones created."""
        first: dict[tuple[int, str], tuple[Text, str | None]] = {}
        for prompt_id, value, model in wanted:
            first.setdefault((prompt_id, self.digest(value)), (value, model))
        query = select(Response.prompt_id, Response.content_hash, Response.id,
                       Response.model).where(
            Response.prompt_id.in_({p for p, _ in first}),
            Response.content_hash.in_({h for _, h in first}))
        ids: dict[tuple[int, str], int] = {}
        for p, h, i, stored_model in self.s.execute(query):
            if (p, h) not in first:
                continue
            ids[(p, h)] = i
            given = first[(p, h)][1]
            if stored_model is None and given is not None:  # the model that wrote it, now known
                self.s.execute(update(Response).where(Response.id == i).values(model=given))
                self.report.created["response models filled"] += 1
        new: list[dict[str, Any]] = [{"prompt_id": p, "text": response_text(v),
                "messages": v if isinstance(v, list) else None, "model": model,
                "content_hash": h}
               for (p, h), (v, model) in first.items() if (p, h) not in ids]
        if new:
            shared = {"gen_settings": {}, "meta": {}, **_same(new, "messages")}
            ids.update(zip([(r["prompt_id"], r["content_hash"]) for r in new],
                           self._new_ids(_RESPONSE, new, shared), strict=True))
            self.report.created["responses"] += len(new)
        return ids, {(row["prompt_id"], row["content_hash"]) for row in new}

    def annotator(self, name: str | None) -> int | None:
        if name is None:
            return None
        if name not in self.annotators:
            found = self.s.scalar(select(Annotator.id).where(Annotator.name == name))
            if found is None:
                found = self.s.scalar(insert(Annotator).values(
                    name=name, kind="import", role="annotator").returning(Annotator.id))
                self.report.created["annotators"] += 1
            assert found is not None  # RETURNING of a row just inserted
            self.annotators[name] = found
        return self.annotators[name]

    # -- one chunk ------------------------------------------------------------------------

    def add(self, records: Sequence[Record]) -> None:
        """Import one chunk: prompts/candidates, comparisons and ratings, skipping repeats."""
        self.hashes.clear()
        keys = [record_key(r, self.digest) for r in records]
        existing = self._existing_keys(keys)
        comparisons: list[_Comparison] = []
        ratings: list[tuple[UnpairedRecord, str]] = []
        for record, key in zip(records, keys, strict=True):
            if isinstance(record, PromptRecord | CandidatesRecord):
                continue
            if key is None:  # a pair whose two answers are the same text says nothing
                skipped = self.report.skipped
                skipped[SKIP_IDENTICAL] = skipped.get(SKIP_IDENTICAL, 0) + 1
            elif key in existing:
                self.report.duplicates += 1
            else:
                existing.add(key)
                if isinstance(record, UnpairedRecord):
                    ratings.append((record, key))
                elif isinstance(record, PairRecord | RankingRecord):
                    comparisons.append(self._comparison(record, key))
        self._add_plain([r for r in records if isinstance(r, PromptRecord | CandidatesRecord)])
        added = self._add_comparisons(comparisons)
        self._add_ratings(ratings)
        self.report.imported += added + len(ratings)

    def _existing_keys(self, keys: Sequence[str | None]) -> set[str]:
        wanted = sorted({k for k in keys if k})
        found: set[str] = set()
        if wanted:
            for model in (Judgment, Rating):
                found.update(self.s.scalars(select(model.idempotency_key)
                                            .where(model.idempotency_key.in_(wanted))))
        return found

    def _comparison(self, r: PairRecord | RankingRecord, key: str) -> _Comparison:
        fields = {"annotator_id": self.annotator(r.annotator), "margin": r.margin,
                  "external_id": r.id, "meta": _judgment_meta(r), "strength": r.strength,
                  "rationale": r.rationale, "time_ms": r.time_ms,
                  "guideline_version": r.guideline_version}
        if isinstance(r, RankingRecord):
            return _Comparison(r.prompt, r.responses, r.ranking, key,
                               r.models or [None] * len(r.responses), fields, r.shown_order)
        return _Comparison(r.prompt, [r.chosen, r.rejected], pair_groups(r), key,
                           r.models or [None, None], fields)

    def _add_plain(self, records: Sequence[PromptRecord | CandidatesRecord]) -> None:
        """Prompts and candidate answers; a row counts as imported when it added anything."""
        if not records:
            return
        prompt_ids, new_prompts = self._prompts([(r.prompt, r.id, getattr(r, "meta", {}))
                                                 for r in records])
        answers = [(prompt_ids[self.digest(r.prompt)], text, model)
                   for r in records if isinstance(r, CandidatesRecord)
                   for text, model in zip(r.responses, r.models or [None] * len(r.responses),
                                          strict=True)]
        _, new_answers = self._responses(answers) if answers else ({}, set())
        for r in records:
            digest = self.digest(r.prompt)
            created = digest in new_prompts
            new_prompts.discard(digest)  # a prompt repeated later in the chunk is not new then
            if isinstance(r, CandidatesRecord):
                pid = prompt_ids[digest]
                mine = {(pid, self.digest(t)) for t in r.responses} & new_answers
                new_answers -= mine
                created = created or bool(mine)
            self.report.imported += created
            self.report.duplicates += not created

    def _judged(self, prompt_ids: set[int], annotator_ids: set[int | None]) -> set[Said]:
        """What the store's judgments by these annotators on these prompts say, whatever their
        source."""
        if not prompt_ids:
            return set()
        who = [Judgment.annotator_id.in_({a for a in annotator_ids if a is not None})]
        if None in annotator_ids:
            who.append(Judgment.annotator_id.is_(None))
        rows = self.s.execute(
            select(Judgment.annotator_id, Judgment.ranking, Judgment.meta)
            .join(ComparisonTask, ComparisonTask.id == Judgment.task_id)
            .where(ComparisonTask.prompt_id.in_(prompt_ids), or_(*who)))
        return {_said(*row) for row in rows}

    def _add_comparisons(self, items: Sequence[_Comparison]) -> int:
        """Tasks (overlap 1, already done), their items, and one judgment each; a comparison
        that a judgment in the store already says (the same annotator's ranking of the same
        answers on the same dimension) is counted as a duplicate. Returns how many were added.
        """
        if not items:
            return 0
        prompt_ids, new_prompts = self._prompts([(c.prompt, None, {}) for c in items])
        pids = [prompt_ids[self.digest(c.prompt)] for c in items]
        answer_ids, _ = self._responses([(pid, a, m) for pid, c in zip(pids, items, strict=True)
                                         for a, m in zip(c.answers, c.models, strict=True)])
        said = self._judged({i for h, i in prompt_ids.items() if h not in new_prompts},
                            {c.fields["annotator_id"] for c in items})
        fresh: list[tuple[int, list[int], _Comparison]] = []
        for pid, c in zip(pids, items, strict=True):
            ids = [answer_ids[(pid, self.digest(a))] for a in c.answers]
            says = _said(c.fields["annotator_id"], [[ids[i] for i in g] for g in c.groups],
                         c.fields["meta"])
            if says in said:
                self.report.duplicates += 1
            else:
                said.add(says)
                fresh.append((pid, ids, c))
        if fresh:
            self._write_comparisons(fresh)
        return len(fresh)

    def _write_comparisons(self, items: Sequence[tuple[int, list[int], _Comparison]]) -> None:
        """(prompt id, answer ids, comparison) each as a done task and its judgment."""
        task_ids = self._new_ids(_TASK, [
            {"prompt_id": pid, "kind": "pairwise" if len(c.answers) == 2 else "ranking",
             "external_id": c.fields["external_id"]} for pid, _, c in items],
            {"batch_id": self.batch_id, "overlap": 1, "is_gold": False, "priority": 0.0,
             "n_judgments": 1, "done": True, "meta": {}})
        task_items, judgments = [], []
        for task_id, (_, ids, c) in zip(task_ids, items, strict=True):
            task_items += [{"task_id": task_id, "response_id": rid, "position": i}
                           for i, rid in enumerate(ids)]
            judgments.append({"task_id": task_id, "ranking": [[ids[i] for i in g]
                                                              for g in c.groups],
                              "shown_order": None if c.shown_order is None
                              else [ids[i] for i in c.shown_order],
                              "idempotency_key": c.key, **c.fields})
        _ITEM.run_many(self.db, task_items)
        _JUDGMENT.run_many(self.db, judgments, {"created_at": utcnow(), "source": self.source,
                                                **_same(judgments, "meta")})
        self.report.created["tasks"] += len(items)
        self.report.created["judgments"] += len(items)

    def _add_ratings(self, items: Sequence[tuple[UnpairedRecord, str]]) -> None:
        if not items:
            return
        prompt_ids, _ = self._prompts([(r.prompt, None, {}) for r, _ in items])
        pids = [prompt_ids[self.digest(r.prompt)] for r, _ in items]
        answer_ids, _ = self._responses([(pid, r.completion, None)
                                         for pid, (r, _) in zip(pids, items, strict=True)])
        now = utcnow()
        _RATING.run_many(self.db, [
            {"response_id": answer_ids[(pid, self.digest(r.completion))],
             "annotator_id": self.annotator(r.annotator), "label": r.label,
             "idempotency_key": key, "source": self.source, "external_id": r.id,
             "created_at": now}
            for pid, (r, key) in zip(pids, items, strict=True)])
        self.report.created["ratings"] += len(items)
