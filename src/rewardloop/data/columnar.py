"""Writing rows as Parquet or Arrow files and as directories ``datasets.load_from_disk`` reads.

Rows are the same JSON objects the JSONL writer emits (optional fields left out); a column
takes the union of the rows' keys and a row without a key holds null there, which the readers
treat as absent, so what is written reads back to equal records. A column must hold one kind
of value: text and chat lists cannot share a column (Arrow has no union of the two here).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewardloop.data.sources import COLUMNAR, pyarrow_module
from rewardloop.errors import UserError
from rewardloop.util.files import check_output_dir, check_output_file, exchange_paths, fsync_dir

SHARD = "data-00000-of-00001.arrow"
INFO = "dataset_info.json"
STATE = "state.json"
EXPORT_MARK = "written by rewardloop data export"
"""The description in an export's dataset_info.json: marks a directory it may replace."""
EXPORT_ENTRIES = frozenset({SHARD, INFO, STATE})
"""Everything an export writes; an earlier export holding anything else (except the cache
files ``datasets`` adds beside it, ``cache-*.arrow``) is not replaced."""


def _table(rows: Sequence[dict[str, Any]], what: str) -> Any:
    """An Arrow table with one column per key, in first-seen order."""
    pa = pyarrow_module()
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        try:
            columns[name] = pa.array([row.get(name) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UserError(f"cannot write {what}: column {name!r} mixes kinds of values "
                            f"(text and chat lists?): {exc}; a .jsonl file holds any mix")\
                from None
    return pa.table(columns) if columns else pa.table({})


def _fsync_file(path: Path | str) -> None:
    """Make a written file's data durable before it is renamed into place: otherwise a power
    loss can leave the new name on an empty or partial file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table_file(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a Parquet or Arrow (IPC file) file atomically: temp file, fsync,
    rename."""
    pa = pyarrow_module()
    check_output_file(path)
    table = _table(rows, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if COLUMNAR[path.suffix] == "parquet":
            pa.parquet.write_table(table, tmp)
        else:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _is_export(path: Path) -> bool:
    """Whether directory ``path`` is an earlier ``write_saved_dataset``: its
    dataset_info.json carries ``EXPORT_MARK``."""
    try:
        info = json.loads((path / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("description") == EXPORT_MARK


def check_saved_dataset_target(path: Path) -> None:
    """UserError unless ``path`` is new, empty, or an earlier export holding only what the
    export writes: anything else in the directory is the user's, and the replacement (a
    rename of the whole directory) would delete it. Cheap: callers may check before the
    rows are read."""
    flag = "--to-hf-dataset"
    check_output_dir(path, flag=flag)
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not _is_export(path):
        raise UserError(f"{flag} {path}: the directory holds other files and is not an "
                        "earlier rewardloop export; give a new or empty directory")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in EXPORT_ENTRIES
                     and not (p.name.startswith("cache-") and p.name.endswith(".arrow")))
    if foreign:
        raise UserError(f"{flag} {path}: the earlier export also holds {', '.join(foreign)}, "
                        "which replacing it would delete; move them away or give another "
                        "directory")


def write_saved_dataset(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a ``save_to_disk`` directory: one Arrow stream shard + JSON metadata.

    Built in a sibling temp directory and renamed into place, so a reader never sees half of
    it; an earlier export at ``path`` is replaced (swapped with the new one in one step where
    the system can, ``util.files.exchange_paths``, so a kill never leaves ``path`` missing), and
    any other non-empty directory refused (``check_saved_dataset_target``).
    """
    pa = pyarrow_module()
    check_saved_dataset_target(path)
    table = _table(rows, str(path))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with pa.OSFile(str(tmp / SHARD), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (tmp / INFO).write_text(json.dumps(
            {"citation": "", "description": EXPORT_MARK, "features":
             None, "homepage": "", "license": ""}, indent=2))
        (tmp / STATE).write_text(json.dumps({
            "_data_files": [{"filename": SHARD}], "_fingerprint": secrets.token_hex(8),
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None}, indent=2))
        for name in (SHARD, INFO, STATE):
            _fsync_file(tmp / name)
        fsync_dir(tmp)
        tmp.chmod(0o755)
        if path.exists() and exchange_paths(tmp, path):
            shutil.rmtree(tmp)  # now the earlier export; ``path`` was never missing
        elif path.exists():
            old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # put the earlier export back
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
