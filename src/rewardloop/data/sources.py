"""Where rows come from: JSONL, Parquet and Arrow files, and Hugging Face dataset folders.

Every reader of rewardloop data goes through :func:`open_source`, so each ``--data``,
``--prompts`` and ``data import`` accepts the same inputs:

- a ``.jsonl`` file (anything that is not Parquet or Arrow is read as JSONL);
- a Parquet file (``.parquet``), read one record batch at a time;
- an Arrow IPC file or stream (``.arrow``, ``.feather``), memory-mapped, batch by batch;
- a ``datasets.save_to_disk`` directory: one dataset (``state.json`` + Arrow shards) or a
  DatasetDict (``dataset_dict.json`` + one directory per split);
- a Hub-style dataset folder: Parquet, Arrow or JSONL files anywhere below it, the split taken
  from the file name (``data/train-00000-of-00002.parquet``) or its directory
  (``default/train/0000.parquet``).

A folder with several splits needs one chosen: ``--split NAME`` where a command has it, or
``DIR:NAME`` anywhere a path is taken. The ``datasets`` package is not needed: its saved
directories are Arrow streams plus JSON metadata, read here with pyarrow.

Rows are streamed: at most one record batch of a columnar file is in memory at a time. In
columnar rows a null is the same as an absent field (Arrow gives every row every column), so
nulls are dropped from objects before the rows reach the parsers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardloop.data._fields import kind_of
from rewardloop.errors import DataError, UserError

COLUMNAR = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}
_FOLDER_SUFFIXES = (".parquet", ".arrow", ".jsonl")
_BATCH_ROWS = 1024
_SPLIT_NAME = re.compile(r"[A-Za-z0-9]+")

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
            raise UserError(f"{path}: holds the splits {names}; choose one with --split NAME "
                            f"or {path}:NAME")
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


def _file_split(relative: Path) -> str:
    """A Hub file's split: the leading word of its name when it sits at the top or in a
    ``data/`` directory (``data/train-00000-of-00001.parquet``, ``test.jsonl``), else the name
    of its directory (``train/part-0.parquet``, ``default/train/0000.parquet``)."""
    parent = relative.parent.name
    if parent not in ("", "data"):
        return parent
    match = _SPLIT_NAME.match(relative.name)
    return match.group(0) if match else relative.stem


def _hub_folder(path: Path, split: str | None) -> tuple[Path, ...]:
    splits: dict[str, list[Path]] = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path)
        if (file.suffix in _FOLDER_SUFFIXES and file.is_file()
                and not any(p.startswith(".") for p in relative.parts)):
            splits.setdefault(_file_split(relative), []).append(file)
    return _pick(path, splits, split)


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
            raise UserError(f"{path}: a saved dataset with one split; drop --split {split}")
        files = _saved_dataset(path)
    else:
        files = _hub_folder(path, split)
    return Source(str(path), files)


# -- reading rows -----------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _jsonl_rows(path: Path) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Each non-blank line as an object; lines may be of any length."""
    with path.open("rb") as fh:
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
                raise data_error(where, f"each line must be a JSON object, got {kind_of(obj)}")
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
