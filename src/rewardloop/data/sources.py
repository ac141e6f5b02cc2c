"""Where rows come from: JSONL, Parquet and Arrow files, and Hugging Face dataset folders.

Every reader of rewardloop data goes through :func:`open_source`, so each ``--data``,
``--prompts`` and ``data import`` accepts the same inputs:

- a ``.jsonl`` file (anything that is not Parquet or Arrow is read as JSONL, so ``.json`` files
  holding one object a line are too); a ``.gz`` name is read through gzip;
- a Parquet file (``.parquet``), read one record batch at a time;
- an Arrow IPC file or stream (``.arrow``, ``.feather``), memory-mapped, batch by batch;
- a ``datasets.save_to_disk`` directory: one dataset (``state.json`` + Arrow shards) or a
  DatasetDict (``dataset_dict.json`` + one directory per split);
- a Hub-style dataset folder: Parquet, Arrow, JSONL or JSON Lines ``.json`` files (optionally
  ``.gz``) anywhere below it. A file's split comes from its name when the name says it, as
  the Hub reads them: a shard ``{split}-00000-of-00002`` (any split name, ``train_prefs`` too)
  or a split word (``train``, ``test``, ``validation``, ...). Otherwise its directory is the
  split (``default/train/0000.parquet``), and at the top or in ``data/`` its name is.
  Directories above the split are subsets (``harmless-base/train.jsonl.gz``,
  ``askacademia/train.json``): a split is read from every subset, as ``datasets.load_dataset``
  reads such a folder; to read one subset, name its directory (``hh/harmless-base``).

A folder with several splits needs one chosen: ``--split NAME`` where a command has it, or
``DIR:NAME`` anywhere a path is taken. The ``datasets`` package is not needed: its saved
directories are Arrow streams plus JSON metadata, read here with pyarrow.

Rows are streamed: at most one record batch of a columnar file is in memory at a time. In
columnar rows a null is the same as an absent field (Arrow gives every row every column), so
nulls are dropped from objects before the rows reach the parsers.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardloop.data._fields import kind_of
from rewardloop.errors import DataError, UserError

log = logging.getLogger(__name__)

COLUMNAR = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}
_FOLDER_SUFFIXES = (".parquet", ".arrow", ".feather", ".jsonl", ".json", ".jsonl.gz",
                    ".json.gz")
# JSON files a dataset folder holds about itself, not rows.
_METADATA = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json",
                       "state.json"})
_BATCH_ROWS = 1024
# Split names as ``datasets`` allows them (train_prefs, test.clean), and the Hub's file names.
_SPLIT_NAME = re.compile(r"\w+(?:\.\w+)*")
_SHARD = re.compile(r"(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}(?:[-_.].*)?")
_SPLIT_WORDS = frozenset({"train", "training", "test", "testing", "validation", "valid", "val",
                          "dev", "eval", "evaluation"})
# A split word and a shard number (train_0, test.1, validation-00002), as datasets reads them.
_NUMBERED = re.compile(r"(?P<split>" + "|".join(sorted(_SPLIT_WORDS, key=len, reverse=True))
                       + r")[-._ ]?\d+", re.IGNORECASE)

__all__ = ["Location", "Source", "data_error", "open_source", "rows"]


@dataclass(frozen=True)
class Location:
    """A row's place for messages: ``file:line 5`` (JSONL) or ``file:row 5`` (columnar)."""

    path: str
    number: int
    unit: str = "line"


def data_error(where: Location, message: str, field: str | None = None) -> DataError:
    """The DataError for a problem at ``where``, naming file, line or row, and field."""
    if where.unit == "line":
        return DataError(message, path=where.path, line=where.number, field=field)
    return DataError(message, path=f"{where.path}:{where.unit} {where.number}", field=field)


@dataclass(frozen=True)
class Source:
    """The files one input names, in reading order, and what it is called in messages."""

    name: str
    files: tuple[Path, ...]


# -- resolving a path to files ----------------------------------------------------------------


def _split_spec(spec: str | Path, split: str | None) -> tuple[Path, str | None]:
    """``DIR:SPLIT`` -> (DIR, SPLIT) when the whole spec is not itself a path."""
    path = Path(spec)
    text = str(spec)
    if not path.exists() and ":" in text:
        head, _, tail = text.rpartition(":")
        if Path(head).is_dir() and _SPLIT_NAME.fullmatch(tail):
            if split is not None and split != tail:
                raise UserError(f"{spec}: names split {tail!r} but --split says {split!r}")
            return Path(head), tail
    return path, split


def _pick(path: Path, splits: dict[str, list[Path]], split: str | None) -> tuple[Path, ...]:
    names = ", ".join(sorted(splits))
    if not splits:
        raise UserError(f"{path}: a directory with no Parquet, Arrow or JSONL files "
                        "(expected a datasets.save_to_disk or Hub-style dataset folder)")
    if split is None:
        if len(splits) > 1:
            # DIR:NAME first: every command takes it, only `data import` has --split.
            raise UserError(f"{path}: holds the splits {names}; choose one with {path}:NAME "
                            "(data import: or --split NAME)")
        split = next(iter(splits))
    if split not in splits:
        raise UserError(f"{path}: no split {split!r} (it has {names})")
    return tuple(splits[split])


def _saved_dataset(path: Path) -> tuple[Path, ...]:
    """The Arrow shards a ``save_to_disk`` dataset lists in its ``state.json``."""
    try:
        state = json.loads((path / "state.json").read_text())
        files = tuple(path / f["filename"] for f in state["_data_files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / 'state.json'}: not a datasets state file ({exc})") from None
    for file in files:
        if not file.is_file():
            raise UserError(f"{path}: state.json lists {file.name}, which is missing")
    return files


def _saved_dict(path: Path, split: str | None) -> tuple[Path, ...]:
    try:
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / 'dataset_dict.json'}: not a DatasetDict index ({exc})") from None
    splits = {str(name): [path / str(name)] for name in names}
    (chosen,) = _pick(path, splits, split)
    return _saved_dataset(chosen)


def _base_name(name: str) -> str:
    """A data file's name without its data suffixes (``train.jsonl.gz`` -> ``train``)."""
    for suffix in sorted(_FOLDER_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _file_split(relative: Path) -> tuple[str, str, bool]:
    """(subset, split, whether the file's own name said the split) of a Hub folder's file,
    from the path below the folder.

    The name says the split when it is a shard (``train_prefs-00000-of-00001.parquet``), a
    split word (``test.jsonl``, ``harmless-base/train.jsonl.gz``) or a numbered one
    (``train_0.jsonl``, ``test.1.parquet``); otherwise the directory is the split
    (``default/train/0000.parquet``), or at the top or in ``data/`` the name's leading word
    is. The directories above the split (``data/`` aside) name the subset.
    """
    base = _base_name(relative.name)
    dirs = list(relative.parent.parts)
    shard, numbered = _SHARD.fullmatch(base), _NUMBERED.fullmatch(base)
    named = True
    if shard:
        split = shard["split"]
    elif base.lower() in _SPLIT_WORDS:
        split = base
    elif numbered:
        split = numbered["split"]
    elif dirs and dirs[-1] != "data":
        split, named = dirs.pop(), False
    else:
        word = _SPLIT_NAME.match(base)
        split, named = (word.group(0) if word else base), False
    return "/".join(d for d in dirs if d != "data"), split, named


def _rows_file(path: Path) -> bool:
    """Whether a ``.json`` file holds JSON Lines rows: its first non-blank line is one object
    (a pretty-printed notes file starts with a lone ``{``)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    return isinstance(json.loads(line), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def _hub_folder(path: Path, split: str | None) -> tuple[Path, ...]:
    splits: dict[str, list[Path]] = {}
    subsets: dict[str, set[str]] = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if (file.name.endswith(_FOLDER_SUFFIXES) and file.name not in _METADATA
                and file.is_file() and not any(p.startswith(".") for p in relative.parts)):
            subset, name, named = _file_split(relative)
            if file.name.endswith((".json", ".json.gz")) and not named and not _rows_file(file):
                continue  # a folder's notes about itself (a pretty-printed stats.json)
            splits.setdefault(name, []).append(file)
            subsets.setdefault(name, set()).add(subset)
    known = {part for names in subsets.values() for s in names for part in s.split("/")}
    if split is not None and split not in splits and split in known:
        raise UserError(f"{path}: {split!r} is a subset, not a split (the splits are "
                        f"{', '.join(sorted(splits))}); to read only that subset, name its "
                        f"directory: {path / split}:NAME")
    files = _pick(path, splits, split)
    chosen = sorted(subsets[split if split is not None else next(iter(splits))])
    if len(chosen) > 1:
        log.info("%s: reading the split from %d subsets (%s); name one subset's directory to "
                 "read only it", path, len(chosen), ", ".join(chosen))
    return files


def open_source(spec: str | Path, split: str | None = None) -> Source:
    """Resolve a file, a saved dataset or a dataset folder (optionally ``DIR:SPLIT``) to files.

    Raises UserError for a path that does not exist, a folder without data files, or a split
    that is missing or needed.
    """
    path, split = _split_spec(spec, split)
    if path.is_file():
        if split is not None:
            raise UserError(f"{path}: --split applies to dataset folders, not to one file")
        return Source(str(path), (path,))
    if not path.is_dir():
        raise UserError(f"{path}: no such file or directory")
    if (path / "dataset_dict.json").is_file():
        files = _saved_dict(path, split)
    elif (path / "state.json").is_file():
        if split is not None:
            raise UserError(f"{path}: a saved dataset with one split; name no split "
                            f"(got {split!r})")
        files = _saved_dataset(path)
    else:
        files = _hub_folder(path, split)
    return Source(str(path), files)


# -- reading rows -----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _jsonl_rows(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Each non-blank line as an object; lines may be of any length; ``.gz`` is decompressed."""
    try:
        yield from _json_lines(path)
    except (OSError, EOFError) as exc:  # a damaged or truncated gzip file, a read error
        raise DataError(f"cannot be read: {exc}", path=str(path)) from None


def _json_lines(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")) as fh:
        for number, raw in enumerate(fh, 1):
            where = Location(str(path), number)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise data_error(where, f"not UTF-8 text (bad byte at column {exc.start + 1})"
                                 ) from None
            line = line.removeprefix("\ufeff") if number == 1 else line
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise data_error(where, f"not valid JSON: {exc.msg} at column {exc.colno}"
                                 ) from None
            except (ValueError, RecursionError) as exc:
                raise data_error(where, f"not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                hint = (" (a JSON array file? rewardloop reads JSON Lines: one object a line)"
                        if number == 1 and isinstance(obj, list) else "")
                raise data_error(where, f"each line must be a JSON object, got {kind_of(obj)}"
                                 + hint)
            yield where, obj


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def pyarrow_module() -> Any:
    try:
        import pyarrow  # noqa: F401  (slow to import: only when a columnar file is read)
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading Parquet or Arrow needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _batches(path: Path) -> Iterator[Any]:
    """Record batches of a Parquet or Arrow file (IPC file or stream format), one at a time."""
    pa = pyarrow_module()
    try:
        if COLUMNAR[path.suffix] == "parquet":
            yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            return
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        except pa.ArrowInvalid:  # not the file format: datasets writes the stream format
            source.seek(0)
            yield from pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable {COLUMNAR[path.suffix]} file: {exc}",
                        path=str(path)) from None


def _columnar_rows(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    number = 0
    for batch in _batches(path):
        for row in batch.to_pylist():
            number += 1
            yield Location(str(path), number, "row"), _drop_nulls(row)


def rows(source: Source) -> Generator[tuple[Location, dict[str, Any]], None, None]:
    """(where, object) for every row of every file of ``source``, streamed."""
    for path in source.files:
        if path.suffix in COLUMNAR:
            yield from _columnar_rows(path)
        else:
            yield from _jsonl_rows(path)
