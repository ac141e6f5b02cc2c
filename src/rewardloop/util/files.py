"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

The data goes to a temporary file beside the target, is flushed and fsynced, renamed over the
target, and the directory is fsynced so the rename itself survives a crash. On an error the
temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"
"""Temporary files start with this, so a crash leaves only names readers can skip."""


def fsync_dir(path: Path) -> None:
    """Make renames in directory ``path`` durable (POSIX; a no-op where directories cannot be
    opened)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Yield a file open for writing whose content replaces ``path`` atomically when the block
    ends without an error (text: UTF-8 with ``\\n`` line ends)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        fh: IO[Any]
        if binary:
            fh = os.fdopen(fd, "wb")
        else:
            fh = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files are readable like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_file(path) as fh:
        fh.write(text)
