"""Preference-data files: readers and writers for every format rewardloop speaks.

Rows come from JSONL, Parquet or Arrow files or dataset folders (:mod:`.sources`). Reading is
strict: the first problem stops it with a :class:`DataError` naming the file, the 1-based line
(JSONL) or row (columnar) and the field. Writing is atomic (temp file, fsync, rename) and every
format rewardloop writes reads back to equal records.

Formats (``FORMATS``) and the record each yields:

- ``prompts``: ``prompt`` (text or chat) or ``messages``; ``id``, ``meta`` -> :class:`PromptRecord`
- ``candidates``: ``prompt``, ``responses``, ``models`` -> :class:`CandidatesRecord`
- ``trl``: ``prompt``, ``chosen``, ``rejected`` (or chat lists without ``prompt``, the prompt then
  being their shared leading messages); ``margin``, ``annotator``, ``tie``, ``chosen_model``,
  ``rejected_model`` and the judgment fields -> :class:`PairRecord`
- ``ranking``: ``prompt``, ``responses``, ``ranking`` (groups of indices); ``models``,
  ``margin``, ``shown_order`` and the judgment fields -> :class:`RankingRecord`

  (judgment fields: ``dimension``, ``both_bad``, ``strength``, ``rationale``, ``time_ms``,
  ``guideline_version``)
- ``hh``: ``chosen``/``rejected`` whole HH-RLHF transcripts -> :class:`PairRecord`
- ``ultrafeedback``: ``prompt``/``instruction``, rated ``completions`` -> :class:`PairRecord`\\ s
  (read only: higher rating wins, margin = rating difference, equal ratings give no pair)
- ``kto``: ``prompt``, ``completion``, ``label`` -> :class:`UnpairedRecord`
- ``sft``: ``prompt`` + ``completion``, ``messages`` or ``text`` -> :class:`SFTRecord`
- ``arena``, ``oasst``, ``shp``, ``saferlhf-better``, ``saferlhf-safer``: published data sets
  in their owners' shapes (read only; see :mod:`rewardloop.data.shapes`)

Records, text types and chat accessors live in :mod:`rewardloop.data.records` and are re-exported
here. Optional fields are omitted when written empty; a null optional field reads as absent.
The ``prompts`` reader gives a text prompt whose row has chat answers as one user turn, as the
trainers tokenise it (see :mod:`rewardloop.tokenize`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rewardloop.data import _fields as F
from rewardloop.data.records import (
    CHAT_ROLES,
    CandidatesRecord,
    Chat,
    Message,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    SFTRecord,
    Text,
    UnpairedRecord,
    as_messages,
    completion_messages,
    hh_transcripts,
    hh_unwritable,
    is_chat,
    prompt_text,
    response_text,
)
from rewardloop.data.rows import PARSERS, ROW_WRITERS
from rewardloop.data.shapes import (
    stream_oasst,
)
from rewardloop.data.sources import COLUMNAR, Location, data_error, open_source, rows
from rewardloop.errors import DataError, UserError
from rewardloop.util.files import atomic_file

log = logging.getLogger(__name__)

__all__ = [
    "CHAT_ROLES", "FORMATS", "WRITABLE", "CandidatesRecord", "Chat", "Message", "PairRecord",
    "PromptRecord", "RankingRecord", "Record", "SFTRecord", "Text", "UnpairedRecord",
    "as_messages", "completion_messages", "detect_format", "hh_transcripts", "hh_unwritable",
    "is_chat",
    "iter_records", "prompt_text", "read_as", "read_records", "read_training_records",
    "response_text", "write_dataset", "write_records",
]

R = TypeVar("R")

Rows = Iterator[tuple[Location, dict[str, Any]]]
# Formats whose records need more than one row (a ranking of an oasst tree's siblings).
_STREAMS: dict[str, Callable[[Rows], Iterator[Record]]] = {"oasst": stream_oasst}
FORMATS: tuple[str, ...] = (*PARSERS, *_STREAMS)


# -- reading -----------------------------------------------------------------------------------


# A preference-format key makes a row a comparison even when another of its keys is missing:
# the row is then reported as missing that key, never read as a bare prompt.
_ROW_KEYS = (("completions", "ultrafeedback"), ("ranking", "ranking"),
             ("responses", "candidates"), ("label", "kto"), ("completion", "sft"),
             ("text", "sft"))
DETECT_ROWS = 100
"""Rows :func:`detect_format` reads: all of them must point to one format."""


def _guess(obj: dict[str, Any]) -> str | None:
    """The format a row's keys point to (None when they point nowhere)."""
    keys = set(obj)
    for shape, fmt in (({"model_a", "model_b", "winner"}, "arena"),
                       ({"message_id", "role", "text"}, "oasst"),
                       ({"score_A", "score_B"}, "shp"),
                       ({"better_response_id", "safer_response_id"}, "saferlhf-better")):
        if shape <= keys:
            return fmt
    if keys & {"chosen", "rejected"}:
        answer = obj.get("chosen", obj.get("rejected"))
        return "hh" if "prompt" not in keys and isinstance(answer, str) else "trl"
    for key, fmt in _ROW_KEYS:
        if key in keys:
            return fmt
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        # A conversation that ends with the assistant is SFT data; otherwise it awaits an answer.
        return "sft" if messages[-1].get("role") == "assistant" else "prompts"
    return "prompts" if "prompt" in keys else None


def _empty(name: str) -> DataError:
    return DataError("the input is empty: expected one object per line or row", path=name)


def _unit(where: Location) -> str:
    return f"{where.unit} {where.number}"


def detect_format(path: str | Path, split: str | None = None) -> str:
    """The format of a data file or folder, from the keys of its first ``DETECT_ROWS`` rows.

    They must all point to one format (a ``trl`` row without ``rejected`` still points to
    ``trl`` and is then reported as missing it); rows that point to different formats are a
    DataError naming both, so a broken file is never read as some other format.
    """
    source = open_source(path, split)
    stream = rows(source)
    first: tuple[Location, str] | None = None
    try:
        for where, obj in itertools.islice(stream, DETECT_ROWS):
            guess = _guess(obj)
            if first is None:
                if guess is None:
                    raise data_error(where, f"cannot tell the format from the keys "
                                     f"{sorted(obj)}; pass --format (one of {', '.join(FORMATS)})")
                first = (where, guess)
            elif guess is not None and guess != first[1]:
                raise data_error(where, f"looks like {guess} (keys {sorted(obj)}) but "
                                 f"{_unit(first[0])} like {first[1]}; the rows must be of one "
                                 f"format: fix the file or pass --format")
    finally:
        stream.close()
    if first is None:
        raise _empty(source.name)
    return first[1]


def check_format(fmt: str, known: Iterable[str] = FORMATS) -> str:
    """``fmt`` if it is one of ``known``, else a UserError listing them."""
    known = tuple(known)
    if fmt not in known:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(known)}")
    return fmt


def _parsed(parse: Callable[[dict[str, Any]], list[Record]], stream: Rows, fmt: str,
            name: str) -> Iterator[Record]:
    """The records of each row; rows that give none (an UltraFeedback row whose answers are all
    rated alike states no preference) are counted and said once the input ends."""
    empty = 0
    for where, obj in stream:
        try:
            records = parse(obj)
        except F.Invalid as exc:
            raise data_error(where, str(exc), exc.field) from None
        empty += not records
        yield from records
    if empty:
        log.warning("%s: %d %s rows gave no record (no two answers with different ratings or "
                    "texts: no preference)", name, empty, fmt)


def _counted(stream: Rows, name: str) -> Rows:
    """``stream``, raising the no-rows error once it ends without a row."""
    empty = True
    for item in stream:
        empty = False
        yield item
    if empty:
        raise _empty(name)


def iter_records(path: str | Path, fmt: str | None = None, split: str | None = None
                 ) -> tuple[str, Iterator[Record]]:
    """``(format, records)`` of any input :func:`open_source` takes, streamed row by row.

    ``fmt=None`` detects the format. The iterator raises DataError (file, line or row, field)
    at the first bad row, or at the end for an input with no rows.
    """
    source = open_source(path, split)
    fmt = detect_format(path, split) if fmt is None else check_format(fmt)
    stream = _counted(rows(source), source.name)
    if fmt in _STREAMS:
        return fmt, _STREAMS[fmt](stream)
    return fmt, _parsed(PARSERS[fmt], stream, fmt, source.name)


def read_records(path: str | Path, fmt: str | None = None, split: str | None = None
                 ) -> tuple[str, list[Record]]:
    """Read and validate a whole input: ``(format, records)``; see :func:`iter_records`.

    The one reader trainers and commands call: a JSONL, Parquet or Arrow file, a saved
    ``datasets`` directory or a Hub-style folder (``DIR:SPLIT`` picks a split).
    """
    fmt, records = iter_records(path, fmt, split)
    return fmt, list(records)


# What each published shape's records are, for trainers that choose a loss by record kind.
TRAINING_KIND = {"arena": "trl", "shp": "trl", "saferlhf-better": "trl", "saferlhf-safer": "trl",
                 "oasst": "ranking"}


def read_training_records(path: str | Path, fmt: str | None = None, split: str | None = None
                          ) -> tuple[str, list[Record]]:
    """:func:`read_records` for trainers: the format comes back as the kind of its records.

    A published shape (Arena, SHP, PKU-SafeRLHF pairs; oasst rankings) reads as ``trl`` or
    ``ranking``, so a trainer that accepts those accepts it too.
    """
    fmt, records = read_records(path, fmt, split)
    return TRAINING_KIND.get(fmt, fmt), records


def read_as(path: str | Path, fmt: str, cls: type[R]) -> list[R]:
    """The records of a file in format ``fmt``, typed as ``cls`` (the record class that format
    reads into, e.g. ``PromptRecord`` for ``prompts``)."""
    records = read_records(path, fmt)[1]
    wrong = next((r for r in records if not isinstance(r, cls)), None)
    if wrong is not None:
        raise TypeError(f"{fmt} rows read as {type(wrong).__name__}, not {cls.__name__}")
    return [r for r in records if isinstance(r, cls)]


# -- writing -----------------------------------------------------------------------------------


WRITABLE: tuple[str, ...] = tuple(ROW_WRITERS)


def _rows_of(fmt: str, records: Iterable[Record]) -> Iterator[dict[str, Any]]:
    cls, to_row = ROW_WRITERS[check_format(fmt, WRITABLE)]
    for record in records:
        if not isinstance(record, cls):
            raise TypeError(f"{fmt} rows are written from {cls.__name__}, "
                            f"got {type(record).__name__}")
        yield to_row(record)


def write_records(path: str | Path, fmt: str, records: Iterable[Record]) -> int:
    """Write ``records`` as ``fmt`` atomically (temp file, fsync, rename); returns the row count.

    A ``.parquet`` or ``.arrow`` path is written columnar, anything else as JSONL. A reader
    never sees a half-written file, and a failure leaves any old file in place.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist")
    if path.suffix in COLUMNAR:
        from rewardloop.data.columnar import write_table_file  # pyarrow: only when asked

        table_rows = list(_rows_of(fmt, records))
        write_table_file(path, table_rows)
        return len(table_rows)
    count = 0
    with atomic_file(path) as fh:
        for row in _rows_of(fmt, records):
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count


def write_dataset(path: str | Path, fmt: str, records: Iterable[Record]) -> int:
    """Write ``records`` as a directory ``datasets.load_from_disk`` loads; returns the rows."""
    from rewardloop.data.columnar import write_saved_dataset  # pyarrow: only when asked

    table_rows = list(_rows_of(fmt, records))
    write_saved_dataset(Path(path), table_rows)
    return len(table_rows)
