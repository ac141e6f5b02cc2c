"""A tiny 2-round loop: interrupted after a stage and resumed, it skips finished stages and ends
in the same state as an uninterrupted run; ``loop status`` and the CLI read it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rewardloop.loop import STAGE_TABLE, run_loop
from rewardloop.loop_config import STAGES, LoopConfig, loop_status

GOLD = "rewardloop.synthetic:gold_score"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    root = tmp_path_factory.mktemp("loop")
    model = build_tiny(root / "tiny", texts=synthetic.corpus_texts(200), vocab_size=300,
                       hidden_size=16, num_layers=1, num_heads=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(24)))
    pool = root / "pool.yaml"
    pool.write_text(yaml.safe_dump({"annotators": [
        {"name": "a-{i}", "count": 2, "temperature": 0.5}]}))
    return {"model": model, "prompts": prompts, "pool": pool}


def _config(setup: dict[str, Path], workdir: Path) -> LoopConfig:
    return LoopConfig(
        policy=str(setup["model"]), prompts=setup["prompts"], workdir=workdir, rounds=2,
        prompts_per_round=10, overlap=1, pool=setup["pool"], gold=GOLD, eval_n=4,
        max_new_tokens=6, seed=3,
        rm_options={"max_steps": 2, "batch_size": 4},
        policy_options={"max_steps": 1, "batch_size": 4, "num_generations": 2, "lr": 1e-4})


class Interrupt(Exception):
    pass


def _markers(workdir: Path) -> dict[str, str]:
    return {str(p.relative_to(workdir)): p.read_text() for p in workdir.glob("round-*/*/DONE.json")}


def _figures(summary: dict) -> list[dict]:
    """Per-round figures without wall-clock timings."""
    drop = ("wall_s", "samples_per_s", "tokens_per_s", "time_", "finished")
    return [{k: v for k, v in r.items() if not any(d in k for d in drop)}
            for r in summary["per_round"]]


def test_interrupted_loop_resumes_where_it_stopped(setup: dict[str, Path],
                                                  tmp_path: Path) -> None:
    straight = run_loop(_config(setup, tmp_path / "straight"))
    workdir = tmp_path / "resumed"
    cfg = _config(setup, workdir)

    def stop_after_round1_rm(n: int, stage: str) -> None:
        if (n, stage) == (1, "rm"):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_loop(cfg, after_stage=stop_after_round1_rm)
    status = loop_status(workdir)
    assert [s for s, state in status[0]["stages"].items() if state == "done"] == \
        ["generate", "tasks", "feedback", "rm"]
    before = _markers(workdir)

    ran: list[tuple[int, str]] = []
    resumed = run_loop(cfg, after_stage=lambda n, s: ran.append((n, s)))
    after = _markers(workdir)
    # finished stages were not redone: their markers are untouched
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == 2 * len(STAGES)
    # the stages ran in the table's order, whose names are the ones `loop status` reads
    assert [name for name, _ in STAGE_TABLE] == list(STAGES)
    assert ran == [(n, s) for n in (1, 2) for s in STAGES]
    assert _figures(resumed) == _figures(straight)
    assert resumed["best"]["round"] in (1, 2)
    assert json.loads((workdir / "best.json").read_text())["round"] == resumed["best"]["round"]
    for key in ("gold_win_rate", "gold_win_rate_ci", "rm_accuracy", "kl", "alarms"):
        assert key in resumed
    # round 2 starts from round 1's policy and warm-starts from its reward model
    rm_cfg = yaml.safe_load((workdir / "round-2" / "rm" / "config.yaml").read_text())
    assert rm_cfg["model"] == str(workdir / "round-1" / "rm" / "model")
    assert (workdir / "round-1" / "eval" / "eval.json").is_file()

    # a finished run started again does nothing
    ran.clear()
    run_loop(cfg, after_stage=lambda n, s: ran.append((n, s)))
    assert _markers(workdir) == after


def test_loop_status_cli(setup: dict[str, Path], tmp_path: Path) -> None:
    from rewardloop.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["loop", "status", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "no rounds yet" in result.output
    (tmp_path / "round-1" / "generate").mkdir(parents=True)
    result = runner.invoke(app, ["loop", "status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "partial" in result.output and "pending" in result.output


def test_loop_config_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    from rewardloop.cli import app

    bad = tmp_path / "loop.yaml"
    bad.write_text(yaml.safe_dump({"policy": "x", "prompts": "p.jsonl", "algorithm": "magic"}))
    result = CliRunner().invoke(app, ["loop", "--config", str(bad)])
    assert result.exit_code == 2
    assert "algorithm must be one of" in result.output
    with pytest.raises(ValueError, match="arena"):
        LoopConfig(policy="x", prompts=Path("p"), arena=True)
