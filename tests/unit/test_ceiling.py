"""The label ceiling against hand-computed values on a small judgment table, and against the
known accuracy of simulated annotators."""

from __future__ import annotations

import random

import pytest

from rewardloop.ceiling import (
    accuracy_from_agreement,
    label_ceiling,
    majority_credit,
    record_votes,
)
from rewardloop.data.records import PairRecord, RankingRecord


def test_ceiling_of_a_small_table_matches_the_hand_computed_value() -> None:
    """Pair u1: a, b, c say +1, d says -1. Pair u2: a +1, b -1. Pair u3: a +1, b tie, c +1.
    Pair u4: a alone (no overlap). Leave-one-out credits of the strict judgments:
      u1: a: others (+1, +1, -1) balance +1 -> 1; b -> 1; c -> 1; d: others (+1,+1,+1) -> 0
      u2: a: others (-1) -> 0; b: others (+1) -> 0
      u3: a: others (tie, +1) balance +1 -> 1; c: others (+1, tie) -> 1; b is a tie: no credit
    8 strict judgments with overlap (u1: 4, u2: 2, u3: 2), credits 1+1+1+0 + 0+0 + 1+1 = 5,
    so the ceiling is 5/8 = 0.625.
    Agreement of strict pairs of judgments: u1: 6 pairs, 3 agree (abc); u2: 1 pair, 0 agree;
    u3: 1 pair (a, c), agrees -> 4/8 = 0.5 -> upper = (1 + sqrt(0)) / 2 = 0.5."""
    votes = [("u1", "a", 1), ("u1", "b", 1), ("u1", "c", 1), ("u1", "d", -1),
             ("u2", "a", 1), ("u2", "b", -1),
             ("u3", "a", 1), ("u3", "b", 0), ("u3", "c", 1),
             ("u4", "a", 1)]
    ceiling = label_ceiling(votes)
    assert ceiling.value == pytest.approx(5 / 8)
    assert ceiling.judgments == 8 and ceiling.units == 3
    assert ceiling.upper == pytest.approx(0.5)


def test_split_panels_give_half_credit_and_one_annotator_is_never_their_own_other() -> None:
    assert majority_credit(1, [1, -1]) == 0.5 and majority_credit(-1, [0]) == 0.5
    # "a" judged u1 twice: no overlap with anyone else, so no estimate.
    assert label_ceiling([("u1", "a", 1), ("u1", "a", -1)]).value is None
    # Unnamed judgments are different people.
    assert label_ceiling([("u1", None, 1), ("u1", None, 1)]).value == 1.0
    assert accuracy_from_agreement(0.68) == pytest.approx(0.8)
    assert accuracy_from_agreement(0.3) == 0.5


def test_simulated_annotators_bracket_their_true_accuracy() -> None:
    """Three annotators right 80% of the time on every pair: the leave-one-out majority gives
    p² + (1-p)² = 0.68 (two others), the agreement inversion recovers 0.80."""
    rng = random.Random(0)
    votes = [(u, name, 1 if rng.random() < 0.8 else -1)
             for u in range(4000) for name in ("a", "b", "c")]
    ceiling = label_ceiling(votes)
    assert ceiling.value == pytest.approx(0.68, abs=0.01)
    assert ceiling.upper == pytest.approx(0.80, abs=0.01)


def test_records_vote_on_the_same_unit_whatever_the_order_shown() -> None:
    rows = [PairRecord("p", "x", "y", annotator="a"), PairRecord("p", "y", "x", annotator="b"),
            RankingRecord("p", ["y", "x", "z"], [[1], [0, 2]], annotator="c")]
    votes = record_votes(rows)
    xy = [(n, v) for u, n, v in votes if u == ("p", "x", "y")]
    assert xy == [("a", 1), ("b", -1), ("c", 1)]
    assert [(u, v) for u, n, v in votes if n == "c"] == [
        (("p", "x", "y"), 1), (("p", "y", "z"), 0), (("p", "x", "z"), 1)]


def test_quality_report_shows_the_ceiling_of_the_stored_judgments() -> None:
    """The u1/u2 part of the hand-computed table as store judgments: u1 (task 1): a, b, c
    prefer response 1, d prefers 2 -> credits 1, 1, 1, 0; u2 (task 2): a prefers 3, b prefers
    4 -> 0, 0. Ceiling 3/6 = 0.5."""
    from rewardloop.feedback.quality import JudgmentRecord, analyze

    def judged(i: int, name: str, task: int, ranking: list[list[int]]) -> JudgmentRecord:
        return JudgmentRecord(judgment_id=i, annotator=name, groups=(), task_id=task,
                              kind="pairwise", ranking=ranking)

    records = [judged(0, "a", 1, [[1], [2]]), judged(1, "b", 1, [[1], [2]]),
               judged(2, "c", 1, [[1], [2]]), judged(3, "d", 1, [[2], [1]]),
               judged(4, "a", 2, [[3], [4]]), judged(5, "b", 2, [[4], [3]])]
    doc = analyze(records).to_json()
    assert doc["label_ceiling"] == pytest.approx(0.5)
    assert doc["label_ceiling_judgments"] == 6 and doc["label_ceiling_pairs"] == 2
