"""Shared plumbing of every training loop: run directory, seeding, metrics, checkpoints, resume.

A trainer stays an explicit loop; it calls these pieces where it needs them::

    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite)
    seed_everything(cfg.seed)
    ... build model, optimizer, scheduler, sampler ...
    ckpt = run.restore(models={"policy": model}, optimizers={"policy": opt},
                       schedulers={"policy": sched})
    step = 0
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
    with progress_bar(cfg.max_steps, "sft", start=step) as show:
        while step < cfg.max_steps:
            batch = sampler.next_batch()
            loss = ...; check_finite(loss, step + 1, run=run); ...; step += 1
            run.meter.step(samples=len(batch), tokens=n_tokens)
            run.log_metrics(step, {"loss": loss.item()}); show(step)
            if step % cfg.save_every == 0:
                save_checkpoint(run, step, models=..., optimizers=..., schedulers=...,
                                sampler_state=sampler.state_dict())
    save_model(model, tokenizer, run.model_dir); run.write_summary({"eval_accuracy": acc})

Checkpoints are written to a temporary directory, fsynced, renamed into place and only then
marked complete; the previous checkpoint is deleted only after that (a crash mid-save leaves the
last good one). Tensors are stored with safetensors or ``torch.save`` of plain containers read
back with ``weights_only=True``, never a full pickle.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from rewardloop.config import config_to_dict
from rewardloop.errors import TrainingError, UserError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class ThroughputMeter:
    """Counts optimizer steps, samples and tokens, and wall time across resumed segments."""

    def __init__(self) -> None:
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self._wall_before = 0.0  # seconds spent in earlier (resumed-from) segments
        self._start = time.perf_counter()

    def step(self, *, samples: int, tokens: int = 0) -> None:
        """Record one optimizer step over ``samples`` sequences holding ``tokens`` tokens."""
        self.steps += 1
        self.samples += int(samples)
        self.tokens += int(tokens)

    @property
    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._start

    def summary(self) -> dict[str, float | int]:
        wall = max(self.wall_s, 1e-9)
        return {"steps": self.steps, "wall_s": round(wall, 3),
                "samples_per_s": self.samples / wall, "tokens_per_s": self.tokens / wall}

    def state_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "samples": self.samples, "tokens": self.tokens,
                "wall_s": self.wall_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        self.tokens, self._wall_before = int(state["tokens"]), float(state["wall_s"])
        self._start = time.perf_counter()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _plain(value: Any) -> Any:
    """JSON-able form of a metric value (tensors and NumPy scalars to Python numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    """The ``--out`` directory of one training run (layout in DESIGN.md, "Run directory").

    Refuses to reuse a directory that holds a run unless ``resume`` (continue from its latest
    complete checkpoint) or ``overwrite`` (delete it first) is given.
    """

    def __init__(self, out: Path | str, config: Any, *, resume: bool = False,
                 overwrite: bool = False) -> None:
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        self.out = Path(out)
        self.resume = resume
        self._prepare(overwrite)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints_dir.mkdir(exist_ok=True)
        if resume:
            # A resumed run is unfinished until it writes a new summary.
            (self.out / "summary.json").unlink(missing_ok=True)
        resolved = config_to_dict(config) if not isinstance(config, Mapping) else dict(config)
        _atomic_write_text(self.out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        self.meter = ThroughputMeter()

    def _prepare(self, overwrite: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        if not out.is_dir() or not any(out.iterdir()) or self.resume:
            return
        is_run = any((out / name).exists()
                     for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints"))
        if overwrite:
            if not is_run:
                raise UserError(f"--out {out} is not empty and is not a rewardloop run "
                                "directory; refusing to delete it, choose another --out")
            shutil.rmtree(out)
            return
        if (out / "summary.json").exists():
            raise UserError(f"--out {out} holds a finished run; pass --overwrite to replace it "
                            "or choose another directory")
        raise UserError(f"--out {out} is not empty; pass --resume to continue the run in it or "
                        "--overwrite to start again")

    @property
    def model_dir(self) -> Path:
        return self.out / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` as one JSON line, flushed at once."""
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines logged after ``after_step`` (and a torn last line) before resuming."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and int(record.get("step", 0)) <= after_step:
                kept.append(line + "\n")
        _atomic_write_text(self.metrics_path, "".join(kept))

    def write_summary(self, figures: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` atomically: throughput, peak memory and ``figures``."""
        summary: dict[str, Any] = {**self.meter.summary(), **peak_memory_mb()}
        summary.update({k: _plain(v) for k, v in (figures or {}).items()})
        _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def restore(self, *, models: Mapping[str, nn.Module],
                optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                schedulers: Mapping[str, Any] | None = None) -> Checkpoint | None:
        """With ``resume``, load the latest complete checkpoint into the given objects.

        Returns None for a fresh run (or a resumed one without checkpoints: it starts over).
        """
        if not self.resume:
            return None
        latest = latest_checkpoint(self)
        if latest is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", self.out)
            self.truncate_metrics(0)
            return None
        return load_checkpoint(self, latest, models=models, optimizers=optimizers,
                               schedulers=schedulers)


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` hands back besides the restored objects."""

    step: int
    path: Path
    sampler_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_finite(value: torch.Tensor | float, step: int, *, name: str = "loss",
                 run: RunDir | None = None) -> None:
    """Stop with a TrainingError when ``value`` holds NaN or infinity (the HF Trainer goes on)."""
    finite = (bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor)
              else math.isfinite(value))
    if finite:
        return
    shown = value.detach().float().cpu().flatten()[:4].tolist() \
        if isinstance(value, torch.Tensor) else value
    where = ""
    if run is not None:
        latest = latest_checkpoint(run)
        where = (f" The last good checkpoint is {latest}; lower the learning rate and rerun "
                 "with --resume." if latest else " No checkpoint was written yet.")
    raise TrainingError(f"{name} is not finite ({shown}) at step {step}; stopped.{where}")


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, start: int = 0) -> Iterator[
        Callable[..., None]]:
    """A rich progress bar on stderr (silent when stderr is not a terminal).

    Yields ``show(step, info="")`` that moves the bar to ``step`` with a short status text.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, completed=start, info="")

        def show(step: int, info: str = "") -> None:
            progress.update(task, completed=step, info=info)

        yield show


# ----------------------------------------------------------------------------- checkpoints


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_STEP_PREFIX) or not name[len(_STEP_PREFIX):].isdigit():
        return None
    return int(name[len(_STEP_PREFIX):])


def list_checkpoints(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints (with their marker), oldest first."""
    root = run.checkpoints_dir if isinstance(run, RunDir) else Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir()
             if (s := _step_of(p)) is not None and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: RunDir | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None; incomplete ones are ignored."""
    done = list_checkpoints(run)
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter (all of a full model; adapters + heads of a LoRA model)."""
    return {name: p.detach().contiguous().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    run: RunDir,
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    sampler_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Atomically write ``checkpoints/step-{step}/`` and keep the newest ``keep_last``.

    Holds each model's trainable parameters (``model-{name}.safetensors``), and in ``state.pt``
    the optimizer and scheduler states, the sampler position, every RNG state, the throughput
    meter and ``extra`` (controller state such as an adaptive KL coefficient: plain Python
    values and tensors only).
    """
    from safetensors.torch import save_file

    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    root = run.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step}"
    tmp = root / f"{_TMP_PREFIX}{_STEP_PREFIX}{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in models.items():
        save_file(_trainable_tensors(model), str(tmp / f"model-{name}.safetensors"))
    state = {
        "step": int(step),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
        "sampler": dict(sampler_state) if sampler_state is not None else None,
        "rng": _rng_state(),
        "meter": run.meter.state_dict(),
        "extra": dict(extra or {}),
    }
    torch.save(state, tmp / "state.pt")
    for file in tmp.iterdir():
        _fsync_path(file)
    _fsync_path(tmp)
    if final.exists():  # an incomplete leftover, or the same step saved again
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic_write_text(final / COMPLETE, json.dumps({"step": int(step), "time": time.time()}))
    _fsync_path(root)
    _prune(root, keep_last, newest=final)
    log.info("saved checkpoint %s", final)
    return final


def _prune(root: Path, keep_last: int, *, newest: Path) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` and older incomplete ones."""
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    newest_step = _step_of(newest) or 0
    for path in root.iterdir():
        step = _step_of(path)
        if step is not None and step < newest_step and not (path / COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)


def _load_model_tensors(model: nn.Module, file: Path, name: str) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(file))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise UserError(f"checkpoint {file} does not match model '{name}' (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}); resume with the same "
                        "model and LoRA settings")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(saved[key].to(param.device))


def load_checkpoint(
    run: RunDir,
    path: Path | None = None,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Restore models, optimizers, schedulers, RNGs and the meter from a complete checkpoint.

    ``path`` defaults to the latest complete one. Metric lines logged after its step are
    dropped so that ``metrics.jsonl`` holds each step once. Call it after building every object
    (building draws random numbers; the RNG states are restored last).
    """
    path = path if path is not None else latest_checkpoint(run)
    if path is None or not (path / COMPLETE).is_file():
        raise UserError(f"no complete checkpoint at {path or run.checkpoints_dir}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    for name, model in models.items():
        file = path / f"model-{name}.safetensors"
        if not file.is_file():
            raise UserError(f"checkpoint {path} has no weights for model '{name}'")
        _load_model_tensors(model, file, name)
    for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, obj in (objects or {}).items():
            if name not in state[kind]:
                raise UserError(f"checkpoint {path} has no state for {kind[:-1]} '{name}'")
            obj.load_state_dict(state[kind][name])
    run.meter.load_state_dict(state["meter"])
    run.truncate_metrics(int(state["step"]))
    _set_rng_state(state["rng"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return Checkpoint(step=int(state["step"]), path=path, sampler_state=state["sampler"],
                      extra=state["extra"])
