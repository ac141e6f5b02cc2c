"""What a kill, a Ctrl-C or a full disk leaves behind (audit s12, crash safety): earlier output
is never lost, nothing half-finished reads as finished, and the message says what to do."""

from __future__ import annotations

import errno
import json
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import func, select
from torch import nn
from typer.testing import CliRunner

import rewardloop.train.checkpoint as C
from rewardloop.cli import app
from rewardloop.data import schema as S
from rewardloop.rollout import truncate_samples
from rewardloop.train.checkpoint import COMPLETE, list_checkpoints
from rewardloop.train.run import RunDir, save_checkpoint


def test_a_resume_killed_while_it_drops_later_samples_keeps_every_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F1: samples.jsonl was rewritten in place; a kill left it empty and the next resume
    went on without a word. Now the new file replaces it only when complete."""
    path = tmp_path / "samples.jsonl"
    rows = "".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (1, 2, 3))
    path.write_text(rows + '{"step": 4, "compl')  # and a line torn by an earlier kill

    def killed(src: Any, dst: Any) -> None:
        raise KeyboardInterrupt  # the kill lands before the new file takes the name

    monkeypatch.setattr("rewardloop.util.files.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        truncate_samples(path, 2)
    assert path.read_text().startswith(rows)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.jsonl"]  # no temp file left
    monkeypatch.undo()
    truncate_samples(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def _run(tmp_path: Path) -> tuple[RunDir, nn.Module]:
    return RunDir(tmp_path / "run", {"steps": 4}), nn.Linear(2, 2)


def test_a_checkpoint_pruned_half_way_is_not_complete(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """F7: a kill inside the delete of an old checkpoint left it with its COMPLETE marker."""
    run, model = _run(tmp_path)
    for step in (1, 2):
        save_checkpoint(run, step, models={"m": model}, keep_last=2)
    monkeypatch.setattr(C.shutil, "rmtree", lambda *a, **k: None)  # killed as it starts
    save_checkpoint(run, 3, models={"m": model}, keep_last=2)
    assert (run.checkpoints_dir / "step-1").is_dir()
    assert not (run.checkpoints_dir / "step-1" / COMPLETE).exists()
    assert [p.name for p in list_checkpoints(run.out)] == ["step-2", "step-3"]


def test_a_ctrl_c_inside_a_checkpoint_save_is_an_interruption(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """F3, F6: torch's checkpoint code wrapped the Ctrl-C in a CheckpointException (a
    traceback and exit 1, no resume hint), and the partial copy stayed on disk."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    run, model = _run(tmp_path)
    save_checkpoint(run, 1, models={"m": model})

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(FileSystemWriter, "write_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 2, models={"m": model})
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-1"]
    with pytest.raises(OSError, match="No space"), C.unwrapped_dcp_errors():
        raise CheckpointException("save", {0: (OSError(errno.ENOSPC, "No space left on "
                                                       "device"), traceback.StackSummary())})


def test_a_full_disk_is_one_line_that_says_what_was_kept(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    """F4: disk full was a raw traceback."""
    import rewardloop.tiny as tiny

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "t" / "x"))

    monkeypatch.setattr(tiny, "build_tiny", full)
    result = CliRunner().invoke(app, ["tiny", "--out", str(tmp_path / "t")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: no space left on the device writing")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_an_interrupted_loop_says_how_to_continue(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """F5: `loop` said only "interrupted"."""
    import rewardloop.loop

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(rewardloop.loop, "run_loop", interrupted)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "p"}\n')
    config = tmp_path / "loop.yaml"
    config.write_text(f"policy: {tmp_path}\nprompts: {prompts}\nworkdir: {tmp_path / 'w'}\n")
    result = CliRunner().invoke(app, ["loop", "--config", str(config)])
    assert result.exit_code == 130, result.output
    assert "rewardloop loop --config WORKDIR/config.yaml" in result.output


def test_a_ctrl_c_after_the_commit_is_an_interruption_not_a_rollback_error(
        sqlite_store, monkeypatch: pytest.MonkeyPatch) -> None:
    """F8: the rollback after a Ctrl-C that landed past the commit raised its own error over
    the interruption (a SQLAlchemy traceback, exit 1)."""
    from sqlalchemy.orm import session as orm_session

    real = orm_session.SessionTransaction._remove_snapshot
    calls = []

    def interrupted(self: Any) -> None:
        calls.append(self)
        if len(calls) == 1:  # the commit's expiry of the loaded objects, once
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(orm_session.SessionTransaction, "_remove_snapshot", interrupted)
    with pytest.raises(KeyboardInterrupt), sqlite_store.write() as s:
        s.add(S.Annotator(name="ann"))
    monkeypatch.undo()
    with sqlite_store.read() as s:  # committed before the Ctrl-C: kept, and the store works
        assert s.scalar(select(func.count()).select_from(S.Annotator)) == 1


def test_a_model_save_clears_what_a_killed_save_left(tmp_path: Path) -> None:
    """F6: a killed save left a full-size .tmp weights file in model/, kept through resumes."""
    from rewardloop.models import save_model
    from rewardloop.tiny import build_tiny

    model_dir = build_tiny(tmp_path / "tiny", ["a b c"] * 20, vocab_size=300, hidden_size=16,
                           num_layers=1, num_heads=2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = tmp_path / "model"
    out.mkdir()
    (out / ".tmpab12cd").write_bytes(b"\0" * 1024)
    save_model(model, AutoTokenizer.from_pretrained(model_dir), out)
    assert not list(out.glob(".tmp*")) and (out / "model.safetensors").is_file()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).lm_head.weight,
                       model.lm_head.weight)
