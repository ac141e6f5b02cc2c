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
    # 6 wins, 2 losses, 2 ties for A: the MLE is θA − θB = log((6 + 1) / (2 + 1)).
    battles = [("A", "B", 1.0)] * 6 + [("A", "B", 0.0)] * 2 + [("B", "A", 0.5)] * 2
    r = M.bradley_terry_ratings(battles)
    expected = M.ELO_SCALE * math.log(7 / 3)
    assert r["A"] - r["B"] == pytest.approx(expected, rel=1e-4)
    assert (r["A"] + r["B"]) / 2 == pytest.approx(1000.0)


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
    ours = M.bradley_terry_ratings(battles)
    theta = _zermelo(battles, ["x", "y", "z"])
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
