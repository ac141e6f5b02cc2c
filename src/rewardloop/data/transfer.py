"""Moving preference data between files and the store: import and export.

An import is one write transaction, streamed a chunk of records at a time (:mod:`.bulk`): a bad
row anywhere rolls the whole transaction back, so it leaves the store untouched. Content already
in the store, or repeated in the file, is counted and skipped; every imported judgment and
rating carries an idempotency key derived from its content (prompt, answers, order, annotator,
dimension), so importing a file twice is a no-op, and a comparison that a judgment in the store
already says (the same annotator's ranking of the same answers, made through the server too)
is skipped, so an export imported back adds nothing. Comparisons become a Prompt, its Responses, a
ComparisonTask (overlap 1, done) and one Judgment with ``source="import"``; KTO rows become
Ratings; prompts/candidates rows become prompts and responses, ready for ``tasks create``.

Exports write back what was imported, row for row, in insertion order (the records come from
:mod:`rewardloop.data.load`, which trainers use too; ``stats`` is re-exported from there).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from rewardloop.data import formats
from rewardloop.data.bulk import SKIP_IDENTICAL, Importer, ImportReport
from rewardloop.data.load import (
    iter_candidates,
    iter_pairs,
    iter_prompts,
    iter_rankings,
    iter_unpaired,
    stats,
)
from rewardloop.data.records import Record
from rewardloop.data.schema import SOURCES, AuditEvent, Batch, ComparisonTask, Judgment
from rewardloop.data.store import Store
from rewardloop.errors import UserError

__all__ = ["EXPORTABLE", "IMPORTABLE", "SKIP_IDENTICAL", "ExportReport", "ImportReport",
           "export", "import_file", "stats"]

log = logging.getLogger(__name__)

COMPARISON_FORMATS = ("trl", "ranking", "hh", "ultrafeedback", "arena", "oasst", "shp",
                      "saferlhf-better", "saferlhf-safer")
IMPORTABLE = (*COMPARISON_FORMATS, "kto", "prompts", "candidates")
EXPORTABLE = ("trl", "ranking", "hh", "kto", "prompts", "candidates")
SKIP_TIES = ("tied pairs (TRL and HH readers take every row as a preference; --format ranking "
             "keeps ties, as does trl with --ties)")
_CHUNK = 500  # records per chunk: a few statements each (bulk.py)


@dataclass
class ExportReport:
    path: str
    format: str
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    zero_margins: int = 0
    """trl rows written with margin 0: no margin of their own, or tied, in an export where
    other pairs have one (TRL's RewardTrainer reads a margin column when there is one, and
    then needs a number in every row)."""


def _batch(s: Session, name: str, report: ImportReport) -> int:
    found = s.scalar(select(Batch.id).where(Batch.name == name))
    if found is None:
        found = s.scalar(insert(Batch).values(name=name).returning(Batch.id))
        report.created["batches"] += 1
    assert found is not None  # RETURNING of a row just inserted
    return found


def _chunks(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def _page_cache(s: Session) -> Iterator[None]:
    """A 64 MiB SQLite page cache for the import's connection, then the default again.

    An import inserts into unique indexes on content hashes, which are random: with SQLite's
    default 2 MiB cache, a large import spends much of its time re-reading index pages.
    """
    if s.get_bind().dialect.name != "sqlite":
        yield
        return
    before = s.execute(text("PRAGMA cache_size")).scalar()
    s.execute(text("PRAGMA cache_size = -65536"))
    try:
        yield
    finally:
        s.execute(text(f"PRAGMA cache_size = {int(before or -2000)}"))


def import_file(store: Store, path: str | Path, fmt: str | None = None, *,
                batch: str | None = None, source: str = "import", split: str | None = None
                ) -> ImportReport:
    """Import a file or dataset folder into ``store`` in one transaction, streamed by chunks.

    ``fmt=None`` detects the format; ``split`` picks a dataset folder's split. Raises
    DataError/UserError, with nothing written, on any bad row (the transaction is rolled
    back), an unimportable format, or a ``batch`` for data that holds no comparisons.
    """
    if source not in SOURCES:
        raise UserError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    fmt = formats.detect_format(path, split) if fmt is None else formats.check_format(fmt)
    if fmt not in IMPORTABLE:
        raise UserError(f"{path}: {fmt} files hold training examples, not feedback; give them "
                        f"to `rewardloop train {fmt} --data FILE` instead of importing them")
    if batch is not None and fmt not in COMPARISON_FORMATS:
        raise UserError(f"--batch groups comparison tasks; a {fmt} file has none "
                        f"(batches apply to {', '.join(COMPARISON_FORMATS)})")
    fmt, records = formats.iter_records(path, fmt, split)
    report = ImportReport(str(path), fmt)
    with store.write() as s, _page_cache(s):
        importer = Importer(s, report, _batch(s, batch, report) if batch else None, source)
        for chunk in _chunks(records, _CHUNK):
            report.records += len(chunk)
            importer.add(chunk)
        s.add(AuditEvent(action="data.import", payload={
            "path": str(path), "format": fmt, "batch": batch, "imported": report.imported,
            "duplicates": report.duplicates, "created": dict(report.created)}))
    log.info("imported %s (%s): %d new, %d duplicates", path, fmt, report.imported,
             report.duplicates)
    return report


# -- export ------------------------------------------------------------------------------------


def _any_margin(store: Store, batch: str | None) -> bool:
    """Whether any judgment (of ``batch``) has a margin."""
    query = select(Judgment.id).where(Judgment.margin.is_not(None))
    if batch is not None:
        query = query.join(ComparisonTask, ComparisonTask.id == Judgment.task_id).join(
            Batch, Batch.id == ComparisonTask.batch_id).where(Batch.name == batch)
    with store.read() as s:
        return s.scalar(query.limit(1)) is not None


def _export_records(store: Store, fmt: str, report: ExportReport, batch: str | None,
                    dimension: str | None, ties: bool) -> Generator[Any, None, None]:
    """The records to write, one at a time as the store is read (a JSONL export's memory stays
    flat); pairs the format cannot hold are counted in ``report.skipped`` as they pass."""
    if fmt in ("trl", "hh"):
        margins = fmt == "trl" and _any_margin(store, batch)
        for pair in iter_pairs(store, batch=batch, dimension=dimension):
            if fmt == "trl":
                problem = SKIP_TIES if pair.tie and not ties else None
            else:
                problem = SKIP_TIES if pair.tie else formats.hh_unwritable(pair)
            if problem is not None:
                report.skipped[problem] = report.skipped.get(problem, 0) + 1
            elif margins and (pair.margin is None or pair.tie):
                report.zero_margins += 1  # a tie prefers neither: its ranking's margin is moot
                yield replace(pair, margin=0.0)
            else:
                yield pair
    elif fmt == "ranking":
        yield from iter_rankings(store, batch=batch, dimension=dimension)
    elif fmt == "kto":
        yield from iter_unpaired(store)
    else:
        yield from iter_prompts(store) if fmt == "prompts" else iter_candidates(store)


def export(store: Store, fmt: str, path: str | Path, *, batch: str | None = None,
           dimension: str | None = None, hf_dataset: bool = False, ties: bool = False
           ) -> ExportReport:
    """Write the store's data as ``fmt`` (one of ``EXPORTABLE``), atomically.

    ``path`` is a JSONL, Parquet (``.parquet``) or Arrow (``.arrow``) file, or with
    ``hf_dataset`` a directory ``datasets.load_from_disk`` loads. ``ranking`` keeps everything
    a judgment says. TRL's trainers and HH readers take every row as a preference, so tied
    pairs are left out of ``trl`` (unless ``ties``: then they are written with ``tie: true``)
    and ``hh``, and pairs HH transcripts cannot hold are left out of ``hh``; both are counted
    in ``skipped``. ``batch`` limits comparison formats to one batch's judgments,
    ``dimension`` to one judged dimension.
    """
    formats.check_format(fmt, EXPORTABLE)
    for name, value in (("--batch", batch), ("--dimension", dimension)):
        if value is not None and fmt not in ("trl", "ranking", "hh"):
            raise UserError(f"{name} selects comparisons; it does not apply to {fmt} exports")
    if ties and fmt != "trl":
        raise UserError(f"--ties applies to trl exports ({fmt} rows "
                        f"{'keep ties anyway' if fmt == 'ranking' else 'cannot say tie'})")
    report = ExportReport(str(path), fmt)
    write = formats.write_dataset if hf_dataset else formats.write_records
    # closing: a writer that stops part-way (a bad row) ends the store's read there too.
    with closing(_export_records(store, fmt, report, batch, dimension, ties)) as rows:
        report.rows = write(path, fmt, rows)
    log.info("exported %d %s rows to %s", report.rows, fmt, path)
    return report
