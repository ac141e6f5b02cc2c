"""What ``--out`` may do to a directory (train/run.py ``RunDir``): --overwrite replaces only a
rewardloop run and never one of its own inputs, a refused --resume or a command that fails its
checks leaves the directory as it was, and a run that never trained does not block the next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.errors import UserError
from rewardloop.train.data import LengthGroupedSampler
from rewardloop.train.run import RunDir, save_checkpoint


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must not change."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _finished_run(out: Path, steps: int = 3, saved_at: int = 2) -> torch.nn.Module:
    """A finished run: checkpoint at ``saved_at``, metrics up to ``steps``, model/, summary."""
    model = torch.nn.Linear(2, 1)
    run = RunDir(out, {"lr": 0.1})
    for step in range(1, steps + 1):
        run.meter.step(samples=4)
        run.log_metrics(step, {"loss": 1.0 / step})
        if step == saved_at:
            save_checkpoint(run, step, models={"m": model},
                            sampler_state=LengthGroupedSampler([1] * 8, 4, seed=0).state_dict())
    run.model_dir.mkdir()
    (run.model_dir / "config.json").write_text("{}")
    run.write_summary()
    return model


# ----------------------------------------------------------------------------- --overwrite


def test_overwrite_refuses_a_directory_holding_anything_a_run_does_not_write(
        tmp_path: Path) -> None:
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "NOTES.md").write_text("mine")
    (tmp_path / "config.yaml").write_text("lr: 1\n")
    (tmp_path / "checkpoints").mkdir()
    before = _files(tmp_path)
    with pytest.raises(UserError, match=r"not a rewardloop run .*NOTES\.md, sft\.jsonl"):
        RunDir(tmp_path, {}, overwrite=True)
    _finished_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "best-by-hand").mkdir()  # a run the user added to
    with pytest.raises(UserError, match="checkpoints/best-by-hand"):
        RunDir(tmp_path / "run", {}, overwrite=True)
    assert {k: v for k, v in _files(tmp_path).items() if not k.startswith("run")} == before


def test_a_users_config_yaml_alone_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("lr: 1\n")
    with pytest.raises(UserError, match="not a rewardloop run"):
        RunDir(tmp_path, {}, overwrite=True)
    with pytest.raises(UserError, match="holds no rewardloop run"):
        RunDir(tmp_path, {"lr": 2}, resume=True)
    assert (tmp_path / "config.yaml").read_text() == "lr: 1\n"


@pytest.mark.parametrize("key", ["model", "data", "rewards"])
def test_overwrite_refuses_to_delete_an_input_of_the_run(tmp_path: Path, key: str) -> None:
    out = tmp_path / "run"
    _finished_run(out)
    inputs = {"model": str(out / "model"), "data": str(out / "metrics.jsonl"),
              "rewards": ["pkg.mod:fn", f"{out}@0.5"]}  # a reward spec names the run itself
    before = _files(out)
    with pytest.raises(UserError, match=f"holds an input of this run \\({key}: "):
        RunDir(out, {"out": str(out), key: inputs[key]}, overwrite=True)
    assert _files(out) == before
    (tmp_path / "beside.jsonl").write_text("{}\n")  # named through --out, but outside it
    RunDir(out, {key: f"{out}/../beside.jsonl"}, overwrite=True)


def test_overwrite_changes_nothing_before_start_and_then_only_the_runs_own_entries(
        tmp_path: Path) -> None:
    out = tmp_path / "run"
    _finished_run(out)
    link = tmp_path / "link"
    link.symlink_to(out)
    before = _files(out)
    run = RunDir(link, {"lr": 0.5}, overwrite=True, start=False)
    assert _files(out) == before  # a command that fails after this point loses nothing
    run.start()
    assert link.is_symlink()  # the directory itself is kept, emptied of the old run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]
    assert not any((out / "checkpoints").iterdir())
    assert (out / "config.yaml").read_text() == "lr: 0.5\n"


# ----------------------------------------------------------------------------- --resume


def test_a_refused_resume_leaves_the_finished_run_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    model = _finished_run(out, steps=3, saved_at=2)
    before = _files(out)
    run = RunDir(out, {"lr": 0.2}, resume=True, start=False)
    ckpt = run.restore(models={"m": model})
    assert ckpt is not None and ckpt.step == 2
    with pytest.raises(UserError, match="--batch-size = 4"):  # another --batch-size
        LengthGroupedSampler([1] * 8, 2, seed=0).load_state_dict(ckpt.sampler_state)
    assert _files(out) == before  # summary, config and every metric line kept
    run.start()  # accepted: only now does the run become unfinished again
    assert not (out / "summary.json").exists()
    assert (out / "config.yaml").read_text() == "lr: 0.2\n"
    assert [json.loads(x)["step"] for x in run.metrics_path.read_text().splitlines()] == [1, 2]


def test_resume_into_an_empty_or_missing_directory_starts_a_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "new", {"lr": 1}, resume=True)
    assert run.restore(models={"m": torch.nn.Linear(2, 1)}) is None
    assert (tmp_path / "new" / "config.yaml").is_file()


# ----------------------------------------------------------------------------- never trained


def test_a_run_that_never_trained_does_not_block_the_next(tmp_path: Path) -> None:
    out = tmp_path / "run"
    RunDir(out, {"reward": "nosuch"})  # started, then failed before its first step
    (out / "checkpoints" / ".tmp-step-1").mkdir()  # a save cut short
    run = RunDir(out, {"reward": "ok"})  # neither --resume nor --overwrite needed
    assert (out / "config.yaml").read_text() == "reward: ok\n"
    assert not any((out / "checkpoints").iterdir())
    run.log_metrics(1, {"loss": 1.0})
    with pytest.raises(UserError, match="--resume"):
        RunDir(out, {"reward": "ok"})


# ----------------------------------------------------------------------------- the trainers


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows, sft_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("safety")
    build_tiny(root / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    for name, rows in (("sft.jsonl", sft_rows(8)), ("prompts.jsonl", prompt_rows(8))):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cli(*args: str | Path) -> tuple[int, str]:
    from rewardloop.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 2), result.output  # never a traceback
    return result.exit_code, result.output


def _sft(files: Path, out: Path, *flags: str | Path) -> tuple[int, str]:
    return _cli("train", "sft", "--model", files / "tiny", "--data", files / "sft.jsonl",
                "--out", out, "--max-steps", "2", "--batch-size", "4", "--max-length", "64",
                "--device", "cpu", *flags)


def test_sft_refused_settings_leave_no_run_and_a_refused_resume_keeps_the_old(
        files: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    assert _sft(files, out, "--dtype", "float64")[0] == 2
    assert not out.exists()
    assert _sft(files, out, "--save-every", "2")[0] == 0
    before = _files(out)
    code, output = _sft(files, out, "--resume", "--batch-size", "2")
    assert code == 2 and "--resume keeps the options" in output and "batch_size: 4 -> 2" in output
    assert _files(out) == before
    code, output = _sft(files, out, "--overwrite", "--model", out / "model")
    assert code == 2 and "holds an input of this run (model:" in output
    assert _files(out) == before


def test_grpo_refused_reward_leaves_no_run_behind(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "grpo"
    base = ["train", "grpo", "--policy", files / "tiny", "--prompts", files / "prompts.jsonl",
            "--out", out, "--batch-size", "4", "--num-generations", "2",
            "--max-new-tokens", "4", "--max-steps", "1", "--device", "cpu"]
    for bad in (["--reward", "nosuch"], ["--reward", "rewardloop.synthetic:gold_score",
                                         "--gold", "rewardloop.synthetic:no_such"]):
        code, output = _cli(*base, *bad)
        assert code == 2 and not out.exists(), output
    code, output = _cli(*base, "--reward", "rewardloop.synthetic:gold_score")
    assert code == 0, output
    assert (out / "model").is_dir()


def test_a_finished_run_without_its_checkpoints_is_still_a_run(tmp_path: Path) -> None:
    """Checkpoints deleted after training to save space: the directory still holds a run
    (config.yaml, metrics, model, summary), which --overwrite replaces."""
    import shutil

    out = tmp_path / "run"
    _finished_run(out)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(UserError, match="holds a finished run"):
        RunDir(out, {"lr": 0.5})
    RunDir(out, {"lr": 0.5}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml"]


def test_resume_refuses_a_trained_run_with_no_checkpoint_to_resume_from(tmp_path: Path) -> None:
    """train sft/rm/dpo save no checkpoint by default: --resume on such a finished run would
    train again from step 0 and replace its model. Refused; the run is kept as it was."""
    out = tmp_path / "run"
    _finished_run(out, steps=2, saved_at=0)  # no checkpoint at all
    before = _files(out)
    with pytest.raises(UserError, match="finished run with no complete checkpoint.*--overwrite"):
        RunDir(out, {"lr": 0.1}, resume=True)
    assert _files(out) == before
    # A run that never trained (it stopped while loading) still starts over under --resume.
    fresh = tmp_path / "fresh"
    RunDir(fresh, {"lr": 0.1})
    run = RunDir(fresh, {"lr": 0.1}, resume=True)
    assert run.restore(models={"m": torch.nn.Linear(2, 1)}) is None
