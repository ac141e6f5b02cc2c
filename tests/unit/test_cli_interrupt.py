"""Ctrl-C is one line and exit 130, and a train command says how to continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app


def test_an_interrupted_train_command_says_how_to_continue(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import rewardloop.train.sft as sft

    def interrupted(cfg: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "train_sft", interrupted)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    result = CliRunner().invoke(app, ["train", "sft", "--model", str(tmp_path), "--data",
                                      str(data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130, result.output
    assert "interrupted; a run that saved checkpoints" in result.output
    assert "--resume" in result.output and "Traceback" not in result.output
