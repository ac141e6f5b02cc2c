"""Moving preference data between files and the store: import and export.

An import is one write transaction: the whole file is read and validated first, then written,
so a bad row anywhere leaves the store untouched. Content already in the store, or repeated in
the file, is counted and skipped; every imported judgment and rating carries an idempotency key
derived from its content (prompt, answers, order, annotator), so importing a file twice is a
no-op. Comparisons become a Prompt, its Responses, a ComparisonTask (overlap 1, done) and one
Judgment with ``source="import"``; KTO rows become Ratings; prompts/candidates rows become
prompts and responses, ready for ``tasks create``.

Exports write back what was imported, row for row, in insertion order (the records come from
:mod:`rewardloop.data.load`, which trainers use too; ``stats`` is re-exported from there).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rewardloop.data import formats
from rewardloop.data.formats import (
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    Text,
    UnpairedRecord,
)
from rewardloop.data.load import (
    load_candidates,
    load_pairs,
    load_prompts,
    load_rankings,
    load_unpaired,
    stats,
)
from rewardloop.data.schema import (
    SOURCES,
    Annotator,
    AuditEvent,
    Batch,
    ComparisonTask,
    Judgment,
    Prompt,
    Rating,
    Response,
    TaskItem,
    content_hash,
)
from rewardloop.data.store import Store
from rewardloop.data.values import IMPORT_KEY_PREFIX
from rewardloop.errors import UserError

__all__ = ["EXPORTABLE", "IMPORTABLE", "ExportReport", "ImportReport", "export", "import_file",
           "stats"]

log = logging.getLogger(__name__)

COMPARISON_FORMATS = ("trl", "ranking", "hh", "ultrafeedback")
IMPORTABLE = (*COMPARISON_FORMATS, "kto", "prompts", "candidates")
EXPORTABLE = ("trl", "ranking", "hh", "kto", "prompts", "candidates")
SKIP_IDENTICAL = "pairs whose chosen and rejected answers are identical"
SKIP_TIES = "tied pairs (the format cannot express a tie)"
_CHUNK = 500  # rows per flush and per IN (...) query


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
class ExportReport:
    path: str
    format: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def _key(kind: str, parts: Any) -> str:
    return f"{IMPORT_KEY_PREFIX}{kind}:{content_hash(parts)}"


def _judgment_key(prompt: Text, answers: Sequence[Text], groups: list[list[int]],
                  annotator: str | None) -> str:
    # Order inside a tie group does not change what was said, so it does not change the key.
    hashed = [sorted(content_hash(answers[i]) for i in group) for group in groups]
    return _key("judgment", [content_hash(prompt), hashed, annotator])


def _rating_key(r: UnpairedRecord) -> str:
    parts = [content_hash(r.prompt), content_hash(r.completion), r.label, r.annotator]
    return _key("rating", parts)


class _Importer:
    """Get-or-create helpers over one session, with caches so each row costs few queries."""

    def __init__(self, session: Session, report: ImportReport, batch: Batch | None,
                 source: str) -> None:
        self.s, self.report, self.batch, self.source = session, report, batch, source
        self.prompts: dict[str, Prompt] = {}
        self.responses: dict[tuple[str, str], Response] = {}
        self.annotators: dict[str, Annotator] = {}
        self.seen: set[str] = set()
        self.pending: list[tuple[ComparisonTask, list[Response], list[list[int]],
                                dict[str, Any]]] = []

    def new(self, key: str, existing: set[str]) -> bool:
        """False (and counted as a duplicate) when ``key`` is in the store or earlier rows."""
        if key in existing or key in self.seen:
            self.report.duplicates += 1
            return False
        self.seen.add(key)
        return True

    def prompt(self, value: Text, external_id: str | None = None,
               meta: dict[str, Any] | None = None) -> tuple[Prompt, bool]:
        digest = content_hash(value)
        row = self.prompts.get(digest)
        if row is None:
            row = self.s.scalars(select(Prompt).where(Prompt.content_hash == digest)).first()
        created = row is None
        if row is None:
            chat = isinstance(value, list)
            row = Prompt(text=None if chat else value, messages=value if chat else None,
                         external_id=external_id, meta=dict(meta or {}), content_hash=digest)
            self.s.add(row)
            self.report.created["prompts"] += 1
        self.prompts[digest] = row
        return row, created

    def response(self, prompt: Prompt, value: Text, model: str | None = None
                 ) -> tuple[Response, bool]:
        digest = content_hash(value)
        cache_key = (prompt.content_hash, digest)
        row = self.responses.get(cache_key)
        if row is None and prompt.id is not None:  # a prompt made in this import has none yet
            row = self.s.scalars(select(Response).where(
                Response.prompt_id == prompt.id, Response.content_hash == digest)).first()
        created = row is None
        if row is None:
            chat = isinstance(value, list)
            row = Response(prompt=prompt, text=formats.response_text(value),
                           messages=value if chat else None, model=model, content_hash=digest)
            self.s.add(row)
            self.report.created["responses"] += 1
        self.responses[cache_key] = row
        return row, created

    def annotator(self, name: str | None) -> Annotator | None:
        if name is None:
            return None
        row = self.annotators.get(name)
        if row is None:
            row = self.s.scalars(select(Annotator).where(Annotator.name == name)).first()
        if row is None:
            row = Annotator(name=name, kind="import", role="annotator")
            self.s.add(row)
            self.s.flush()  # ratings refer to it by id
            self.report.created["annotators"] += 1
        self.annotators[name] = row
        return row

    def judgment(self, prompt: Text, answers: list[Text], groups: list[list[int]], key: str,
                 *, margin: float | None, annotator: str | None, external_id: str | None) -> None:
        """Queue a task with one judgment; it is written once its responses have ids."""
        p, _ = self.prompt(prompt)
        responses = [self.response(p, a)[0] for a in answers]
        task = ComparisonTask(
            prompt=p, batch=self.batch, kind="pairwise" if len(answers) == 2 else "ranking",
            overlap=1, n_judgments=1, done=True, external_id=external_id,
            items=[TaskItem(response=r, position=i) for i, r in enumerate(responses)])
        self.s.add(task)
        fields = {"annotator": self.annotator(annotator), "margin": margin,
                  "idempotency_key": key, "external_id": external_id}
        self.pending.append((task, responses, groups, fields))
        self.report.created["tasks"] += 1
        if len(self.pending) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        """Give queued rows their ids, then add each queued judgment, ranking in response ids."""
        self.s.flush()
        for task, responses, groups, fields in self.pending:
            ranking = [[responses[i].id for i in group] for group in groups]
            self.s.add(Judgment(task=task, ranking=ranking, source=self.source, **fields))
            self.report.created["judgments"] += 1
        self.s.flush()
        self.pending.clear()


# -- import ------------------------------------------------------------------------------------


def _pair_groups(r: PairRecord) -> list[list[int]]:
    return [[0, 1]] if r.tie else [[0], [1]]


def _record_key(r: Record) -> str | None:
    """The idempotency key of a record that becomes a judgment or rating (else None)."""
    if isinstance(r, PairRecord):
        if content_hash(r.chosen) == content_hash(r.rejected):
            return None
        return _judgment_key(r.prompt, [r.chosen, r.rejected], _pair_groups(r), r.annotator)
    if isinstance(r, RankingRecord):
        return _judgment_key(r.prompt, r.responses, r.ranking, r.annotator)
    if isinstance(r, UnpairedRecord):
        return _rating_key(r)
    return None


def _existing_keys(s: Session, keys: Sequence[str | None]) -> set[str]:
    wanted = sorted({k for k in keys if k})
    found: set[str] = set()
    for model in (Judgment, Rating):
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i:i + _CHUNK]
            found.update(s.scalars(select(model.idempotency_key)
                                   .where(model.idempotency_key.in_(chunk))))
    return found


def _import_prompt(imp: _Importer, r: PromptRecord) -> bool:
    return imp.prompt(r.prompt, r.id, r.meta)[1]


def _import_candidates(imp: _Importer, r: CandidatesRecord) -> bool:
    p, created = imp.prompt(r.prompt, r.id)
    models = r.models or [None] * len(r.responses)
    made = [imp.response(p, text, model)[1] for text, model in zip(r.responses, models,
                                                                    strict=True)]
    return created or any(made)


def _import_rating(imp: _Importer, r: UnpairedRecord, key: str) -> None:
    p, _ = imp.prompt(r.prompt)
    response, _ = imp.response(p, r.completion)
    annotator = imp.annotator(r.annotator)
    imp.s.add(Rating(response=response, annotator_id=annotator.id if annotator else None,
                     label=r.label, idempotency_key=key, source=imp.source, external_id=r.id))
    imp.report.created["ratings"] += 1


def _import_one(imp: _Importer, r: Record, key: str | None, existing: set[str]) -> None:
    report = imp.report
    if isinstance(r, PromptRecord | CandidatesRecord):
        created = _import_prompt(imp, r) if isinstance(r, PromptRecord) else (
            _import_candidates(imp, r))
        report.imported += created
        report.duplicates += not created
        return
    if key is None:  # a pair whose two answers are the same text says nothing
        report.skipped[SKIP_IDENTICAL] = report.skipped.get(SKIP_IDENTICAL, 0) + 1
        return
    if not imp.new(key, existing):
        return
    if isinstance(r, UnpairedRecord):
        _import_rating(imp, r, key)
    elif isinstance(r, RankingRecord):
        imp.judgment(r.prompt, r.responses, r.ranking, key, margin=None, annotator=r.annotator,
                     external_id=r.id)
    elif isinstance(r, PairRecord):
        imp.judgment(r.prompt, [r.chosen, r.rejected], _pair_groups(r), key, margin=r.margin,
                     annotator=r.annotator, external_id=r.id)
    report.imported += 1


def _batch(s: Session, name: str, report: ImportReport) -> Batch:
    row = s.scalars(select(Batch).where(Batch.name == name)).first()
    if row is None:
        row = Batch(name=name)
        s.add(row)
        report.created["batches"] += 1
    return row


def import_file(store: Store, path: str | Path, fmt: str | None = None, *,
                batch: str | None = None, source: str = "import") -> ImportReport:
    """Import a JSONL file into ``store`` in one transaction; ``fmt=None`` detects the format.

    Raises DataError/UserError (nothing written) on any bad row, an unimportable format, or a
    ``batch`` for a file that holds no comparisons.
    """
    if source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    fmt = formats.detect_format(path) if fmt is None else formats.check_format(fmt)
    if fmt not in IMPORTABLE:
        raise UserError(f"{path}: {fmt} files hold training examples, not feedback; give them "
                        f"to `rewardloop train {fmt} --data FILE` instead of importing them")
    fmt, records = formats.read_records(path, fmt)
    if batch is not None and fmt not in COMPARISON_FORMATS:
        raise UserError(f"--batch groups comparison tasks; a {fmt} file has none "
                        f"(batches apply to {', '.join(COMPARISON_FORMATS)})")
    report = ImportReport(str(path), fmt, records=len(records))
    with store.write() as s:
        imp = _Importer(s, report, _batch(s, batch, report) if batch else None, source)
        keys = [_record_key(r) for r in records]
        existing = _existing_keys(s, keys)
        for record, key in zip(records, keys, strict=True):
            _import_one(imp, record, key, existing)
        imp.flush()
        s.add(AuditEvent(action="data.import", payload={
            "path": str(path), "format": fmt, "batch": batch, "imported": report.imported,
            "duplicates": report.duplicates, "created": dict(report.created)}))
    log.info("imported %s (%s): %d new, %d duplicates", path, fmt, report.imported,
             report.duplicates)
    return report


# -- export ------------------------------------------------------------------------------------


def export(store: Store, fmt: str, path: str | Path, *, batch: str | None = None
           ) -> ExportReport:
    """Write the store's data as ``fmt`` (one of ``EXPORTABLE``), atomically.

    ``trl`` and ``hh`` cannot express ties: tied pairs are left out and counted in ``skipped``.
    ``batch`` limits comparison formats to one batch's judgments.
    """
    formats.check_format(fmt, EXPORTABLE)
    if batch is not None and fmt not in ("trl", "ranking", "hh"):
        raise UserError(f"--batch selects comparisons; it does not apply to {fmt} exports")
    report = ExportReport(str(path), fmt)
    records: list[Any]
    if fmt in ("trl", "hh"):
        pairs = load_pairs(store, batch=batch)
        records = [p for p in pairs if not p.tie]
        if len(records) < len(pairs):
            report.skipped[SKIP_TIES] = len(pairs) - len(records)
    elif fmt == "ranking":
        records = load_rankings(store, batch=batch)
    elif fmt == "kto":
        records = load_unpaired(store)
    else:
        records = load_prompts(store) if fmt == "prompts" else load_candidates(store)
    report.rows = formats.write_records(path, fmt, records)
    log.info("exported %d %s rows to %s", report.rows, fmt, path)
    return report
