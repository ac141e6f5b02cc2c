"""Evaluation statistics against hand-worked examples and an independent Bradley–Terry fit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewardloop import metrics as M
from rewardloop.data.values import length_stats


def test_win_rate_ties_count_half() -> None:
    wr = M.win_rate([3, 1, 2, 5], [1, 1, 4, 0], n_boot=200)
    # outcomes: win, tie, loss, win -> (1 + 0.5 + 0 + 1) / 4
    assert wr.rate == pytest.approx(0.625)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 1, 1, 4)
    assert 0.0 <= wr.ci_low <= wr.rate <= wr.ci_high <= 1.0


def test_win_rate_tie_eps_and_errors() -> None:
    assert M.win_rate([1.0], [1.05], tie_eps=0.1, n_boot=10).ties == 1
    with pytest.raises(ValueError):
        M.win_rate([1, 2], [1])
    with pytest.raises(ValueError):
        M.win_rate([], [])


def test_bootstrap_interval_narrows_with_more_data() -> None:
    small = M.win_rate([1, 0] * 10, [0, 1] * 10, n_boot=500)
    big = M.win_rate([1, 0] * 500, [0, 1] * 500, n_boot=500)
    assert (big.ci_high - big.ci_low) < (small.ci_high - small.ci_low)


def test_two_model_bt_matches_closed_form() -> None:
    # 6 wins, 2 losses, 2 ties for A: the MLE is θA − θB = log((6 + 1) / (2 + 1)); the prior's
    # virtual tie adds half a win to each side.
    battles = [("A", "B", 1.0)] * 6 + [("A", "B", 0.0)] * 2 + [("B", "A", 0.5)] * 2
    r = M.bradley_terry_ratings(battles, prior_ties=0.0)
    assert r["A"] - r["B"] == pytest.approx(M.ELO_SCALE * math.log(7 / 3), rel=1e-4)
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000.0)
    r = M.bradley_terry_ratings(battles)
    assert r["A"] - r["B"] == pytest.approx(M.ELO_SCALE * math.log(7.5 / 3.5), rel=1e-4)
    # a model that won every battle gets a finite rating set by the data: 10-0 is ln 21
    r = M.bradley_terry_ratings([("A", "B", 1.0)] * 10)
    assert r["A"] - r["B"] == pytest.approx(M.ELO_SCALE * math.log(21), rel=1e-4)


def _zermelo(battles, names, iters=5000):
    """Hunter's (2004) MM algorithm: an independent way to the same MLE (ties as half wins)."""
    idx = {m: i for i, m in enumerate(names)}
    n = len(names)
    wins = np.zeros(n)
    games = np.zeros((n, n))
    for a, b, o in battles:
        wins[idx[a]] += o
        wins[idx[b]] += 1 - o
        games[idx[a], idx[b]] += 1
        games[idx[b], idx[a]] += 1
    p = np.ones(n)
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(axis=1)
        p = wins / denom
        p /= np.exp(np.log(p).mean())
    return np.log(p)


def test_three_model_bt_matches_independent_mm_fit() -> None:
    rng = np.random.default_rng(0)
    strength = {"x": 0.8, "y": 0.0, "z": -0.5}
    battles = []
    for _ in range(600):
        a, b = rng.choice(list(strength), size=2, replace=False)
        p = 1 / (1 + math.exp(-(strength[a] - strength[b])))
        u = rng.random()
        battles.append((a, b, 0.5 if abs(u - p) < 0.05 else float(u < p)))
    ours = M.bradley_terry_ratings(battles, prior_ties=0.0)
    theta = _zermelo(battles, ["x", "y", "z"])
    for i, m in enumerate(["x", "y", "z"]):
        assert ours[m] == pytest.approx(1000 + M.ELO_SCALE * theta[i], abs=0.05)
    # the prior is one real tied battle between every two models that met
    ours = M.bradley_terry_ratings(battles)
    theta = _zermelo(battles + [("x", "y", 0.5), ("x", "z", 0.5), ("y", "z", 0.5)],
                     ["x", "y", "z"])
    for i, m in enumerate(["x", "y", "z"]):
        assert ours[m] == pytest.approx(1000 + M.ELO_SCALE * theta[i], abs=0.05)


def test_arena_ratings_intervals_contain_point() -> None:
    battles = [("A", "B", 1.0)] * 30 + [("A", "B", 0.0)] * 10
    out = M.arena_ratings(battles, n_boot=100)
    for m in ("A", "B"):
        assert out[m]["ci_low"] <= out[m]["rating"] <= out[m]["ci_high"]
        assert out[m]["battles"] == 40
    assert out["A"]["rating"] > out["B"]["rating"]
    with pytest.raises(ValueError):
        M.bradley_terry_ratings([("A", "B", 0.3)])


def _width(out: dict, m: str) -> float:
    return out[m]["ci_high"] - out[m]["ci_low"]


def test_arena_intervals_resample_and_narrow_with_more_battles() -> None:
    few = M.arena_ratings([("A", "B", 1.0)] * 6 + [("A", "B", 0.0)] * 2, n_boot=200)
    many = M.arena_ratings([("A", "B", 1.0)] * 60 + [("A", "B", 0.0)] * 20, n_boot=200)
    assert _width(few, "A") > _width(many, "A") > 20  # Elo points: the bootstrap resampled
    # an all-win record still has an upper end set by the data, not by the optimiser
    swept = M.arena_ratings([("A", "B", 1.0)] * 40, n_boot=100)
    assert swept["A"]["ci_high"] - swept["B"]["ci_low"] < 1500


def test_a_rarely_seen_model_does_not_widen_the_others_intervals() -> None:
    # A and B even over 40 battles; C met A once. Resamples without C are aligned on A and B.
    even = [("A", "B", 1.0)] * 20 + [("A", "B", 0.0)] * 20
    alone = M.arena_ratings(even, n_boot=200)
    with_c = M.arena_ratings(even + [("A", "C", 1.0)], n_boot=200)
    assert _width(with_c, "B") < 1.5 * _width(alone, "B")


def test_wilson_interval_and_rate_ci_never_collapse() -> None:
    low, high = M.wilson_interval(1.0, 8)
    assert low == pytest.approx(8 / (8 + M.Z_95**2)) and high == 1.0
    assert M.wilson_interval(0.0, 6)[1] == pytest.approx(M.Z_95**2 / (6 + M.Z_95**2))
    # the bootstrap of 8 wins out of 8 is the point [1, 1]; the reported interval is Wilson's
    rate = M.win_rate([1.0] * 8, [0.0] * 8)
    assert (rate.ci_low, rate.ci_high) == pytest.approx((low, 1.0))
    # one unit: an interval that says how little it knows
    assert M.ratio_ci(np.array([1.0]), np.array([1.0])) == pytest.approx(
        list(M.wilson_interval(1.0, 1)))
    # many units: the bootstrap (wider than Wilson for a clustered statistic) is kept
    num, den = np.array([3.0, 0.0] * 20), np.array([3.0, 3.0] * 20)
    low, high = M.ratio_ci(num, den)
    assert low < 0.5 < high and (low, high) != pytest.approx(M.wilson_interval(0.5, 40))


def test_group_accuracy_intervals_resample_judgments_not_pairs() -> None:
    # 10 rankings of 4 answers (6 pairs each): 5 all right, 5 all wrong. Pairs of a judgment
    # stand or fall together, so the interval is that of 10 units, not of 60.
    correct = [1.0] * 30 + [0.0] * 30
    groups = ["g"] * 60
    judgments = [k // 6 for k in range(60)]
    by_pairs = M.accuracy_by_group(correct, groups)["g"]
    by_judgments = M.accuracy_by_group(correct, groups, judgment_of_pair=judgments)["g"]
    assert by_pairs["accuracy"] == by_judgments["accuracy"] == 0.5
    assert by_pairs["pairs"] == by_judgments["pairs"] == 60
    width = by_judgments["accuracy_ci"][1] - by_judgments["accuracy_ci"][0]
    assert width > 1.5 * (by_pairs["accuracy_ci"][1] - by_pairs["accuracy_ci"][0])


def test_pair_credit_gives_an_exact_tie_half() -> None:
    np.testing.assert_array_equal(M.pair_credit([2.0, 0.0, -0.5, -0.0, 1e-12]),
                                  [1.0, 0.5, 0.0, 0.5, 1.0])
    assert float(M.pair_credit(0)) == 0.5


def test_ece_hand_worked() -> None:
    # bin [0.8, 0.9]: confidences 0.85, 0.85 with labels 1, 0 -> |0.5 - 0.85| = 0.35, weight 0.5
    # bin [0.1, 0.2]: confidences 0.15, 0.15 with labels 0, 0 -> |0 - 0.15| = 0.15, weight 0.5
    ece, rows = M.expected_calibration_error([0.85, 0.85, 0.15, 0.15], [1, 0, 0, 0], n_bins=10)
    assert ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)
    assert [r["count"] for r in rows] == [2, 2]


def test_length_stats() -> None:
    s = length_stats(["ab", "abcd"])
    assert s["chars_mean"] == 3.0 and s["words_mean"] == 1.0 and s["n"] == 2


def test_ece_weighs_bins_by_their_counts_and_keeps_the_edges() -> None:
    # three predictions at 0.95 (two right), one at 0.25 (wrong), and the edges 0.0, 0.1, 1.0
    probs = [0.95, 0.95, 0.95, 0.25, 0.0, 0.1, 1.0]
    labels = [1, 1, 0, 0, 0, 1, 1]
    ece, rows = M.expected_calibration_error(probs, labels, n_bins=10)
    by_low = {round(r["bin_low"], 1): r for r in rows}
    assert by_low[0.9]["count"] == 4 and by_low[0.9]["confidence"] == pytest.approx(0.9625)
    assert by_low[0.0]["count"] == 2  # 0.0 and 0.1 (bins are closed on the right)
    assert by_low[0.2]["count"] == 1
    assert sum(r["count"] for r in rows) == 7  # 1.0 is in the last bin, not dropped
    expected = (4 * abs(0.75 - 0.9625) + 2 * abs(0.5 - 0.05) + 1 * abs(0.0 - 0.25)) / 7
    assert ece == pytest.approx(expected)
