"""The leaf helpers: atomic writes keep the old file on failure and leave no temporary files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardloop.util.files import TMP_PREFIX, atomic_file, atomic_write_text
from rewardloop.util.seed import seed_everything


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_file(path) as fh:
        fh.write("half")
        raise RuntimeError("stop")
    assert path.read_text() == "old\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_binary_atomic_file_round_trips_torch_save(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "t.pt", binary=True) as fh:
        torch.save({"x": torch.arange(3)}, fh)
    assert torch.load(tmp_path / "t.pt", weights_only=True)["x"].tolist() == [0, 1, 2]


def test_seed_everything_repeats_every_generator() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(3)
    first = draw()
    seed_everything(3)
    assert draw() == first
