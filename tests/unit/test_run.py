"""Run directory, metrics, summary, sampler, checkpoints and the NaN guard (train/run.py)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rewardloop.errors import TrainingError, UserError
from rewardloop.train import checkpoint as ckpt_mod
from rewardloop.train.data import EpochSampler, count_tokens, microbatches
from rewardloop.train.run import (
    COMPLETE,
    RunDir,
    ThroughputMeter,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rewardloop.util.progress import progress_bar
from rewardloop.util.seed import seed_everything


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    out: Path = Path("x")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    return model, opt, sched


def _train_step(model, opt, sched, x: torch.Tensor | None = None) -> None:
    loss = model(torch.randn(5, 3) if x is None else x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


# ----------------------------------------------------------------------------- RunDir


def test_run_dir_writes_config_metrics_and_summary(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run", _Cfg())
    assert yaml.safe_load((run.out / "config.yaml").read_text()) == {"lr": 0.1, "out": "x"}
    assert run.model_dir == run.out / "model"
    run.log_metrics(1, {"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": 3})
    run.log_metrics(2, {"loss": 0.25})
    lines = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "acc": 0.25, "n": 3}, {"step": 2, "loss": 0.25}]
    run.meter.step(samples=4, tokens=40)
    run.meter.step(samples=4, tokens=60)
    summary = run.write_summary({"eval_accuracy": torch.tensor(0.75)})
    on_disk = json.loads((run.out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["steps"] == 2 and summary["eval_accuracy"] == 0.75
    assert summary["tokens_per_s"] == pytest.approx(summary["samples_per_s"] * 100 / 8)
    assert summary["peak_rss_mb"] > 10
    assert not [p for p in run.out.iterdir() if p.name.startswith(".tmp-")]


def _strict(text: str) -> object:
    def refuse(word: str) -> None:
        raise ValueError(f"not strict JSON: {word}")
    return json.loads(text, parse_constant=refuse)


def test_metrics_and_summary_stay_strict_json_when_a_figure_is_not_finite(tmp_path: Path
                                                                         ) -> None:
    run = RunDir(tmp_path / "run", _Cfg())
    run.log_metrics(1, {"loss": 0.5, "rewards/chosen": float("nan"),
                        "acc": torch.tensor(float("inf")), "m": np.float64("-inf")})
    run.log_metrics(2, {"loss": 0.25})
    assert [_strict(x) for x in run.metrics_path.read_text().splitlines()] == [
        {"step": 1, "loss": 0.5, "rewards/chosen": None, "acc": None, "m": None},
        {"step": 2, "loss": 0.25}]
    assert [r["step"] for r in run.logged_metrics()] == [1, 2]
    run.write_summary({"by_group": {"a": {"accuracy": float("nan"), "pairs": 0}},
                       "curve": [1.0, float("nan")]})
    on_disk = _strict((run.out / "summary.json").read_text())
    assert on_disk["by_group"] == {"a": {"accuracy": None, "pairs": 0}}  # type: ignore[index]
    assert on_disk["curve"] == [1.0, None]  # type: ignore[index]


def test_run_dir_refuses_to_reuse_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    RunDir(out, {"a": 1}).log_metrics(1, {"loss": 1.0})
    with pytest.raises(UserError, match="--resume"):
        RunDir(out, {"a": 1})
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="finished run"):
        RunDir(out, {"a": 1})
    with pytest.raises(UserError, match="exclude"):
        RunDir(out, {"a": 1}, resume=True, overwrite=True)
    RunDir(out, {"a": 2}, overwrite=True)
    assert not (out / "metrics.jsonl").exists() and not (out / "summary.json").exists()


def test_overwrite_never_deletes_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a rewardloop run"):
        RunDir(tmp_path, {}, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_resume_without_checkpoint_is_refused_once_the_run_trained(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    run.log_metrics(1, {"loss": 1.0})  # it trained (and stopped before any checkpoint)
    with pytest.raises(UserError, match="no complete checkpoint to resume from"):
        RunDir(tmp_path / "r", {}, resume=True)
    assert run.metrics_path.read_text().count("\n") == 1  # kept
    model, opt, sched = _setup()
    resumed = RunDir(tmp_path / "r", {}, overwrite=True)
    assert resumed.restore(models={"m": model}, optimizers={"m": opt}) is None


def test_truncate_metrics_drops_later_steps_and_torn_lines(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    for step in range(1, 6):
        run.log_metrics(step, {"loss": float(step)})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 6, "lo')  # crash mid-write
    run.truncate_metrics(3)
    assert [json.loads(x)["step"] for x in run.metrics_path.read_text().splitlines()] == [1, 2, 3]


# ----------------------------------------------------------------------------- sampler


def test_sampler_covers_each_index_once_per_epoch_and_reshuffles() -> None:
    sampler = EpochSampler(10, 4, seed=3)
    assert sampler.batches_per_epoch == 3
    epoch0 = [sampler.next_batch() for _ in range(3)]
    epoch1 = [sampler.next_batch() for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]  # a batch never spans two epochs
    assert sorted(sum(epoch0, [])) == list(range(10)) == sorted(sum(epoch1, []))
    assert epoch0 != epoch1 and sampler.epoch == 1
    again = EpochSampler(10, 4, seed=3)
    assert [again.next_batch() for _ in range(3)] == epoch0


def test_sampler_drop_last_and_no_shuffle() -> None:
    sampler = EpochSampler(10, 4, seed=0, shuffle=False, drop_last=True)
    assert sampler.batches_per_epoch == 2
    assert [sampler.next_batch() for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]
    with pytest.raises(ValueError):
        EpochSampler(3, 4, drop_last=True)
    with pytest.raises(ValueError):
        EpochSampler(0, 1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), batch=st.integers(1, 12), split=st.integers(0, 25),
       drop_last=st.booleans())
def test_sampler_resume_continues_exactly(n: int, batch: int, split: int, drop_last: bool) -> None:
    if drop_last and batch > n:
        return
    straight = EpochSampler(n, batch, seed=11, drop_last=drop_last)
    expected = [straight.next_batch() for _ in range(split + 8)]
    first = EpochSampler(n, batch, seed=11, drop_last=drop_last)
    got = [first.next_batch() for _ in range(split)]
    state = json.loads(json.dumps(first.state_dict()))
    second = EpochSampler(n, batch, seed=11, drop_last=drop_last)
    second.load_state_dict(state)
    got += [second.next_batch() for _ in range(8)]
    assert got == expected


def test_sampler_refuses_state_of_other_data() -> None:
    state = EpochSampler(10, 2, seed=0).state_dict()
    # A user's mistake (other prompts, batch or seed on --resume): a UserError, exit 2.
    with pytest.raises(UserError, match=r"items in the data .* = 10, this run has 12"):
        EpochSampler(12, 2, seed=0).load_state_dict(state)
    with pytest.raises(UserError, match="--seed = 0, this run has 1"):
        EpochSampler(10, 2, seed=1).load_state_dict(state)


def test_microbatches_and_global_token_count() -> None:
    assert microbatches([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1]])]
    assert count_tokens(masks) == 6
    # Summed token losses / global count == token mean of the whole batch.
    losses = [torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]), torch.tensor([[4.0, 5.0, 6.0]])]
    total = count_tokens(masks)
    accumulated = sum((x * m).sum() / total for x, m in zip(losses, masks, strict=True))
    assert accumulated.item() == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_restores_everything(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    policy, opt, sched = _setup(0)
    value, vopt, _ = _setup(1)
    for _ in range(3):
        _train_step(policy, opt, sched)
    run.meter.step(samples=8, tokens=80)
    seed_everything(5)
    path = save_checkpoint(run, 3, models={"policy": policy, "value": value},
                           optimizers={"policy": opt, "value": vopt}, schedulers={"policy": sched},
                           sampler_state={"epoch": 1, "position": 2},
                           extra={"kl_coef": 0.05, "running": torch.tensor([1.0, 2.0])})
    after = (random.random(), np.random.rand(), torch.rand(2))
    assert (path / COMPLETE).is_file() and latest_checkpoint(run) == path

    policy2, opt2, sched2 = _setup(7)
    value2, vopt2, _ = _setup(8)
    seed_everything(99)
    run2 = RunDir(tmp_path / "r", {}, resume=True)
    ck = run2.restore(models={"policy": policy2, "value": value2},
                      optimizers={"policy": opt2, "value": vopt2}, schedulers={"policy": sched2})
    assert ck is not None and ck.step == 3 and ck.sampler_state == {"epoch": 1, "position": 2}
    assert ck.extra["kl_coef"] == 0.05
    assert torch.equal(ck.extra["running"], torch.tensor([1.0, 2.0]))
    for a, b in zip([*policy.parameters(), *value.parameters()],
                    [*policy2.parameters(), *value2.parameters()], strict=True):
        assert torch.equal(a, b)
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert run2.meter.steps == 1 and run2.meter.tokens == 80
    assert (random.random(), np.random.rand()) == after[:2] and torch.equal(torch.rand(2), after[2])
    x = torch.randn(5, 3)
    _train_step(policy, opt, sched, x)  # Adam moments and schedule continue identically
    _train_step(policy2, opt2, sched2, x)
    for a, b in zip(policy.parameters(), policy2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_fp16_loss_scale_is_resumed(tmp_path: Path) -> None:
    """Resume audit s15 M2: a resumed fp16 run started again at the initial scale (65536), so
    after an overflow it skipped a step the uninterrupted run applied. The scaler's state now
    travels in the checkpoint (the CPU scaler here; the runtime's is the CUDA one)."""
    class Rt:
        is_main, rank, world_size = True, 0, 1
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)

        def barrier(self) -> None:
            pass

    run = RunDir(tmp_path / "r", {})
    model, opt, sched = _setup()
    rt = Rt()
    rt.scaler.scale(torch.tensor(1.0))  # the scale exists from the first loss on
    rt.scaler.update(new_scale=1024.0)  # where an overflow or two left it
    rt.scaler._growth_tracker.fill_(2)  # one clean step from growing
    save_checkpoint(run, 1, models={"m": model}, optimizers={"m": opt},
                    schedulers={"m": sched}, runtime=rt)
    fresh = Rt()
    fresh.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    load_checkpoint(RunDir(tmp_path / "r", {}, resume=True), models={"m": model},
                    optimizers={"m": opt}, schedulers={"m": sched}, runtime=fresh)
    assert fresh.scaler.get_scale() == 1024.0
    assert fresh.scaler.state_dict()["_growth_tracker"] == 2


def test_a_resume_may_not_change_what_the_run_learns(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Resume audit s15 M1: --warmup-steps applied part-way, other options were overridden by
    the checkpoint while config.yaml claimed them. A resume now refuses such a change, naming
    it; where and how fast it runs, logging and its length may change (a stretched schedule is
    warned about); options an upgrade added or dropped are skipped; the same directory written
    another way is no change."""
    import logging

    cfg = {"lr": 0.01, "beta": 0.1, "warmup_steps": 2, "schedule": "linear", "max_steps": 6,
           "log_every": 1, "device": "cpu", "old_option": 1}
    run = RunDir(tmp_path / "r", cfg)
    model, opt, sched = _setup()
    save_checkpoint(run, 1, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    for change in ({"beta": 0.5}, {"warmup_steps": 0}, {"schedule": "cosine", "beta": 0.2}):
        with pytest.raises(UserError, match="--resume keeps the options") as err:
            RunDir(tmp_path / "r", {**cfg, **change}, resume=True)
        for key, value in change.items():
            assert f"{key}: {cfg[key]!r} -> {value!r}" in str(err.value)
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text()) == cfg
    fine = {k: v for k, v in cfg.items() if k != "old_option"} | {
        "log_every": 5, "device": "cuda", "new_option": True}
    RunDir(tmp_path / "r", fine, resume=True)
    (tmp_path / "data").mkdir()
    RunDir(tmp_path / "r2", {**cfg, "data": str(tmp_path / "data")})
    save_checkpoint(RunDir(tmp_path / "r2", {**cfg, "data": str(tmp_path / "data")},
                           resume=True), 1, models={"m": model})
    RunDir(tmp_path / "r2", {**cfg, "data": f"{tmp_path}/./data/"}, resume=True)
    with caplog.at_level(logging.WARNING, logger="rewardloop.train.run"):
        RunDir(tmp_path / "r", {**cfg, "max_steps": 8}, resume=True)
    assert "max_steps: 6 -> 8 on resume: the linear learning-rate schedule stretches" \
        in caplog.text


def test_a_resume_with_a_lower_lr_continues_the_schedule_at_the_new_peak(
        tmp_path: Path) -> None:
    """Resume audit s15 M1 (and the NaN stop's advice, "lower the learning rate and rerun with
    --resume"): the checkpoint's optimizer and schedule held the old peak and won, silently.
    Now the restored schedule continues from its step at the new peak."""
    run = RunDir(tmp_path / "r", {"lr": 0.1})
    model, opt, sched = _setup()
    for _ in range(3):
        _train_step(model, opt, sched)
    save_checkpoint(run, 3, models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    model2, opt2, sched2 = _setup()
    RunDir(tmp_path / "r", {"lr": 0.025}, resume=True).restore(
        models={"m": model2}, optimizers={"m": opt2}, schedulers={"m": sched2})
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / 4)
    for _ in range(2):  # the schedule goes on from step 3, a quarter as high
        _train_step(model, opt, sched)
        _train_step(model2, opt2, sched2)
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"] / 4)
    assert sched2.last_epoch == sched.last_epoch == 5


def test_a_damaged_or_old_layout_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    """Resume audit s15 L1 and upgrade audit M3: a shard cut short gave a zip-reader traceback,
    a checkpoint of the layout before sharded ones a FileNotFoundError; both now name the
    checkpoint and what to do (exit 2 at the command line)."""
    run = RunDir(tmp_path / "r", {})
    model, opt, sched = _setup()
    path = save_checkpoint(run, 1, models={"m": model}, optimizers={"m": opt},
                           schedulers={"m": sched})
    shard = next(p for p in (path / "dcp").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    resumed = RunDir(tmp_path / "r", {}, resume=True)
    with pytest.raises(UserError, match=f"checkpoint {path} is damaged: a shard is cut short "
                       "or missing .*an earlier checkpoint in the same directory"):
        resumed.restore(models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    # Other failures while loading (a process group, a GPU) are not called damage (review s15).
    import torch.distributed.checkpoint as dcp

    real = dcp.load
    try:
        dcp.load = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("NCCL error: timeout"))
        with pytest.raises(RuntimeError, match="NCCL error"):
            resumed.restore(models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})
    finally:
        dcp.load = real
    (path / "dcp" / ".metadata").unlink()
    with pytest.raises(UserError, match="has no dcp/.metadata: it was written by an older"):
        resumed.restore(models={"m": model}, optimizers={"m": opt}, schedulers={"m": sched})


def test_state_file_loads_with_weights_only(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    model, opt, sched = _setup()
    _train_step(model, opt, sched)
    path = save_checkpoint(run, 1, models={"m": model}, optimizers={"m": opt},
                           schedulers={"m": sched})
    state = torch.load(path / "state.pt", weights_only=True)
    assert set(state) >= {"schedulers", "sampler", "extra", "meter", "world_size"}
    assert set(torch.load(path / "rng-0.pt", weights_only=True)) >= {"python", "numpy", "torch"}
    # Weights and optimizer state: torch.distributed.checkpoint, resharded on load.
    assert sorted(p.name for p in path.iterdir()) == [COMPLETE, "dcp", "rng-0.pt", "state.pt"]


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    model, opt, _ = _setup()
    first = save_checkpoint(run, 2, models={"m": model}, optimizers={"m": opt})
    half = run.checkpoints_dir / "step-4"
    half.mkdir()
    (half / "state.pt").write_bytes(b"partial")
    assert latest_checkpoint(run) == first and list_checkpoints(run) == [first]
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_checkpoint(run, half, models={"m": model})


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path / "r", {})
    model, opt, sched = _setup()
    good = save_checkpoint(run, 1, models={"m": model}, optimizers={"m": opt}, keep_last=1)
    _train_step(model, opt, sched)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "_rng_state", boom)  # after the weights, before the marker
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(run, 2, models={"m": model}, optimizers={"m": opt}, keep_last=1)
    monkeypatch.undo()
    assert latest_checkpoint(run) == good and (good / COMPLETE).is_file()
    fresh, fresh_opt, _ = _setup(3)
    assert load_checkpoint(run, models={"m": fresh}, optimizers={"m": fresh_opt}).step == 1
    newer = save_checkpoint(run, 2, models={"m": model}, optimizers={"m": opt}, keep_last=1)
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2"]
    assert latest_checkpoint(run) == newer


def test_keep_last_prunes_only_after_new_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    model, _, _ = _setup()
    for step in (10, 20, 30, 40):
        save_checkpoint(run, step, models={"m": model}, keep_last=2)
    assert [p.name for p in list_checkpoints(run)] == ["step-30", "step-40"]


def test_checkpoint_refuses_a_different_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r", {})
    model, _, _ = _setup()
    save_checkpoint(run, 1, models={"m": model})
    with pytest.raises(UserError, match="does not match"):
        load_checkpoint(run, models={"m": nn.Linear(3, 1)})
    with pytest.raises(UserError, match="no weights for model 'other'"):
        load_checkpoint(run, models={"other": model})


# ----------------------------------------------------------------------------- guards, meters


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_loss_stops_the_step_and_names_the_checkpoint(tmp_path: Path, bad: float) -> None:
    from rewardloop.options import RuntimeOptions
    from rewardloop.train.runtime import Runtime

    run = RunDir(tmp_path / "r", {})
    model, opt, _ = _setup()
    path = save_checkpoint(run, 4, models={"m": model})
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 3)).sum().backward()
    rt = Runtime(RuntimeOptions())
    with pytest.raises(TrainingError, match=r"not finite at step 5 \(loss") as info:
        rt.optimizer_step(opt, list(model.parameters()), 1.0, step=5, loss=bad, run=run)
    assert str(path) in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    norm = rt.optimizer_step(opt, list(model.parameters()), 0.0, step=5, loss=0.5, run=run)
    assert norm > 0  # the real norm, with clipping off
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_seed_everything_repeats_all_rngs() -> None:
    seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(3)
    assert (random.random(), np.random.rand()) == first[:2] and torch.equal(torch.rand(3), first[2])


def test_meter_state_carries_wall_time_across_resume() -> None:
    meter = ThroughputMeter()
    meter.step(samples=2, tokens=10)
    state = meter.state_dict()
    other = ThroughputMeter()
    other.load_state_dict({**state, "wall_s": 100.0})
    other.step(samples=2, tokens=10)
    summary = other.summary()
    assert summary["steps"] == 2 and summary["wall_s"] >= 100.0
    assert summary["samples_per_s"] == pytest.approx(4 / summary["wall_s"], rel=1e-3)


def test_progress_bar_is_silent_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(3, "train") as show:
        for step in range(1, 4):
            show(step, f"loss {step}")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_is_drawn_by_rank_0_only(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: stderr is a terminal
    drawn = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        with progress_bar(2, "train") as show:
            show(2, "loss 1")
        drawn[rank] = capsys.readouterr().err
    assert "train" in drawn["0"] and drawn["1"] == ""
