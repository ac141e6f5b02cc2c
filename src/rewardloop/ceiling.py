"""The label ceiling: the held-out accuracy the best possible reward model could reach.

People disagree. When several annotators judged the same pair of answers, no model, however
good, can agree with every one of them: the best it can do is predict the side most people
take. Its accuracy on a judgment is then the chance that the judgment agrees with the other
annotators' majority. So the ceiling is estimated, leave-one-out, as the mean over strict
judgments (not ties) that share their pair with at least one other annotator of

- 1 when the other judgments of the pair side with it on balance,
- 0.5 when they are split evenly (a model must pick one side: a coin flip),
- 0 when they side against it,

where another annotator's tie counts for neither side. With few annotators per pair the
majority of the others is itself noisy, so this estimate is conservative: three annotators of
80% accuracy each give 0.68, not 0.80 (a judgment agrees with one other with probability
p² + (1 - p)²).

``upper`` inverts that relation instead: if every judgment is right with the same probability
p, two judgments of a pair agree with probability A = p² + (1 - p)², so p = (1 + √(2A - 1)) / 2.
When some pairs are harder than others (people split nearer 50/50 on them) this overstates the
ceiling a little (Jensen), so the truth lies between ``value`` and ``upper``.

Pure functions over votes ``(unit, annotator, value)``: ``value`` +1 when the unit's first
answer won, -1 when the second did, 0 for a tie; ``unit`` is any hashable pair identity.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rewardloop.data.records import PairRecord, RankingRecord
from rewardloop.metrics import pair_credit

Vote = tuple[Hashable, str | None, int]


@dataclass(frozen=True)
class Ceiling:
    """A label-ceiling estimate and how much data it rests on."""

    value: float | None
    """Mean leave-one-out majority credit; None when no judgment shares its pair."""
    judgments: int
    """Strict judgments that share their pair with another annotator (the estimate's n)."""
    units: int
    """Pairs judged by two or more annotators."""
    upper: float | None = None
    """Accuracy p with p² + (1 - p)² = the agreement rate of two strict judgments of a pair."""

    def to_json(self) -> dict[str, Any]:
        return {"label_ceiling": self.value, "label_ceiling_upper": self.upper,
                "label_ceiling_judgments": self.judgments, "label_ceiling_pairs": self.units}


def text_key(text: Any) -> str:
    """A hashable identity of a prompt or answer: the string, or a chat list as canonical JSON."""
    return text if isinstance(text, str) else json.dumps(text, sort_keys=True)


def majority_credit(value: int, others: Sequence[int]) -> float:
    """Credit of a strict ``value`` (+1/-1) against the ``others``' votes (ties count 0): the
    ``metrics.pair_credit`` of their balance, the rule a reward model's accuracy follows."""
    return float(pair_credit(sum(o * value for o in others)))


def label_ceiling(votes: Iterable[Vote]) -> Ceiling:
    """Leave-one-out majority agreement of every strict judgment with the other annotators of
    its pair. Judgments without an annotator name each count as a different annotator; one
    annotator's repeated judgments of a pair are never "others" to each other."""
    by_unit: dict[Hashable, list[tuple[str | None, int]]] = defaultdict(list)
    for unit, annotator, value in votes:
        by_unit[unit].append((annotator, int(value)))
    credits: list[float] = []
    shared = agree = pairs = 0
    for judged in by_unit.values():
        if len(judged) < 2:
            continue
        counted = False
        for k, (name, value) in enumerate(judged):
            others = [v for j, (n, v) in enumerate(judged)
                      if j != k and (name is None or n != name)]
            if value == 0 or not others:
                continue
            credits.append(majority_credit(value, others))
            counted = True
            strict = [v for j, (n, v) in enumerate(judged)
                      if j > k and v != 0 and (name is None or n != name)]
            pairs += len(strict)
            agree += sum(v == value for v in strict)
        shared += counted
    upper = accuracy_from_agreement(agree / pairs) if pairs else None
    return Ceiling(sum(credits) / len(credits) if credits else None, len(credits), shared,
                   upper)


def accuracy_from_agreement(agreement: float) -> float:
    """p of p² + (1 - p)² = ``agreement`` (p >= 0.5; agreement below chance gives 0.5)."""
    return 0.5 * (1.0 + math.sqrt(max(2.0 * agreement - 1.0, 0.0)))


def record_votes(records: Iterable[Any]) -> list[Vote]:
    """Votes of pairwise and ranking rows: a ranking of k answers votes on its k(k-1)/2 pairs.
    A pair is (prompt, answer, answer) with the answers in a fixed order, so two annotators who
    saw them in different orders vote on the same unit. Other rows are skipped."""
    out: list[Vote] = []
    for r in records:
        if isinstance(r, PairRecord):
            answers = [(text_key(r.chosen), 0), (text_key(r.rejected), 0 if r.tie else 1)]
        elif isinstance(r, RankingRecord):
            place = {i: p for p, group in enumerate(r.ranking) for i in group}
            answers = [(text_key(a), place[i]) for i, a in enumerate(r.responses) if i in place]
        else:
            continue
        prompt = text_key(r.prompt)
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                (a, rank_a), (b, rank_b) = sorted((answers[i], answers[j]))
                if a == b:
                    continue
                value = 0 if rank_a == rank_b else (1 if rank_a < rank_b else -1)
                out.append(((prompt, a, b), r.annotator, value))
    return out
