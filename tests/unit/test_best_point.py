"""Held-out split by prompt (stratified by group), the best point and early stopping: pure
pieces with hand-made inputs, then a reward-model run made to overfit, whose model/ must be
the checkpoint of the step with the lowest held-out loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.errors import UserError
from rewardloop.options import BestPointOptions
from rewardloop.synthetic import corpus_texts, preference_rows
from rewardloop.tiny import build_tiny
from rewardloop.train.checkpoint import restore_weights
from rewardloop.train.early_stop import BestPoint, evaluation_due
from rewardloop.train.reward import RewardConfig, load_model, load_tokenizer_for, train_rm
from rewardloop.train.runtime import Runtime, RuntimeOptions
from rewardloop.train.split import split_by_prompt


def test_split_keeps_every_prompt_on_one_side_and_holds_out_about_the_fraction() -> None:
    prompts = [f"p{i % 20}" for i in range(100)]  # 20 prompts, 5 rows each
    train, held = split_by_prompt(prompts, [None] * 100, {}, 0.2, seed=1)
    assert sorted(train + held) == list(range(100))
    assert not {prompts[i] for i in train} & {prompts[i] for i in held}
    assert len(held) == 20  # 4 whole prompts
    assert split_by_prompt(prompts, [None] * 100, {}, 0.2, seed=1) == (train, held)
    assert split_by_prompt(prompts, [None] * 100, {}, 0.2, seed=2) != (train, held)


def test_split_gives_every_group_held_out_judgments() -> None:
    """A small group (2 of 60 rows, on 2 prompts) that a plain 10% split would usually miss
    gets one of its prompts held out; a group on a single prompt cannot be split and is left
    on the training side."""
    prompts = [f"p{i}" for i in range(60)]
    annotators = ["rare" if i in (7, 41) else "lonely" if i == 3 else "big" for i in range(60)]
    groups = {"rare": ["r"], "lonely": ["l"], "big": ["b"]}
    for seed in range(10):
        train, held = split_by_prompt(prompts, annotators, groups, 0.1, seed)
        held_names = {annotators[i] for i in held}
        assert "rare" in held_names and "big" in held_names
        assert sum(annotators[i] == "rare" for i in train) == 1
        assert 6 <= len(held) <= 7


def test_split_refuses_a_single_prompt() -> None:
    with pytest.raises(UserError, match="at least 2 different prompts"):
        split_by_prompt(["same"] * 5, [None] * 5, {}, 0.5, 0)


def test_best_point_remembers_the_lowest_loss_and_stops_after_patience() -> None:
    best = BestPoint(patience=2)
    assert best.update(2, 0.70, {"eval_loss": 0.70}) and best.best_step == 2
    assert best.update(4, 0.65, {"eval_loss": 0.65, "eval_accuracy": 0.6})
    assert not best.update(6, 0.66, {}) and not best.should_stop
    assert not best.update(8, float("nan"), {}) and best.should_stop
    assert best.summary() == {"best_step": 4, "best_eval_loss": 0.65,
                              "best_eval_accuracy": 0.6}
    again = BestPoint(patience=2)
    again.load_state_dict(best.state_dict())
    assert again == best
    assert BestPoint().summary() == {}
    assert [s for s in range(1, 11) if evaluation_due(s, 10, 4)] == [4, 8, 10]
    assert [s for s in range(1, 11) if evaluation_due(s, 10, 0)] == [10]


@pytest.mark.parametrize(("kw", "message"), [
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"eval_fraction": 0.1, "eval_data": "x"}, "not both"),
    ({"eval_every": 5}, "needs held-out data"),
    ({"eval_every": 0, "early_stopping_patience": 2, "eval_fraction": 0.1}, "needs --eval-every"),
])
def test_best_point_options_refuse_inconsistent_flags(kw: dict, message: str) -> None:
    eval_data = kw.pop("eval_data", None)
    with pytest.raises(ValueError, match=message):
        BestPointOptions(**kw).check_best_point(eval_data)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", corpus_texts(200),
                      vocab_size=300, hidden_size=16, num_layers=1, num_heads=2,
                      max_position=128)


def _overfit_cfg(tiny_dir: Path, tmp_path: Path, **kw) -> RewardConfig:
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(40, seed=3)))
    base = {"lr": 1e-2, "max_length": 64, "batch_size": 4, "device": "cpu",
            "schedule": "constant", "max_steps": 20, "eval_fraction": 0.3, "eval_every": 2}
    return RewardConfig(model=str(tiny_dir), data=data, out=tmp_path / "run", **{**base, **kw})


def _evals(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


def test_an_overfit_reward_model_is_saved_at_its_best_held_out_step(tiny_dir: Path,
                                                                     tmp_path: Path) -> None:
    """28 pairs, 20 steps at lr 1e-2: the held-out loss falls, then climbs as the model
    memorises. model/ must be the checkpoint of the step with the lowest held-out loss, and
    summary.json must say so beside the final figures."""
    cfg = _overfit_cfg(tiny_dir, tmp_path)
    summary = train_rm(cfg)
    evals = _evals(cfg.out)
    assert sorted(evals) == list(range(2, 21, 2))
    best_step = min(evals, key=evals.__getitem__)
    assert summary["best_step"] == best_step < 20  # it did overfit
    assert summary["best_eval_loss"] == pytest.approx(evals[best_step])
    assert summary["eval_loss"] == pytest.approx(evals[20])
    assert summary["eval_loss"] > summary["best_eval_loss"]
    assert summary["eval_source"] == "eval_fraction"
    assert summary["train_comparisons"] + summary["eval_comparisons"] == 40
    # The held-out rows are kept, to slice the held-out figures by anything they hold.
    assert summary["eval_split"] == "eval_split.jsonl"
    held = [json.loads(x) for x in (cfg.out / "eval_split.jsonl").read_text().splitlines()]
    assert len(held) == summary["eval_comparisons"] and {"prompt", "chosen"} <= set(held[0])
    # model/ holds exactly the weights of the kept best checkpoint.
    rt = Runtime(RuntimeOptions())
    model = load_model(cfg, load_tokenizer_for(cfg), rt)
    restore_weights(cfg.out / "checkpoints" / f"step-{best_step}", models={"reward": model})
    saved = load_file(str(cfg.out / "model" / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    # The reward statistics RL normalises with are those of the best model.
    stats = json.loads((cfg.out / "model" / "reward_stats.json").read_text())
    assert stats["source"] == "eval" and stats["n"] == 2 * summary["eval_comparisons"]


def test_early_stopping_ends_the_run_patience_evaluations_after_the_best(
        tiny_dir: Path, tmp_path: Path) -> None:
    full = train_rm(_overfit_cfg(tiny_dir, tmp_path / "full"))
    cfg = _overfit_cfg(tiny_dir, tmp_path / "stop", early_stopping_patience=2)
    summary = train_rm(cfg)
    assert summary["best_step"] == full["best_step"]
    assert summary["steps"] == full["best_step"] + 2 * 2
    assert max(_evals(cfg.out)) == summary["steps"]
    stopped = load_file(str(cfg.out / "model" / "model.safetensors"))
    whole = load_file(str(tmp_path / "full" / "run" / "model" / "model.safetensors"))
    assert stopped.keys() == whole.keys()
    assert all(torch.equal(stopped[k], whole[k]) for k in whole)  # the same best step


def test_cli_refuses_eval_every_without_held_out_data(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(4)))
    result = CliRunner().invoke(app, ["train", "rm", "--model", str(tiny_dir), "--data",
                                      str(data), "--out", str(tmp_path / "o"),
                                      "--eval-every", "5"])
    assert result.exit_code == 2 and "needs held-out data" in result.output


def test_an_overfit_dpo_policy_is_saved_at_its_best_held_out_step(tiny_dir: Path,
                                                                   tmp_path: Path) -> None:
    from rewardloop.train.dpo import DPOConfig, load_model, train_dpo

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in preference_rows(40, seed=3)))
    cfg = DPOConfig(model=str(tiny_dir), data=data, out=tmp_path / "run", lr=1e-2,
                    max_length=64, batch_size=4, device="cpu", schedule="constant",
                    max_steps=16, eval_fraction=0.3, eval_every=2, early_stopping_patience=3)
    summary = train_dpo(cfg)
    evals = _evals(cfg.out)
    best_step = min(evals, key=evals.__getitem__)
    assert summary["best_step"] == best_step < max(evals) == summary["steps"]
    assert summary["best_eval_loss"] == pytest.approx(evals[best_step])
    assert summary["pairs"] + 12 == 40 and summary["eval_source"] == "eval_fraction"
    model = load_model(cfg, load_tokenizer_for(cfg), Runtime(RuntimeOptions()))
    restore_weights(cfg.out / "checkpoints" / f"step-{best_step}", models={"policy": model})
    saved = load_file(str(cfg.out / "model" / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


def test_a_resumed_run_keeps_its_best_point(tiny_dir: Path, tmp_path: Path) -> None:
    """Stopped after step 4 and resumed to step 10: the same best step, best figures and
    model/ as the run that never stopped (the best state travels in the checkpoint, and the
    best checkpoint survives the pruning of older ones)."""
    whole = train_rm(_overfit_cfg(tiny_dir, tmp_path / "whole", max_steps=10, eval_every=1))
    cut = _overfit_cfg(tiny_dir, tmp_path / "cut", max_steps=4, eval_every=1, save_every=2)
    train_rm(cut)
    resumed = train_rm(_overfit_cfg(tiny_dir, tmp_path / "cut", max_steps=10, eval_every=1,
                                    save_every=2, resume=True))
    assert whole["best_step"] < 10
    assert resumed["best_step"] == whole["best_step"]
    assert resumed["best_eval_loss"] == pytest.approx(whole["best_eval_loss"], abs=1e-6)
    a = load_file(str(tmp_path / "whole" / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "run" / "model" / "model.safetensors"))
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-6, rtol=0)


def test_held_out_rows_leave_out_flagged_annotators(tmp_path: Path) -> None:
    from rewardloop.train.comparisons import train_and_eval_records

    rows = preference_rows(30, seed=5)
    for i, row in enumerate(rows):
        row["annotator"] = "spammer" if i % 3 == 0 else f"a{i % 2}"
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardConfig(model="m", data=data, out=tmp_path / "o", eval_fraction=0.5)
    (_, train), held = train_and_eval_records(cfg, {}, {"spammer"})
    assert held is not None and held[1]
    assert {r.annotator for r in held[1]} <= {"a0", "a1"}
    assert any(r.annotator == "spammer" for r in train)  # training drops them later, by policy
    everyone = train_and_eval_records(cfg, {})[1]
    assert everyone is not None and len(everyone[1]) > len(held[1])
