"""Per-annotator flags: whom an annotator is compared with, and when a comparison is a flag.

An annotator's agreement is measured against the leave-one-out majority of other annotators on
the pair units they share (see ``feedback.agreement``); ``annotator_flags`` turns it, with the
annotator's bias statistics (``feedback.bias``) and gold accuracy, into the names in ``FLAGS``.
``feedback.quality`` gathers the figures and reports them.

Flags are group-aware: an annotator is also compared with the other members of their own group
(``Peers``), because a group that consistently prefers the opposite of the majority reads as
noise or bias against everyone's pooled judgments, while it is the group's taste.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import numpy as np

from rewardloop.feedback import agreement as A
from rewardloop.feedback.bias import BiasStats

Unit = tuple[int, int, int]  # (task_id, smaller response id, larger response id)
FLAGS = ("spam", "contrarian", "position_bias", "length_bias", "gold_fail")


@dataclass(frozen=True)
class Thresholds:
    """When an annotator is flagged. Conservative on purpose: a flag needs enough data *and* a
    large, significant effect, so an honest annotator with ordinary noise is not flagged."""

    min_judgments: int = 20
    """Judgments needed before position/length/constant-answer flags are considered (and the
    decided length outcomes other annotators need for their longer-wins rate to count)."""
    position_p: float = 0.001
    """``position_bias``: two-sided binomial p-value against 0.5 must be below this ..."""
    position_gap: float = 0.25
    """... and the first-shown win rate at least this far from 0.5 (i.e. > 0.75 or < 0.25)."""
    length_p: float = 0.001
    """``length_bias``: binomial p-value (longer answer wins vs 0.5) below this ..."""
    length_gap: float = 0.15
    """... and the longer-wins rate at least this far from the other annotators' rate."""
    spam_margin: float = 0.15
    """``spam``: agreement confidently below chance plus this margin (``contrarian``:
    confidently below chance minus it) ..."""
    spam_alpha: float = 0.01
    """... each one-sided test at this significance level ..."""
    min_compared: int = 20
    """... over at least this many pair units shared with the annotators compared with (also
    what the other members of an annotator's group must share for the group to be used)."""
    constant_share: float = 0.95
    """``spam`` also when this share of judgments have the same answer pattern by position."""
    gold_min: int = 10
    """``gold_fail``: needs this many gold pair comparisons ..."""
    gold_accuracy: float = 0.7
    """... and gold accuracy significantly below this (one-sided, ``gold_alpha``)."""
    gold_alpha: float = 0.01


@dataclass(frozen=True)
class Agreement:
    """An annotator's agreement with the leave-one-out majority of some other annotators."""

    compared: int = 0
    """Pair units the annotator shares with them."""
    agreement: float | None = None
    chance: float | None = None
    credit: float = 0.0
    """Sum of the per-unit agreement credits (agreement x compared)."""


def agreement(name: str, units: Mapping[Unit, list[tuple[str | None, int]]],
              own: Mapping[Unit, int], peers: Set[str] | None = None) -> Agreement:
    """Agreement of ``name`` with the majority of ``peers`` (None: everyone else, anonymous
    judgments included) on the units they share."""
    credits: list[float] = []
    modes_credit: list[np.ndarray] = []
    values: list[int] = []
    for unit, value in own.items():
        others = [v for a, v in units[unit] if a != name and (peers is None or a in peers)]
        if not others:
            continue
        credits.append(A.majority_credit(value, others) or 0.0)
        modes_credit.append(np.array([A.majority_credit(c, others) or 0.0
                                      for c in range(A.N_VALUES)]))
        values.append(value)
    if not credits:
        return Agreement()
    # Chance: the annotator's own value shares, drawn independently of the unit.
    p_self = np.bincount(values, minlength=A.N_VALUES) / len(values)
    chance = float(np.mean([p_self @ m for m in modes_credit]))
    return Agreement(len(credits), float(np.mean(credits)), chance, float(sum(credits)))


@dataclass(frozen=True)
class Peers:
    """Whom an annotator's flags compare them with: everyone else and, when they share enough
    with the annotator, the other members of the annotator's own group."""

    everyone: Agreement
    group: Agreement | None
    length_rates: tuple[float, ...]
    """Everyone else's longer-wins rate, then the group's other members' (when enough)."""


def group_agreement(name: str, groups: Sequence[str], members: Mapping[str, Set[str]],
                    units: Mapping[Unit, list[tuple[str | None, int]]],
                    own: Mapping[Unit, int], th: Thresholds
                    ) -> tuple[str | None, Agreement | None]:
    """The first of ``groups`` whose other members share ``min_compared`` units with ``name``,
    and the agreement with them; (None, None) without one (no group, or a group of one)."""
    for group in groups:
        others = members[group] - {name}
        found = agreement(name, units, own, others) if others else Agreement()
        if found.compared >= th.min_compared:
            return group, found
    return None, None


def group_length_rate(name: str, groups: Sequence[str], members: Mapping[str, Set[str]],
                      biases: Mapping[str, BiasStats], th: Thresholds
                      ) -> tuple[str | None, float | None]:
    """The first of ``groups`` whose other members have ``min_judgments`` decided length
    outcomes, and their pooled longer-wins rate; (None, None) without one."""
    for group in groups:
        stats = [biases[o] for o in sorted(members[group] - {name})]
        n = sum(b.length_n for b in stats)
        if n >= th.min_judgments:
            wins = sum(round(b.length_rate * b.length_n)
                       for b in stats if b.length_rate is not None)
            return group, wins / n
    return None, None


def _versus_chance(a: Agreement, th: Thresholds) -> str | None:
    """``below`` when the agreement is confidently below chance minus ``spam_margin``
    (systematic disagreement), else ``near`` when confidently below chance plus it (no better
    than a little above chance); None when neither is shown (or too few units).

    ``below`` is tested first: the single test "below chance + margin" also passes for an
    annotator far *below* chance, and called one who disagrees systematically noise."""
    if a.compared < th.min_compared or a.chance is None:
        return None
    k = min(round(a.credit), a.compared)
    upper = min(a.chance + th.spam_margin, 0.999)  # the binomial test needs 0 < p < 1
    lower = max(a.chance - th.spam_margin, 0.001)
    if A.binom_test(k, a.compared, lower, "less") < th.spam_alpha:
        return "below"
    if A.binom_test(k, a.compared, upper, "less") < th.spam_alpha:
        return "near"
    return None


def _agrees(a: Agreement, th: Thresholds) -> bool:
    """Whether the agreement is confidently above chance (over enough units)."""
    if a.compared < th.min_compared or a.chance is None or a.chance >= 0.999:
        return False
    k = min(round(a.credit), a.compared)
    return A.binom_test(k, a.compared, max(a.chance, 0.001), "greater") < th.spam_alpha


def _agreement_flags(peers: Peers, th: Thresholds) -> tuple[bool, bool]:
    """(near chance, contrarian), from the verdicts against everyone else and against the
    annotator's own group.

    Only a group that clearly agrees with the annotator (significantly above chance) clears
    what everyone else's judgments show: an annotator near chance or far below it against
    everyone, whose group shares their taste, has that taste. A group with too little
    evidence abstains (a random clicker or an inverted labeller whose group-mates share few of
    their units is still flagged), and disagreeing clearly with one's own group is
    ``contrarian`` whatever everyone else shows (an inverted labeller, or a wrong group)."""
    everyone = _versus_chance(peers.everyone, th)
    cleared = peers.group is not None and _agrees(peers.group, th)
    below_group = peers.group is not None and _versus_chance(peers.group, th) == "below"
    return (everyone == "near" and not cleared,
            below_group or (everyone == "below" and not cleared))


def annotator_flags(b: BiasStats, peers: Peers, gold_compared: int, gold_correct: int,
                    th: Thresholds) -> list[str]:
    """The ``FLAGS`` of an annotator with bias statistics ``b``, compared with ``peers``, who
    answered ``gold_correct`` of ``gold_compared`` gold pair comparisons correctly."""
    near_chance, contrarian = _agreement_flags(peers, th)
    constant = b.patterns >= th.min_judgments and b.top_pattern_share >= th.constant_share
    position = (b.position_n >= th.min_judgments and b.position_p is not None
                and b.position_rate is not None and b.position_p < th.position_p
                and abs(b.position_rate - 0.5) >= th.position_gap)
    # Like "near chance", a length bias must stand out against every reference: a rate far
    # from everyone's but close to the group's is the group's taste (e.g. for brevity).
    length = (b.length_n >= th.min_judgments and b.length_p is not None
              and b.length_rate is not None and b.length_p < th.length_p
              and all(abs(b.length_rate - r) >= th.length_gap for r in peers.length_rates))
    gold = gold_compared >= th.gold_min and A.binom_test(
        gold_correct, gold_compared, th.gold_accuracy, "less") < th.gold_alpha
    found = {"spam": near_chance or constant, "contrarian": contrarian,
             "position_bias": position, "length_bias": length, "gold_fail": gold}
    return [f for f in FLAGS if found[f]]
