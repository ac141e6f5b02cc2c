"""Simulated annotators: choice probabilities, biases, ties, spammers, pools, gold functions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.errors import UserError
from rewardloop.feedback.simulate import (
    SimulatedAnnotator,
    judge_offline,
    load_gold,
    load_pool,
    parse_pool,
    score_gold,
)

N = 4000  # draws per frequency check: standard error <= 0.008


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _first_wins(sim: SimulatedAnnotator, texts: list[str], gold: list, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([sim.judge("p", texts, gold, rng)[0] == [0] for _ in range(N)]))


def test_bradley_terry_choice_probability() -> None:
    sim = SimulatedAnnotator("a", temperature=0.5)
    # P(first > second) = sigma((1.0 - 0.5) / 0.5) = sigma(1)
    assert _first_wins(sim, ["x", "y"], [1.0, 0.5]) == pytest.approx(_sigmoid(1.0), abs=0.03)


def test_position_and_length_bias_add_logits() -> None:
    pos = SimulatedAnnotator("a", position_bias=1.0)
    assert _first_wins(pos, ["x", "y"], [0.0, 0.0]) == pytest.approx(_sigmoid(1.0), abs=0.03)
    length = SimulatedAnnotator("b", length_bias=0.5)
    # The first answer is 200 characters longer: +0.5 logit per 100 characters = +1.
    assert _first_wins(length, ["x" * 210, "y" * 10], [0.0, 0.0]) == pytest.approx(
        _sigmoid(1.0), abs=0.03)


def test_plackett_luce_top_choice_is_softmax() -> None:
    sim = SimulatedAnnotator("a", temperature=1.0)
    gold = [1.0, 0.0, -1.0]
    rng = np.random.default_rng(1)
    rankings = [sim.judge("p", ["a", "b", "c"], gold, rng) for _ in range(N)]
    assert all(sorted(i for g in r for i in g) == [0, 1, 2] for r in rankings)
    top = np.bincount([r[0][0] for r in rankings], minlength=3) / N
    assert np.allclose(top, np.exp(gold) / np.exp(gold).sum(), atol=0.03)
    # Given 0 won, 1 beats 2 with probability sigma(1).
    rest = [r[1][0] == 1 for r in rankings if r[0] == [0]]
    assert np.mean(rest) == pytest.approx(_sigmoid(1.0), abs=0.04)


def test_ties_flips_and_spammers() -> None:
    rng = np.random.default_rng(2)
    always_tie = SimulatedAnnotator("t", tie_threshold=0.5, tie_prob=1.0)
    (group,) = always_tie.judge("p", ["a", "b", "c"], [0.1, 0.0, 0.2], rng)
    assert sorted(group) == [0, 1, 2]
    never = SimulatedAnnotator("n", tie_threshold=0.5, tie_prob=0.0)
    assert len(never.judge("p", ["a", "b"], [0.1, 0.0], rng)) == 2
    far = SimulatedAnnotator("f", tie_threshold=0.5, tie_prob=1.0, temperature=0.01)
    assert far.judge("p", ["a", "b"], [0.0, 3.0], rng) == [[1], [0]]
    flipper = SimulatedAnnotator("x", temperature=0.01, flip=1.0)
    assert flipper.judge("p", ["a", "b", "c"], [3.0, 2.0, 1.0], rng) == [[2], [1], [0]]
    constant = SimulatedAnnotator("c", spam="constant")
    assert constant.judge("p", ["a", "b", "c"], [0.0, 5.0, 9.0], rng) == [[0], [1], [2]]
    rand = SimulatedAnnotator("r", spam="random")
    firsts = [rand.judge("p", ["a", "b"], [0.0, 9.0], rng)[0] == [0] for _ in range(N)]
    assert np.mean(firsts) == pytest.approx(0.5, abs=0.03)


def test_component_weights_decide_what_a_group_prefers() -> None:
    rng = np.random.default_rng(3)
    gold = [{"q": 2.0, "brevity": -3.0}, {"q": 0.0, "brevity": 0.0}]
    quality_first = SimulatedAnnotator("q", temperature=0.01, weights={"q": 1.0})
    brevity_first = SimulatedAnnotator("b", temperature=0.01, weights={"brevity": 1.0})
    both = SimulatedAnnotator("all", temperature=0.01)  # all components, weight 1 each: -1 vs 0
    assert quality_first.judge("p", ["a", "b"], gold, rng) == [[0], [1]]
    assert brevity_first.judge("p", ["a", "b"], gold, rng) == [[1], [0]]
    assert both.judge("p", ["a", "b"], gold, rng) == [[1], [0]]
    # A float gold score is the component "score".
    assert SimulatedAnnotator("s", temperature=0.01, weights={"score": -1.0}).judge(
        "p", ["a", "b"], [1.0, 0.0], rng) == [[1], [0]]
    with pytest.raises(UserError, match="weights name gold components"):
        quality_first.judge("p", ["a", "b"], [1.0, 0.0], rng)


def test_time_ms_is_plausible() -> None:
    sim = SimulatedAnnotator("a", time_median_s=20.0, time_sigma=0.5)
    rng = np.random.default_rng(4)
    times = np.array([sim.sample_time_ms(rng) for _ in range(2000)])
    assert times.dtype.kind == "i" and (times > 0).all()
    assert np.median(times) == pytest.approx(20_000, rel=0.08)


def test_invalid_annotator_settings() -> None:
    for bad in ({"temperature": 0.0}, {"flip": 1.5}, {"tie_prob": -0.1}, {"spam": "sometimes"},
                {"tie_threshold": -1.0}, {"time_median_s": 0.0}):
        with pytest.raises(ValueError):
            SimulatedAnnotator("a", **bad)


# -- pools ---------------------------------------------------------------------------------------


def test_pool_expansion_and_group_weights() -> None:
    pool = parse_pool({
        "groups": {"experts": {"weights": {"q": 1.0, "brevity": 0.5}}},
        "annotators": [
            {"name": "support", "count": 3, "group": "crowd", "temperature": 1.5},
            {"name": "expert-{i}", "count": 2, "group": "experts"},
            {"name": "solo", "group": "experts", "weights": {"q": 2.0}},
            {"name": "bot", "spam": "random"},
        ]})
    assert [a.name for a in pool] == ["support-1", "support-2", "support-3", "expert-1",
                                      "expert-2", "solo", "bot"]
    assert pool[0].temperature == 1.5 and pool[0].group == "crowd"
    assert pool[3].weights == {"q": 1.0, "brevity": 0.5}
    assert pool[5].weights == {"q": 2.0}  # the annotator's own weights win
    assert pool[6].spam == "random" and pool[6].group is None


@pytest.mark.parametrize("data, message", [
    ([1, 2], "a pool is a mapping"),
    ({"annotators": []}, "no annotators"),
    ({"annotators": [{"count": 2}]}, "needs a name"),
    ({"annotators": [{"name": "a", "noise": 1}]}, "unknown keys"),
    ({"annotators": [{"name": "a", "temperature": -1}]}, "temperature must be > 0"),
    ({"annotators": [{"name": "a", "count": 0}]}, "count must be"),
    ({"annotators": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"annotators": [{"name": "a"}], "extra": 1}, "unknown top-level"),
    ({"annotators": ["a"]}, "expected a mapping"),
    ({"annotators": [{"name": "a"}], "groups": {"g": {"w": 1}}}, "'groups' must map"),
])
def test_bad_pools_are_user_errors(data: object, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_pool(data, "pool.yaml")


def test_load_pool_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such pool file"):
        load_pool(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("annotators: [name: x\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_pool(bad)


def test_shipped_example_pool_loads() -> None:
    pool = load_pool(Path(__file__).parents[2] / "examples" / "pool.yaml")
    assert len(pool) >= 5 and {a.spam for a in pool} >= {None, "random", "constant"}


# -- gold functions ------------------------------------------------------------------------------


def test_load_and_check_gold() -> None:
    fn = load_gold("_gold:quality_gold")
    assert score_gold(fn, ["p", "p"], ["a q=1.5", "b q=-2"]) == [1.5, -2.0]
    two = load_gold("_gold:two_part_gold")
    assert score_gold(two, ["p"], ["a q=1"]) == [{"q": 1.0, "brevity": -0.05}]
    with pytest.raises(UserError, match="returned 1 scores for 2"):
        score_gold(load_gold("_gold:wrong_length"), ["p", "p"], ["a", "b"])
    with pytest.raises(UserError, match="expected a finite number"):
        score_gold(load_gold("_gold:wrong_type"), ["p"], ["a"])
    with pytest.raises(UserError, match="expected a list"):
        score_gold(lambda prompts, completions: 3.0, ["p"], ["a"])


def test_a_gold_function_that_raises_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="gold function _gold:boom raised RuntimeError: "
                                        "kaboom at the second line"):
        score_gold(load_gold("_gold:boom"), ["p"], ["a"], "_gold:boom")
    # On the command line: exit 2 and one line, no traceback.
    db = f"sqlite:///{tmp_path / 's.db'}"
    cands = tmp_path / "cands.jsonl"
    cands.write_text(json.dumps({"prompt": "q", "responses": ["a q=1", "b q=2"]}) + "\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text("annotators:\n  - name: sim\n")
    runner = CliRunner()
    assert runner.invoke(app, ["tasks", "create", str(cands), "--db", db]).exit_code == 0
    res = runner.invoke(app, ["simulate", "--pool", str(pool), "--gold", "_gold:boom",
                              "--db", db])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "error: gold function _gold:boom raised RuntimeError: kaboom at the second line"]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "not of the form"),
    ("no_such_module_xyz:fn", "cannot import module"),
    ("_gold:missing", "has no function"),
    (":fn", "not of the form"),
])
def test_bad_gold_specs(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_gold(spec)


def test_ties_do_not_chain_across_larger_gaps() -> None:
    """Gold 0, .2, .4, .6 with tie_threshold .25: a tie may hold neighbours .2 apart, never
    answers .4 or more apart."""
    sim = SimulatedAnnotator("t", tie_threshold=0.25, tie_prob=1.0, temperature=0.01)
    gold = [0.0, 0.2, 0.4, 0.6]
    for seed in range(20):
        groups = sim.judge("p", ["a", "b", "c", "d"], gold, np.random.default_rng(seed))
        assert sorted(i for g in groups for i in g) == [0, 1, 2, 3]
        for group in groups:
            assert max(gold[i] for i in group) - min(gold[i] for i in group) < 0.25, groups
    assert sim.judge("p", ["a", "b", "c", "d"], gold, np.random.default_rng(0)) == [
        [3, 2], [1, 0]]


def test_judge_offline_calls_gold_like_simulate() -> None:
    """TRL's keyword signature works, and a non-finite gold score is refused, as in simulate."""
    pool = [SimulatedAnnotator("a", temperature=0.01)]
    rows = [{"prompt": "p", "responses": ["x", "yy"]}]

    def by_length(*, prompts: list, completions: list, **kwargs: object) -> list[float]:
        return [float(len(c)) for c in completions]

    assert judge_offline(pool, rows, by_length) == [
        {"prompt": "p", "chosen": "yy", "rejected": "x", "annotator": "a"}]
    with pytest.raises(UserError, match="nan"):
        judge_offline(pool, rows, lambda prompts, completions: [float("nan"), 1.0])
