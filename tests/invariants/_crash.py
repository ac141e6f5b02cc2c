"""A run that crashes right after a checkpoint, for the resume == uninterrupted tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


class Crash(RuntimeError):
    pass


def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, module: Any, step: int,
                           run: Callable[[], Any]) -> None:
    """``run()`` with ``module.save_checkpoint`` raising right after it wrote step ``step``'s
    checkpoint (a complete one, as a real crash after it would leave); the real
    ``save_checkpoint`` is back afterwards."""
    real_save = module.save_checkpoint

    def save_then_crash(run_dir: Any, at: int, **kw: Any) -> Any:
        path = real_save(run_dir, at, **kw)
        if at == step:
            raise Crash
        return path

    monkeypatch.setattr(module, "save_checkpoint", save_then_crash)
    try:
        with pytest.raises(Crash):
            run()
    finally:
        monkeypatch.setattr(module, "save_checkpoint", real_save)
