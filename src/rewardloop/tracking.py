"""Experiment trackers: the metrics of ``metrics.jsonl``, also sent to TensorBoard, W&B, MLflow
or Trackio (``--report-to``, repeatable).

``metrics.jsonl`` stays the record every rewardloop tool reads; a tracker receives the same
``{name: value}`` at the same step, so a curve has one name everywhere. Each back-end is an
optional package imported only when asked for; a missing one is a one-line UserError with the
install command, raised before the run directory is touched.

Where each back-end writes:

- ``tensorboard``: event files in ``OUT/tensorboard/`` (``tensorboard --logdir OUT``);
- ``wandb``: a W&B run named after ``OUT`` in project ``$WANDB_PROJECT`` (default
  "rewardloop"), files in ``OUT/wandb/``; offline (``wandb sync`` later) when no API key is
  configured (``$WANDB_API_KEY`` or ``wandb login``), unless ``$WANDB_MODE`` says otherwise;
- ``mlflow``: a run in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default "rewardloop") of the
  store MLflow itself picks (``$MLFLOW_TRACKING_URI``, else its local default);
- ``trackio``: a Trackio run in project "rewardloop" (``trackio show`` to look at it).
"""

from __future__ import annotations

import importlib
import netrc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from rewardloop.errors import UserError

PROJECT = "rewardloop"
# name -> the module to import, and the distribution that provides it (the ``tracking`` extra
# holds the first two; the W&B and Trackio clients are heavier and installed on their own).
BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
            "trackio": "trackio"}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny",
            "trackio": "trackio"}
CHOICES = ("none", *BACKENDS)


class Tracker(Protocol):
    """One experiment-tracking back-end of one run."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar ``metrics`` at ``step``."""
        ...

    def close(self) -> None:
        """Flush and end the run (called once, with the summary written)."""
        ...


def check_report_to(names: Sequence[str]) -> tuple[str, ...]:
    """The back-ends asked for (``none`` alone means no tracker), each importable.

    Raises UserError for an unknown name, ``none`` mixed with a back-end, or a back-end whose
    package is not installed.
    """
    names = tuple(dict.fromkeys(names))  # repeated names count once
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise UserError(f"--report-to {unknown[0]!r} is not known; use one of {list(CHOICES)}")
    if "none" in names and len(names) > 1:
        raise UserError("--report-to none excludes the other back-ends")
    chosen = tuple(n for n in names if n != "none")
    for name in chosen:
        try:
            importlib.import_module(BACKENDS[name])
        except ImportError:
            raise UserError(f"--report-to {name} needs the {BACKENDS[name]} package: "
                            f"pip install {PACKAGES[name]}") from None
    return chosen


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record (booleans as 0/1); lists and text are left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def open_trackers(names: Sequence[str], out: Path, config: Mapping[str, Any]) -> list[Tracker]:
    """One started tracker per name of ``check_report_to(names)``, for the run in ``out``."""
    return [OPENERS[name](out, config) for name in check_report_to(names)]


# ---------------------------------------------------------------------------------------------
# Back-ends
# ---------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars to TensorBoard event files, flushed at every log so a crash loses nothing."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """``$WANDB_MODE`` when set; else online with an API key configured, offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        found = netrc.netrc().authenticators("api.wandb.ai")  # where `wandb login` puts it
    except (FileNotFoundError, netrc.NetrcParseError):
        found = None
    return "online" if found else "offline"


class WandbTracker:
    """A W&B run (offline without an API key, so a run never fails for want of an account)."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=out.name,
                              dir=str(out), config=dict(config), mode=wandb_mode())

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run with the config as parameters, through the client (no global active run)."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient()  # the store of $MLFLOW_TRACKING_URI, else MLflow's default
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name))
        self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
        # MLflow limits a parameter value to 6000 characters.
        params = [Param(k, str(v)[:6000]) for k, v in config.items()]
        for start in range(0, len(params), 100):  # at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A Trackio run (Hugging Face's local-first tracker with W&B's calls)."""

    def __init__(self, out: Path, config: Mapping[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=out.name, config=dict(config))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.trackio.log(dict(metrics), step=step)

    def close(self) -> None:
        self.trackio.finish()


OPENERS: dict[str, Callable[[Path, Mapping[str, Any]], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}
