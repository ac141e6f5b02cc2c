"""Resume == uninterrupted for ``train sft`` and ``train rm``, across an epoch boundary: a run
stopped after a checkpoint and resumed ends with the same weights, metrics and data order as a
run that never stopped (the data position is restored, not restarted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _crash import crash_after_checkpoint
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rewardloop.synthetic import corpus_texts, preference_rows, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.train.reward import RewardConfig, train_rm
from rewardloop.train.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=128)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _lrs(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["lr"] for r in map(json.loads, lines) if "lr" in r]


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("kind", ["sft", "rm"])
def test_resume_equals_uninterrupted_across_an_epoch_boundary(tiny_dir: Path, tmp_path: Path,
                                                              kind: str, monkeypatch) -> None:
    # 6 items, batch 4: an epoch is 2 steps (4 + 2), so step 3 is in the second epoch. A
    # warm-up and a linear decay: a resume that restarted the schedule would differ.
    from rewardloop.train import reward, sft

    if kind == "sft":
        data = _write(tmp_path / "d.jsonl", sft_rows(6, seed=11))
        train, cls, module = train_sft, SFTConfig, sft
    else:
        data = _write(tmp_path / "d.jsonl", preference_rows(6, seed=11))
        train, cls, module = train_rm, RewardConfig, reward

    def cfg(out: Path, **kw):
        return cls(model=str(tiny_dir), data=data, out=out, batch_size=4, lr=1e-2,
                   schedule="linear", warmup_steps=2, max_steps=4, save_every=1,
                   max_length=64, device="cpu", **kw)

    train(cfg(tmp_path / "whole"))
    crash_after_checkpoint(monkeypatch, module, 2, lambda: train(cfg(tmp_path / "split")))
    summary = train(cfg(tmp_path / "split", resume=True))
    assert summary["steps"] == 4
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert whole.keys() == split.keys()
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, atol=1e-7, rtol=0)
    assert [s for s, _ in _losses(tmp_path / "split")] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(_losses(tmp_path / "whole"), _losses(tmp_path / "split"),
                              strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    # the rate each step was taken with: warm-up 1/2, 1, then linear decay to 0 after step 4
    assert _lrs(tmp_path / "whole") == _lrs(tmp_path / "split") == pytest.approx(
        [5e-3, 1e-2, 1e-2, 5e-3])


def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_dir: Path,
                                                            tmp_path: Path) -> None:
    used: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    try:
        train_sft(SFTConfig(model=str(tiny_dir), data=_write(tmp_path / "d.jsonl",
                                                             sft_rows(6, seed=11)),
                            out=tmp_path / "run", batch_size=2, lr=1e-2, schedule="cosine",
                            warmup_steps=2, max_steps=4, max_length=64, device="cpu"))
    finally:
        handle.remove()
    assert len(used) == 4 and used[0] < used[1] > used[3]
    assert _lrs(tmp_path / "run") == pytest.approx(used)
