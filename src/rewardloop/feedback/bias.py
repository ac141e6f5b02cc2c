"""Per-annotator bias statistics: position (first-shown wins), length (longer wins) and
constant answers, each with a two-sided binomial test against 0.5.

One outcome per judgment keeps the outcomes independent, as the binomial test assumes:
position compares the first- and second-shown answers; length compares the task's longest and
shortest answers. Ties, and judgments without the needed information, are left out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rewardloop.feedback.agreement import TIE, binom_test
from rewardloop.feedback.records import JudgmentRecord, pair_values


@dataclass
class BiasStats:
    """Counts, rates and p-values of one annotator's position and length preferences."""

    position_n: int = 0
    position_rate: float | None = None
    """Share of decided judgments where the first-shown answer beat the second-shown one."""
    position_p: float | None = None
    length_n: int = 0
    length_rate: float | None = None
    """Share of decided judgments where the longest answer beat the shortest one."""
    length_p: float | None = None
    length_reference: float = 0.5
    """The other annotators' longer-wins rate (0.5 when they have too few judgments)."""
    patterns: int = 0
    top_pattern_share: float = 0.0
    """Share of judgments with the most common answer by shown position (1.0 = constant)."""


def _winner(rec: JudgmentRecord, a: int, b: int) -> int | None:
    lo, hi = sorted((a, b))
    value = pair_values(rec.ranking).get((lo, hi))
    if value is None or value == TIE:
        return None
    return lo if value == 0 else hi


def position_outcome(rec: JudgmentRecord) -> bool | None:
    """Did the first-shown answer beat the second-shown one? None if tied or not recorded."""
    if not rec.shown_order or len(rec.shown_order) < 2:
        return None
    first, second = rec.shown_order[0], rec.shown_order[1]
    winner = _winner(rec, first, second)
    return None if winner is None else winner == first


def length_outcome(rec: JudgmentRecord) -> bool | None:
    """Did the longest answer beat the shortest? None if tied, same length or lengths unknown."""
    if len(rec.lengths) < 2:
        return None
    by_len = sorted(rec.lengths, key=lambda rid: (rec.lengths[rid], rid))
    shortest, longest = by_len[0], by_len[-1]
    if rec.lengths[shortest] == rec.lengths[longest]:
        return None
    winner = _winner(rec, shortest, longest)
    return None if winner is None else winner == longest


def shown_pattern(rec: JudgmentRecord) -> tuple[tuple[int, ...], ...] | None:
    """The ranking written as shown positions, e.g. ((0,), (1,)) = "the first shown won"."""
    if not rec.shown_order:
        return None
    pos = {rid: i for i, rid in enumerate(rec.shown_order)}
    return tuple(tuple(sorted(pos[r] for r in group)) for group in rec.ranking)


def _binom_p(wins: int, n: int) -> float | None:
    return binom_test(wins, n) if n else None


def bias_stats(by_name: Mapping[str, Sequence[JudgmentRecord]], min_reference: int = 20
               ) -> dict[str, BiasStats]:
    """BiasStats per annotator name; the length reference of each is everyone else's rate."""
    length: dict[str, tuple[int, int]] = {}
    out: dict[str, BiasStats] = {}
    for name, recs in by_name.items():
        pos = [o for o in map(position_outcome, recs) if o is not None]
        lng = [o for o in map(length_outcome, recs) if o is not None]
        patterns = Counter(p for p in map(shown_pattern, recs) if p is not None)
        n_pat = sum(patterns.values())
        length[name] = (sum(lng), len(lng))
        out[name] = BiasStats(
            position_n=len(pos), position_rate=sum(pos) / len(pos) if pos else None,
            position_p=_binom_p(sum(pos), len(pos)),
            length_n=len(lng), length_rate=sum(lng) / len(lng) if lng else None,
            length_p=_binom_p(sum(lng), len(lng)), patterns=n_pat,
            top_pattern_share=max(patterns.values()) / n_pat if n_pat else 0.0)
    wins_all = sum(w for w, _ in length.values())
    n_all = sum(n for _, n in length.values())
    for name, stats in out.items():
        wins, n = wins_all - length[name][0], n_all - length[name][1]
        if n >= min_reference:
            stats.length_reference = wins / n
    return out
