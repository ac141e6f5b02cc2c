"""Gold functions for the simulate/quality tests (TRL reward signature)."""

from __future__ import annotations

from typing import Any


def quality_gold(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    """Gold = the number written after 'q=' in the completion (e.g. 'answer q=2.5')."""
    return [float(c.split("q=")[1].split()[0]) for c in completions]


def two_part_gold(prompts: list[Any], completions: list[str],
                  **kwargs: Any) -> list[dict[str, float]]:
    """Two components: 'q' (as above) and 'brevity' (minus length in hundreds of characters)."""
    return [{"q": float(c.split("q=")[1].split()[0]), "brevity": -len(c) / 100.0}
            for c in completions]


def wrong_length(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    return [0.0]


def wrong_type(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[Any]:
    return ["high" for _ in completions]


def boom(prompts: list[Any], completions: list[str], **kwargs: Any) -> list[float]:
    raise RuntimeError("kaboom\nat the second line")
