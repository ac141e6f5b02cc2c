"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

The data goes to a temporary file beside the target, is flushed and fsynced, renamed over the
target, and the directory is fsynced so the rename itself survives a crash. On an error the
temporary file is removed and the old file is left as it was.

The ``check_*`` functions refuse, with a ``UserError`` and before any work, an output path that
cannot be written or would overwrite what the user gave us: a directory where a file goes, a
file where a directory goes, an output that is one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from rewardloop.errors import UserError

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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap the files or directories at ``a`` and ``b`` in one atomic step (Linux's
    ``renameat2(RENAME_EXCHANGE)``), so neither name is ever missing; False where the system or
    its file system cannot (the caller then renames twice)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a C library without it (glibc < 2.28, musl < 1.2.5?)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _named(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def _file_ancestor(path: Path) -> Path | None:
    """The closest existing ancestor of ``path`` when it is not a directory (a file in the way
    of ``mkdir -p``), else None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def _existing(spec: str | Path) -> Path | None:
    """An input as an existing path: ``DIR:SPLIT`` names DIR; a hub id or URL is None."""
    path = Path(spec)
    if path.exists():
        return path
    head, sep, _ = str(spec).rpartition(":")
    return Path(head) if sep and head and Path(head).is_dir() else None


def lies_in(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` exists and is ``root`` or lies inside it, by its name (``root/x``) or
    through links (both resolved); False for a string that names no file."""
    try:
        if not Path(path).exists():
            return False
        names = {Path(os.path.abspath(path)), Path(path).resolve()}
        roots = {Path(os.path.abspath(root)), Path(root).resolve()}
    except (OSError, ValueError):  # not a file name at all (an inline chat template, ...)
        return False
    return any(r == q or r in q.parents for q in names for r in roots)


def _overwrites(out: Path, source: Path) -> bool:
    """Whether writing ``out`` replaces input ``source``: the same file (also through a link),
    or a file inside the input directory."""
    if not out.exists():
        return False
    return os.path.samefile(out, source) or (source.is_dir() and lies_in(out, source))


def check_output_file(path: str | Path, *, flag: str | None = None,
                      inputs: Iterable[str | Path | None] = (), parents: bool = False) -> Path:
    """``path`` as a file rewardloop may write, else a UserError: not a directory, its
    directory present (or, with ``parents``, creatable), and not one of ``inputs`` nor a file
    inside an input directory. ``flag`` names the option in the message; inputs that are not
    paths (hub ids, None) are skipped."""
    path = Path(path)
    name = _named(path, flag)
    if path.is_dir():
        raise UserError(f"{name} is a directory; give the path of a file to write")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise UserError(f"{name}: {blocker} is a file, not a directory")
    if not parents and not path.parent.is_dir():
        raise UserError(f"{name}: directory {path.parent} does not exist")
    for spec in inputs:
        source = _existing(spec) if spec is not None else None
        if source is not None and _overwrites(path, source):
            raise UserError(f"{name} would overwrite the input {source}; write the output "
                            "to another file")
    return path


def check_output_dir(path: str | Path, *, flag: str | None = None) -> Path:
    """``path`` as a directory rewardloop may create or write into, else a UserError: neither
    it nor any ancestor is a file."""
    path = Path(path)
    name = _named(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} is a file, not a directory; give a directory")
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise UserError(f"{name}: {blocker} is a file, not a directory")
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path, *, binary: bool = False) -> Iterator[IO[Any]]:
    """Yield a file open for writing whose content replaces ``path`` atomically when the block
    ends without an error (text: UTF-8 with ``\\n`` line ends). A directory at ``path`` or a
    missing parent directory is a UserError (``check_output_file``)."""
    path = check_output_file(path)
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


def json_objects(path: str | Path, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(line, object) of each JSON object line of a JSON Lines file we wrote (metrics, samples),
    the first ``limit`` lines at most; a line that is not one (a torn last line of a run killed
    mid-write) is skipped. A missing file has none."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[:limit]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


WORKDIR_MARKER = ".rewardloop-workdir"
"""The file a loop or demo work directory holds (``loop_config.claim_workdir``); other commands
refuse to write over such a directory."""
