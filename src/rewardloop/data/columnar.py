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

SHARD = "data-00000-of-00001.arrow"


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
                            f"(text and chat lists?): {exc}") from None
    return pa.table(columns) if columns else pa.table({})


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_table_file(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a Parquet or Arrow (IPC file) file atomically: temp file, rename."""
    pa = pyarrow_module()
    table = _table(rows, str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if COLUMNAR[path.suffix] == "parquet":
            pa.parquet.write_table(table, tmp)
        else:
            with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"--to-hf-dataset {path}: a file is in the way")
    if path.is_dir() and any(path.iterdir()) and not (path / "state.json").is_file():
        raise UserError(f"--to-hf-dataset {path}: the directory holds other files; give a new "
                        "or empty directory (or an earlier export, which is replaced)")
    if not path.parent.is_dir():
        raise UserError(f"--to-hf-dataset {path}: directory {path.parent} does not exist")


def write_saved_dataset(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` as a ``save_to_disk`` directory: one Arrow stream shard + JSON metadata.

    Built in a sibling temp directory and renamed into place, so a reader never sees half of
    it; an earlier export at ``path`` is replaced.
    """
    pa = pyarrow_module()
    _check_target(path)
    table = _table(rows, str(path))
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        with pa.OSFile(str(tmp / SHARD), "wb") as sink, \
                pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        (tmp / "dataset_info.json").write_text(json.dumps(
            {"citation": "", "description": "written by rewardloop data export", "features":
             None, "homepage": "", "license": ""}, indent=2))
        (tmp / "state.json").write_text(json.dumps({
            "_data_files": [{"filename": SHARD}], "_fingerprint": secrets.token_hex(8),
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None}, indent=2))
        tmp.chmod(0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
