"""Experiment trackers (``--report-to``): TensorBoard events and an MLflow file store read back
with the names and values of metrics.jsonl; W&B offline without a key; clear refusals."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.errors import UserError
from rewardloop.synthetic import corpus_texts, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.tracking import check_report_to, wandb_mode
from rewardloop.train.run import RunDir

CONFIG = {"lr": 0.1, "model": "tiny"}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def _log_three_steps(run: RunDir) -> None:
    run.log_metrics(1, {"loss": 2.5, "reward/mean": 0.25, "note": "text", "epoch": 0})
    run.log_metrics(2, {"loss": 1.5, "reward/mean": 0.5, "epoch": 0})
    run.log_metrics(3, {"loss": 0.75, "kl_k1": 0.125, "epoch": 1})
    run.write_summary({})


def test_tensorboard_events_hold_the_metrics_of_metrics_jsonl(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run", CONFIG, report_to=("tensorboard",))
    _log_three_steps(run)
    scalars = _tensorboard_scalars(run.out)
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in _metrics(run.metrics_path):
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                expected.setdefault(key, []).append((record["step"], float(value)))
    assert scalars == expected
    assert set(scalars) == {"loss", "reward/mean", "kl_k1", "epoch"}  # text is left out


def test_mlflow_file_store_gets_metrics_params_and_a_finished_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-test")
    run = RunDir(tmp_path / "run-a", CONFIG, report_to=["mlflow"])
    _log_three_steps(run)
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tracking-test")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run-a" and found.info.status == "FINISHED"
    assert found.data.params == {"lr": "0.1", "model": "tiny"}
    history = client.get_metric_history(found.info.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert [m.value for m in client.get_metric_history(found.info.run_id, "loss")] == \
        [2.5, 1.5, 0.75]


def test_wandb_is_offline_without_an_api_key(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k3y\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_mode() == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_wandb_run_gets_the_config_and_every_step(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B itself is not installed here: a stand-in module records what the tracker sends."""
    calls: list[tuple[str, object]] = []

    class FakeRun:
        def log(self, metrics: dict, step: int) -> None:
            calls.append(("log", (step, metrics)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: object) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = RunDir(tmp_path / "run", CONFIG, report_to=("wandb",))
    _log_three_steps(run)
    kind, kwargs = calls[0]
    assert kind == "init" and kwargs["mode"] == "offline" and kwargs["config"] == CONFIG
    assert kwargs["name"] == "run" and kwargs["project"] == "rewardloop"
    assert calls[1] == ("log", (1, {"loss": 2.5, "reward/mean": 0.25, "epoch": 0.0}))
    assert [c[0] for c in calls] == ["init", "log", "log", "log", "finish"]


def test_trackio_run_gets_the_config_and_every_step(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Trackio is not installed here either: a stand-in module records its calls."""
    calls: list[tuple[str, object]] = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda metrics, step: calls.append(("log", (step, metrics))),
        finish=lambda: calls.append(("finish", None)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    run = RunDir(tmp_path / "run", CONFIG, report_to=("trackio",))
    _log_three_steps(run)
    assert calls[0] == ("init", {"project": "rewardloop", "name": "run", "config": CONFIG})
    assert calls[3] == ("log", (3, {"loss": 0.75, "kl_k1": 0.125, "epoch": 1.0}))
    assert [c[0] for c in calls] == ["init", "log", "log", "log", "finish"]


def test_unknown_mixed_or_missing_back_ends_are_refused_before_the_run_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_report_to(["none"]) == ()
    assert check_report_to(["tensorboard", "tensorboard"]) == ("tensorboard",)
    with pytest.raises(UserError, match="'comet' is not known"):
        RunDir(tmp_path / "a", CONFIG, report_to=("comet",))
    with pytest.raises(UserError, match="none excludes"):
        check_report_to(["none", "tensorboard"])
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio -> ImportError
    with pytest.raises(UserError, match=r"needs the trackio package: pip install trackio"):
        RunDir(tmp_path / "b", CONFIG, report_to=("trackio",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_sft_reports_to_tensorboard_and_refuses_unknown(tmp_path: Path) -> None:
    model = build_tiny(tmp_path / "tiny", corpus_texts(60), vocab_size=300, hidden_size=16,
                       num_layers=1, num_heads=2, max_position=96)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(4)))
    base = ["train", "sft", "--model", str(model), "--data", str(data), "--max-steps", "2",
            "--batch-size", "2", "--max-length", "48", "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--report-to", "tb"])
    assert res.exit_code == 2 and "not known" in res.output
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [*base, "--out", str(out), "--report-to", "tensorboard"])
    assert res.exit_code == 0, res.output
    logged = [(r["step"], r["loss"]) for r in _metrics(out / "metrics.jsonl")]
    shown = _tensorboard_scalars(out)["loss"]
    assert [s for s, _ in shown] == [s for s, _ in logged] == [1, 2]
    assert [v for _, v in shown] == pytest.approx([v for _, v in logged])  # float32 events


def test_loop_config_checks_its_trackers(tmp_path: Path) -> None:
    from rewardloop.config import load_config
    from rewardloop.loop_config import LoopConfig

    config = tmp_path / "loop.yaml"
    config.write_text("policy: p\nprompts: p.jsonl\nreport_to: [tensorboard, neptune]\n")
    with pytest.raises(UserError, match="'neptune' is not known"):
        load_config(LoopConfig, config)
    res = CliRunner().invoke(app, ["loop", "--help"])
    assert "--report-to" in res.output


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "grpo", "rloo", "ppo"])
def test_every_trainer_offers_report_to_and_chat_template(command: str) -> None:
    res = CliRunner().invoke(app, ["train", command, "--help"])
    assert res.exit_code == 0 and "--report-to" in res.output and "--chat-template" in res.output
