"""feedback.select: budget arithmetic, ordering and rates, checked against hand-computed plans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewardloop.data.records import CandidatesRecord, RankingRecord
from rewardloop.feedback import select as S


def test_plan_counts_by_hand() -> None:
    # T=12: G=round(1.2)=1, rest 11, O=round(2.75)=3 -> (3+1)*3 + 8 = 20 labels: fits.
    # T=13: G=1, rest 12, O=3 -> 12 + 9 = 21 > 20: stop.
    assert S.plan_counts(20, 100, 10, 0.25, 3, 0.1) == S.Counts(overlap=3, gold=1, select=8)
    # Few pairs: the pairs, not the budget, are the limit.
    assert S.plan_counts(1000, 5, 0, 0.0, 3, 0.0) == S.Counts(0, 0, 5)
    # No gold rows: a gold rate buys nothing.
    assert S.plan_counts(10, 100, 0, 0.0, 3, 0.5) == S.Counts(0, 0, 10)
    # Everything overlapped at 3 labels each: 10 // 3 tasks.
    assert S.plan_counts(10, 100, 0, 1.0, 3, 0.0) == S.Counts(3, 0, 0)
    assert S.plan_counts(2, 100, 0, 1.0, 3, 0.0).tasks == 0


def test_interleave_spreads_evenly() -> None:
    # T = 10, 2 extras -> positions floor(2.5) = 2 and floor(7.5) = 7.
    out = S.interleave(list(range(8)), ["g0", "g1"])
    assert out == [0, 1, "g0", 2, 3, 4, 5, "g1", 6, 7]
    assert S.interleave([1, 2], []) == [1, 2]
    assert S.interleave([], ["g"]) == ["g"]


def test_bald_and_std_by_hand() -> None:
    p = 1 / (1 + math.exp(-2.0))  # heads +2 and -2: mean prob 0.5
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    got = S.bald(np.array([[2.0, -2.0], [1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(got, [math.log(2) - h, 0.0, 0.0], atol=1e-9)
    assert got[0] == pytest.approx(0.3278, abs=1e-4)
    np.testing.assert_allclose(S.DISAGREEMENT["std"](np.array([[1.0, 3.0], [2.0, 2.0]])),
                               [1.0, 0.0])


def test_pair_disagreement_uses_the_answer_index() -> None:
    heads = np.array([[0.0, 0.0], [1.0, -1.0], [5.0, 5.0], [4.0, 6.0]])  # 4 answers, K = 2
    index = [[0, 1], [2, 3]]
    pairs = [(0, 0, 1), (1, 0, 1)]
    # d = a - b: row 0 -> [-1, 1] (std 1); row 1 -> [1, -1] (std 1)
    np.testing.assert_allclose(S.pair_disagreement(heads, index, pairs, "std"), [1.0, 1.0])
    with pytest.raises(ValueError, match="2\\+ ensemble heads"):
        S.pair_disagreement(heads[:, :1], index, pairs)


def test_candidate_and_gold_pairs() -> None:
    rows = [CandidatesRecord("p", ["a", "b", "a"]), CandidatesRecord("q", ["x", "y"]),
            CandidatesRecord("r", ["u", "v", "w"])]
    # Row p holds "a" twice: "a vs b" once, at the first "a" (not again as (0, 1, 2)).
    assert S.candidate_pairs(rows) == [(0, 0, 1), (1, 0, 1), (2, 0, 1), (2, 0, 2), (2, 1, 2)]
    gold = [RankingRecord("p", ["a", "b", "c"], [[2], [0, 1]])]
    # (0, 1) tie: skipped; c beats a and b.
    assert S.gold_pairs(gold) == [((0, 0, 2), [[2], [0]]), ((0, 1, 2), [[2], [1]])]


def _pairs(n: int) -> list[S.Pair]:
    return [(i, 0, 1) for i in range(n)]


def test_uncertainty_plan_order_budget_and_rates() -> None:
    pairs = _pairs(40)
    scores = np.arange(40, dtype=float)  # pair i has disagreement i
    gold = [((g, 0, 1), [[1], [0]]) for g in range(5)]
    cfg = S.SelectionConfig(strategy="uncertainty", budget=30, overlap_share=0.25, overlap=3,
                            gold_rate=0.1, seed=1)
    planned = S.plan(cfg, pairs, gold, scores)
    # Counts by hand: T=18 -> G=2, rest 16, O=4 -> 6*3 + 12 = 30 labels.
    assert (planned.count("overlap"), planned.count("gold"), planned.count("select")) == (4, 2, 12)
    assert planned.labels() == 30
    roles = [t.role for t in planned.tasks]
    assert [i for i, r in enumerate(roles) if r == "gold"] == [4, 13]  # floor(4.5), floor(13.5)
    assert [r for r in roles if r != "gold"] == ["overlap"] * 4 + ["select"] * 12
    overlap_rows = {t.row for t in planned.tasks if t.role == "overlap"}
    selected = [t.row for t in planned.tasks if t.role == "select"]
    # The most uncertain pairs not already used as overlap items, most uncertain first.
    expected = [i for i in range(39, -1, -1) if i not in overlap_rows][:12]
    assert selected == expected
    assert all(t.overlap == 3 for t in planned.tasks if t.role in ("overlap", "gold"))
    assert all(t.overlap == 1 for t in planned.tasks if t.role == "select")
    assert all(t.gold_ranking == [[1], [0]] for t in planned.tasks if t.role == "gold")
    assert len({t.row for t in planned.tasks if t.role != "gold"}) == 16  # no pair twice


def test_random_plan_is_seeded_and_uses_no_scores() -> None:
    cfg = S.SelectionConfig(strategy="random", budget=10, overlap_share=0.0, gold_rate=0.0)
    a = S.plan(cfg, _pairs(50))
    b = S.plan(cfg, _pairs(50))
    c = S.plan(S.SelectionConfig(budget=10, overlap_share=0.0, gold_rate=0.0, seed=7),
               _pairs(50))
    rows = [t.row for t in a.tasks]
    assert rows == [t.row for t in b.tasks] and len(set(rows)) == 10
    assert rows != [t.row for t in c.tasks]
    assert all(t.score is None and t.role == "select" for t in a.tasks)
    # No budget: one label per pair, every pair once.
    everything = S.plan(S.SelectionConfig(overlap_share=0.0), _pairs(7))
    assert sorted(t.row for t in everything.tasks) == list(range(7))


def test_gold_rate_zero_ignores_gold_rows() -> None:
    gold = [((0, 0, 1), [[0], [1]])]
    planned = S.plan(S.SelectionConfig(budget=5, overlap_share=0.0, gold_rate=0.0), _pairs(9),
                     gold)
    assert planned.count("gold") == 0 and planned.labels() == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "greedy"}, "strategy"),
    ({"budget": 0}, "budget"),
    ({"overlap_share": 1.5}, "overlap_share"),
    ({"overlap": 0}, "overlap"),
    ({"gold_rate": 1.0}, "gold_rate"),
    ({"measure": "entropy"}, "measure"),
])
def test_config_refuses_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S.SelectionConfig(**kwargs)


def test_uncertainty_needs_scores() -> None:
    with pytest.raises(ValueError, match="one disagreement score per pair"):
        S.plan(S.SelectionConfig(strategy="uncertainty"), _pairs(3))


def test_uncertainty_scores_score_each_answer_once() -> None:
    calls = []

    def heads(prompts: list, answers: list) -> np.ndarray:
        calls.append(list(answers))
        return np.array([[len(a), -len(a)] for a in answers], dtype=float)

    rows = [CandidatesRecord("p", ["a", "bbb"]), CandidatesRecord("q", ["cc", "d", "eeee"])]
    pairs = S.candidate_pairs(rows)
    got = S.uncertainty_scores(rows, pairs, heads, "std")
    assert calls == [["a", "bbb", "cc", "d", "eeee"]]
    # d = (len a - len b) * [1, -1]: std = |len a - len b|
    np.testing.assert_allclose(got, [2.0, 1.0, 2.0, 3.0])


def test_pairs_without_a_finite_score_are_asked_last(caplog: pytest.LogCaptureFixture) -> None:
    scores = np.linspace(1.0, 0.0, 300)
    scores[3], scores[7] = np.nan, np.inf  # a head that overflowed
    cfg = S.SelectionConfig(strategy="uncertainty", budget=10, overlap_share=0.0, gold_rate=0.0)
    with caplog.at_level("WARNING"):
        planned = S.plan(cfg, _pairs(300), scores=scores)
    want = [i for i in range(12) if i not in (3, 7)]  # the ten highest finite scores, in order
    assert [t.row for t in planned.tasks] == want
    assert "2 of 300 pairs have no finite disagreement score" in caplog.text
    assert S.by_score([3, 0, 7, 1], scores) == [0, 1, 3, 7]


def test_tied_scores_are_drawn_by_the_seed() -> None:
    """An untrained ensemble scores every pair 0: the seed, not the file's order, picks."""
    pairs = [(r, 0, 1) for r in range(50)]
    scores = np.zeros(50)
    picked = [[t.row for t in S.plan(S.SelectionConfig(
        strategy="uncertainty", budget=10, overlap_share=0.0, gold_rate=0.0, seed=seed),
        pairs, scores=scores).tasks] for seed in (0, 1, 0)]
    assert picked[0] == picked[2]  # reproducible
    assert picked[0] != picked[1]
    assert picked[0] != list(range(10)) and max(picked[0]) >= 20  # not the file's first rows
