"""Pure helpers on stored values: content hashes, rankings and text lengths.

They live apart from ``schema`` so file readers and trainers can use them without importing
SQLAlchemy (half a second of start-up for every training run).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

# Imported rows' idempotency keys start with this and are predictable content hashes, and an
# import skips a record whose key is already stored, so the annotation API refuses keys in this
# namespace: no user can store one first and so suppress an import.
IMPORT_KEY_PREFIX = "import:"
# How strongly an annotator preferred the winner (``Judgment.strength``).
STRENGTHS = ("slight", "clear", "strong")


def content_hash(value: Any) -> str:
    """Stable SHA-256 of a text or JSON value (chat messages), used for de-duplication."""
    if not isinstance(value, str):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def validate_ranking(ranking: Any, response_ids: list[int] | tuple[int, ...]) -> list[list[int]]:
    """Check that ``ranking`` orders exactly ``response_ids`` (each once), best group first.

    Returns the ranking as a list of lists of ints; raises ValueError naming the problem.
    """
    if not isinstance(ranking, list) or not ranking:
        raise ValueError("ranking must be a non-empty list of groups of response ids")
    groups: list[list[int]] = []
    for group in ranking:
        members = group if isinstance(group, list) else [group]
        if not members or not all(isinstance(m, int) and not isinstance(m, bool) for m in members):
            raise ValueError(f"each ranking group must be a non-empty list of ids, got {group!r}")
        groups.append(list(members))
    flat = [m for g in groups for m in g]
    if len(flat) != len(set(flat)):
        raise ValueError("a response appears twice in the ranking")
    if set(flat) != set(response_ids):
        raise ValueError(
            f"ranking must list each of the task's responses {sorted(response_ids)} once, "
            f"got {sorted(flat)}"
        )
    # An all-tie ranking (one group) is allowed: it says "no preference between these".
    return groups


def ranking_pairs(ranking: list[list[int]]) -> list[tuple[int, int, bool]]:
    """All ordered pairs implied by a ranking: ``(better, worse, is_tie)``.

    Ties are returned once per unordered pair with ``is_tie=True`` (order by list position).
    """
    pairs: list[tuple[int, int, bool]] = []
    for i, group in enumerate(ranking):
        for a_idx, a in enumerate(group):
            for b in group[a_idx + 1:]:
                pairs.append((a, b, True))
            for lower in ranking[i + 1:]:
                for b in lower:
                    pairs.append((a, b, False))
    return pairs


def length_stats(texts: Sequence[str] = (), *, chars: Sequence[int] | None = None,
                 words: Sequence[int] | None = None) -> dict[str, float]:
    """Mean/median/p95 length in characters and words, of ``texts`` or of lengths counted
    already (``chars`` and ``words``, one per text)."""
    if chars is None or words is None:
        chars, words = [len(t) for t in texts], [len(t.split()) for t in texts]
    if not chars:
        return {"n": 0}
    c, w = np.asarray(chars, dtype=float), np.asarray(words, dtype=float)
    return {"n": len(c), "chars_mean": float(c.mean()),
            "chars_median": float(np.median(c)), "chars_p95": float(np.quantile(c, 0.95)),
            "words_mean": float(w.mean()), "words_median": float(np.median(w)),
            "words_p95": float(np.quantile(w, 0.95))}
