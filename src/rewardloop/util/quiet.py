"""Warnings of the libraries rewardloop calls that tell its users nothing, dropped only around
the call that makes them (never for the whole process), so that every other warning shows."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

CHECKPOINTING_ALIAS = "`is_gradient_checkpointing` is deprecated"
"""The start of transformers' (5.x) FutureWarning when peft reads the old name."""


@contextlib.contextmanager
def quiet_checkpointing_alias() -> Iterator[None]:
    """Around peft wrapping a model in LoRA adapters (``get_peft_model``,
    ``PeftModel.from_pretrained``): peft (0.21) asks transformers for the deprecated
    ``is_gradient_checkpointing``, which printed a FutureWarning on every LoRA run; a user can
    do nothing about it. Inside, that warning is dropped; any other passes as before."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHECKPOINTING_ALIAS, category=FutureWarning)
        yield
