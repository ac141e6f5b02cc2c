"""A reward for the multi-process RL tests, importable by the processes they start."""

from __future__ import annotations

from typing import Any


def by_prompt(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    """Differs per prompt, so whitened advantages are not all 0 under greedy decoding."""
    return [len(str(p)) % 7 - 3.0 + 0.1 * len(c) for p, c in zip(prompts, completions,
                                                                   strict=True)]
