"""``eval.evaluate``: win rates from battles by hand, judges, and a tiny end-to-end evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rewardloop.errors import UserError
from rewardloop.eval.evaluate import (
    EvalConfig,
    arena_result,
    battle_win_rate,
    compare,
    evaluate,
    judge_name,
    store_arena,
)

GOLD = "rewardloop.synthetic:gold_score"


def test_battle_win_rate_by_hand() -> None:
    # policy P vs baseline B, either side of the pair: P wins, tie, B wins, P wins (as b).
    battles = [("P", "B", 1.0), ("P", "B", 0.5), ("P", "B", 0.0), ("B", "P", 0.0),
               ("P", "C", 1.0)]  # a battle with another model does not count
    rate = battle_win_rate(battles, "P", "B", n_boot=200)
    assert rate is not None
    assert rate.rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (rate.wins, rate.ties, rate.losses) == (2, 1, 1)
    assert 0.0 <= rate.ci_low <= rate.rate <= rate.ci_high <= 1.0
    assert battle_win_rate(battles, "B", "C") is None


def test_arena_result_ratings_and_direct_win_rate() -> None:
    battles = [("P", "B", 1.0)] * 6 + [("P", "B", 0.0)] * 2
    out = arena_result(battles, policy="P", baseline="B", n_boot=50)
    assert out["battles"] == 8 and out["win_rate"] == pytest.approx(0.75)
    assert out["ratings"]["P"]["rating"] > out["ratings"]["B"]["rating"]
    with pytest.raises(UserError):
        arena_result([])


def test_compare_counts_ties_half() -> None:
    row = compare(GOLD, [1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0], n_boot=100)
    assert row["name"] == "gold_score"
    assert row["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert (row["wins"], row["ties"], row["losses"]) == (2, 1, 1)
    assert row["policy_mean"] == pytest.approx(1.5) and row["baseline_mean"] == pytest.approx(1.25)


def test_judge_name(tmp_path: Path) -> None:
    (tmp_path / "rm-run" / "model").mkdir(parents=True)
    assert judge_name(str(tmp_path / "rm-run" / "model")) == "rm-run"
    assert judge_name(str(tmp_path / "rm-run")) == "rm-run"
    assert judge_name(GOLD) == "gold_score" and judge_name("human") == "human"


@pytest.mark.parametrize(("bad", "words"), [
    ({"judges": ()}, ""), ({"n": 0}, ""), ({"policy_name": "baseline"}, ""),
    ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"n_boot": 0}, "n_boot must be at least 1, got 0"),
    ({"tie_eps": -1.0}, "tie_eps must be >= 0, got -1.0")])
def test_config_validation(bad: dict, words: str, tmp_path: Path) -> None:
    """A refusal names the value that is wrong, not every check at once."""
    base = {"policy": "a", "baseline": "b", "prompts": tmp_path / "p.jsonl", "out": tmp_path,
            "judges": (GOLD,)}
    with pytest.raises(ValueError, match=words):
        EvalConfig(**{**base, **bad})


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    root = tmp_path_factory.mktemp("eval")
    texts = synthetic.corpus_texts(200)
    a = build_tiny(root / "a", texts=texts, vocab_size=300, hidden_size=16, num_layers=1,
                   num_heads=2, seed=0)
    b = build_tiny(root / "b", texts=texts, vocab_size=300, hidden_size=16, num_layers=1,
                   num_heads=2, seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(6)))
    return a, b, prompts


def test_policy_against_itself_ties_with_zero_kl(tiny_pair: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    a, _, prompts = tiny_pair
    out = evaluate(EvalConfig(policy=str(a), baseline=str(a), prompts=prompts, out=tmp_path,
                              judges=(GOLD,), max_new_tokens=8, n_boot=50))
    # the same model and seed give the same answers: every item ties, the KL is exactly 0
    assert out["win_rate"] == 0.5 and out["ties"] == 6
    # six ties do not prove the two equal: the interval is Wilson's at 6 items, not [0.5, 0.5]
    assert out["win_rate_ci"][0] < 0.3 and out["win_rate_ci"][1] > 0.7
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["comparisons"][0]["judge"] == GOLD and saved["n"] == 6
    # what it takes to run it again: the prompts and the sampling settings
    assert saved["config"]["prompts"] == str(prompts) and saved["config"]["max_new_tokens"] == 8
    assert {"seed", "temperature", "max_prompt_length"} <= set(saved["config"])
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["policy"] == r["baseline"] for r in rows)
    assert set(saved["length"]) == {"policy", "baseline"}
    # Like every run directory (DESIGN.md): the resolved config and a summary.
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == saved["config"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2  # one generation batch of 6 prompts per side
    assert summary["win_rate"] == 0.5 and summary["n"] == 6 and summary["peak_rss_mb"] > 0
    # 12 answers of 1 to 8 completion tokens each (wall_s is rounded to the millisecond)
    assert summary["samples_per_s"] * summary["wall_s"] == pytest.approx(12, rel=0.01)
    assert 12 * 0.99 <= summary["tokens_per_s"] * summary["wall_s"] <= 12 * 8 * 1.01


def test_the_kl_is_policy_over_baseline_on_the_policys_answers(
        tiny_pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """KL(policy || baseline) at the sampling temperature, by hand from the two models' logits
    on the policy's own sampled answers (the direction, the answers and the temperature each
    change the figure)."""
    import torch

    from rewardloop.eval.evaluate import load_for_generation, sample_answers

    a, b, prompts = tiny_pair
    temperature = 0.7
    out = evaluate(EvalConfig(policy=str(a), baseline=str(b), prompts=prompts, out=tmp_path,
                              judges=(GOLD,), max_new_tokens=8, n_boot=20,
                              temperature=temperature))
    model_a, tok = load_for_generation(str(a))
    model_b, _ = load_for_generation(str(b))
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    answers = sample_answers(model_a, tok, [r["prompt"] for r in rows], max_new_tokens=8,
                             temperature=temperature, seed=0)
    total = 0.0
    with torch.no_grad():
        for r in answers.rollouts:
            ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
            mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
            start = r.prompt_ids.shape[1]
            sides = []
            for model in (model_a, model_b):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, start - 1:-1]
                logp = torch.log_softmax(logits.float() / temperature, dim=-1)
                sides.append(logp.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1))
            total += float(((sides[0] - sides[1]) * r.completion_mask).sum())
    expected = total / len(rows)
    assert out["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert abs(expected) > 0.05  # two different models: the test can tell the cases apart


def test_human_judge_creates_arena_tasks(tiny_pair: tuple[Path, Path, Path],
                                         tmp_path: Path) -> None:
    from rewardloop.data.store import Store
    from rewardloop.feedback.simulate import SimulatedAnnotator, simulate

    a, b, prompts = tiny_pair
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    out = evaluate(EvalConfig(policy=str(a), baseline=str(b), prompts=prompts,
                              out=tmp_path / "ev", judges=("human", GOLD), max_new_tokens=8,
                              n_boot=50, db=db, policy_name="A", baseline_name="B"))
    human = out["comparisons"][0]
    assert human["status"] == "pending" and "win_rate" not in out
    assert human["tasks"] + human["identical_pairs_skipped"] == 6
    assert out["comparisons"][1]["n"] == 6
    store = Store(db)
    try:
        simulate(store, [SimulatedAnnotator("p1")], GOLD, batch="eval-arena")
    finally:
        store.dispose()
    result = store_arena(db, "eval-arena", policy="A", baseline="B", n_boot=20)
    assert result["battles"] == human["tasks"]
    assert result["n"] == human["tasks"] and set(result["ratings"]) == {"A", "B"}


def test_human_judge_with_every_pair_identical_says_there_is_nothing_to_judge(
        tiny_pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The same model on both sides gives the same answers: no arena task is made, and the
    command says so instead of sending the user to judge none."""
    from typer.testing import CliRunner

    from rewardloop.cli import app

    a, _, prompts = tiny_pair
    db = f"sqlite:///{tmp_path / 'arena.db'}"
    result = CliRunner().invoke(app, [
        "eval", "--policy", str(a), "--baseline", str(a), "--prompts", str(prompts),
        "--judge", "human", "--db", db, "--out", str(tmp_path / "ev"), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "human: all 6 answer pairs were identical: nothing to judge" in result.output
    assert "Judge them" not in result.output
    human = json.loads((tmp_path / "ev" / "eval.json").read_text())["comparisons"][0]
    assert (human["tasks"], human["identical_pairs_skipped"]) == (0, 6)
