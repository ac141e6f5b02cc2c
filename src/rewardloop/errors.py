"""Errors a user can cause and fix. The CLI turns them into one line and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave us (a flag, a file, a directory): exit status 2.

    The message must say what is wrong and, where it can, where (file, line, field) and how to
    fix it. It is printed as one line, without a traceback.
    """

    exit_code = 2


class DataError(UserError):
    """Bad input data: names the file, the line (1-based) and the field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        prefix = ":".join(where)
        if field is not None:
            prefix = f"{prefix} field '{field}'" if prefix else f"field '{field}'"
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path, self.line, self.field = path, line, field


class TrainingError(Exception):
    """Training cannot go on (NaN loss, diverged): exit status 3; the last good checkpoint stays."""

    exit_code = 3
