"""The best point of a run: held-out evaluation every few steps, the best step, early stopping.

Preference data is small and noisy; a reward model (or a DPO policy) fitted to it keeps lowering
its training loss long after its held-out loss turned up. ``BestPoint`` remembers the step with
the lowest held-out loss and its figures, and says when ``patience`` evaluations in a row have
not improved on it. The trainers keep that step's checkpoint and save it as ``model/``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BEST_PREFIX = "best_"
"""Summary keys of the best evaluation: ``best_step``, ``best_eval_loss``, ..."""


def evaluation_due(step: int, total_steps: int, eval_every: int) -> bool:
    """Evaluate every ``eval_every`` steps and at the last step (0: only at the last)."""
    return step == total_steps or (eval_every > 0 and step % eval_every == 0)


@dataclass
class BestPoint:
    """Lowest held-out loss seen so far, where, and how many evaluations since."""

    patience: int | None = None
    """Stop after this many evaluations in a row without a lower loss; None never stops."""
    min_delta: float = 0.0
    """A loss must be lower than the best by more than this to count as better."""
    best_step: int | None = None
    best_loss: float = math.inf
    best_figures: dict[str, Any] = field(default_factory=dict)
    evals_since_best: int = 0

    def update(self, step: int, loss: float, figures: Mapping[str, Any]) -> bool:
        """Record an evaluation at ``step``; True when it is the new best. A NaN loss is never
        better."""
        if loss < self.best_loss - self.min_delta:
            self.best_step, self.best_loss = step, float(loss)
            self.best_figures = dict(figures)
            self.evals_since_best = 0
            return True
        self.evals_since_best += 1
        return False

    @property
    def keep(self) -> tuple[int, ...]:
        """The checkpoint steps to protect from pruning: the best one, once there is one."""
        return () if self.best_step is None else (self.best_step,)

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_since_best >= self.patience

    def summary(self) -> dict[str, Any]:
        """``best_step`` and the best evaluation's figures under ``best_`` names."""
        if self.best_step is None:
            return {}
        return {"best_step": self.best_step,
                **{BEST_PREFIX + k: v for k, v in self.best_figures.items()}}

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint's ``extra`` (resume continues the count)."""
        return {"best_step": self.best_step, "best_loss": self.best_loss,
                "best_figures": dict(self.best_figures),
                "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_step = state["best_step"]
        self.best_loss = float(state["best_loss"])
        self.best_figures = dict(state["best_figures"])
        self.evals_since_best = int(state["evals_since_best"])
