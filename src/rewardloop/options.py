"""Option blocks shared by several commands' configs, and their documentation.

A command's config (one frozen dataclass) inherits the blocks it needs; each field's docstring
is its documentation, read by ``field_docs`` for the command line's ``--help``. Nothing here
imports torch, so the CLI can read the docs at start-up.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TIMEOUT_S = 90


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Processes, sharding and precision: the options every trainer shares."""

    strategy: str = "auto"
    """With several processes: ddp (a full copy of the model per process, gradients averaged)
    or fsdp (FSDP2: parameters, gradients and optimizer state sharded per decoder layer; needs
    2+ processes). auto is ddp with several processes."""
    precision: str = "auto"
    """Compute precision: fp32, bf16 or fp16 (GPU only, with a gradient scaler). Weights,
    gradients and optimizer state stay fp32 (master weights) whatever this says. auto: bf16 on
    a GPU that supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory for ~30% more compute."""
    dist_timeout: int = DEFAULT_TIMEOUT_S
    """Seconds a process waits for the others in a collective before it stops with an error
    (a dead or hung rank must not hang the run)."""

    def check_runtime(self) -> None:
        """ValueError for a name outside the choices (called by each config's __post_init__)."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.dist_timeout < 1:
            raise ValueError("dist_timeout must be at least 1 second")


@dataclass(frozen=True, kw_only=True)
class BestPointOptions:
    """Held-out data and the best point: the options of the offline preference trainers (rm,
    dpo) that evaluate while training, keep the best checkpoint and stop early."""

    eval_fraction: float = 0.0
    """Without --eval-data: hold out this share of --data, split by prompt (and stratified by
    annotator group when groups are known); 0 holds out nothing."""
    eval_every: int = 0
    """Evaluate every this many steps, keep the checkpoint with the lowest eval loss and save
    it as model/ (0: evaluate once, at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without a lower eval loss (needs
    --eval-every)."""

    def check_best_point(self, eval_data: object) -> None:
        """ValueError for inconsistent options (called by each config's __post_init__ with its
        --eval-data, which excludes --eval-fraction)."""
        if math.isnan(self.eval_fraction) or not (
                self.eval_fraction == 0.0 or 0.0 < self.eval_fraction < 1.0):
            raise ValueError("eval_fraction must be 0 (off) or in (0, 1)")
        if eval_data is not None and self.eval_fraction > 0:
            raise ValueError("give --eval-data or --eval-fraction, not both")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.eval_every > 0 and eval_data is None and self.eval_fraction == 0:
            raise ValueError("--eval-every needs held-out data: --eval-data FILE or "
                             "--eval-fraction 0.1")
        if self.early_stopping_patience is not None and (
                self.early_stopping_patience < 1 or self.eval_every == 0):
            raise ValueError("--early-stopping-patience must be >= 1 and needs --eval-every")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases: the string statement right after
    each annotated field, whitespace folded to single spaces."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_help(cls: type, name: str) -> str:
    """``--help`` text of field ``name`` of dataclass ``cls``: its docstring, then its default
    (taken from the dataclass, so the two never disagree)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    doc = field_docs(cls)[name].replace("``", "`")  # reST literals read as plain quotes
    if field.default is dataclasses.MISSING or field.default is None:
        return doc
    shown = ("on" if field.default else "off") if isinstance(field.default, bool) \
        else field.default
    return f"{doc} Default: {shown}."
