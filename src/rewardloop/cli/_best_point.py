"""The held-out and best-point flags of ``train rm`` and ``train dpo`` (``--eval-fraction``,
``--eval-every``, ``--early-stopping-patience``); their help is ``BestPointOptions``' field
docstrings."""

from __future__ import annotations

from typing import Any

import typer

from rewardloop.options import BestPointOptions, flag_help


def _doc(name: str) -> str:
    return flag_help(BestPointOptions, name)


EVAL_FRACTION = typer.Option(None, "--eval-fraction", help=_doc("eval_fraction"))
EVAL_EVERY = typer.Option(None, "--eval-every", help=_doc("eval_every"))
EARLY_STOPPING_PATIENCE = typer.Option(None, "--early-stopping-patience",
                                       help=_doc("early_stopping_patience"))


def best_point_flags(eval_fraction: float | None, eval_every: int | None,
                     early_stopping_patience: int | None) -> dict[str, Any]:
    """The flags as config overrides (None: not given, the config file or default decides)."""
    return {"eval_fraction": eval_fraction, "eval_every": eval_every,
            "early_stopping_patience": early_stopping_patience}
