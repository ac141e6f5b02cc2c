"""``package.module:function`` specs (reward functions, gold functions, judges): imported the
same way by every command, with the working directory searched too, as ``python -m`` does, so
a local ``rewards.py`` just works without PYTHONPATH (also in the processes of ``--nproc`` and
Ray, which start in the same directory)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from rewardloop.errors import UserError


def import_function(spec: str, flag: str) -> Callable[..., Any]:
    """The function ``spec`` names; a UserError naming ``flag`` when it cannot be had."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{flag} {spec!r} is not of the form package.module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{flag} {spec}: cannot import module {module_name!r} ({exc}); is it "
                        "installed, on PYTHONPATH or in the working directory?") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: module {module_name!r} has no function {attr!r}")
    return fn
