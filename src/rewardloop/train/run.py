"""Shared plumbing of every training loop: run directory, seeding, metrics, checkpoints, resume.

A trainer stays an explicit loop; it calls these pieces where it needs them::

    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, start=False)
    seed_everything(cfg.seed)
    ... build model, optimizer, scheduler, sampler ...
    ckpt = run.restore(models={"policy": model}, optimizers={"policy": opt},
                       schedulers={"policy": sched})
    step = 0
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
    run.start()  # all loaded and checked: only now is the directory created or changed
    with progress_bar(cfg.max_steps, "sft", start=step) as show:
        while step < cfg.max_steps:
            batch = sampler.next_batch()
            loss = ...; grad_norm = rt.optimizer_step(...); step += 1  (train/runtime.py)
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

import json
import logging
import math
import resource
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from rewardloop.config import config_to_dict
from rewardloop.errors import UserError
from rewardloop.model_card import info_from_run, write_model_card
from rewardloop.tracking import check_report_to, open_trackers, scalars
from rewardloop.train.checkpoint import (
    COMPLETE,
    Checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rewardloop.train.run_entries import (
    clear_run,
    foreign_entries,
    has_trained,
    is_run,
    paths_in,
)
from rewardloop.util.files import TMP_PREFIX, atomic_write_text, json_objects, lies_in

__all__ = [
    "COMPLETE", "Checkpoint", "RunDir", "ThroughputMeter", "latest_checkpoint",
    "list_checkpoints", "load_checkpoint", "peak_memory_mb", "save_checkpoint",
]

log = logging.getLogger(__name__)


class ThroughputMeter:
    """Counts optimizer steps, samples and tokens, and wall time across resumed segments."""

    WARMUP_STEPS = 2
    """Steps left out of the steady-state step time (start-up, first kernels, allocator)."""

    def __init__(self) -> None:
        self.steps = 0
        self.samples = 0
        self.tokens = 0
        self._wall_before = 0.0  # seconds spent in earlier (resumed-from) segments
        self._start = time.perf_counter()
        self._last = self._start
        self.step_times: list[float] = []  # this segment's seconds per step

    def step(self, *, samples: int, tokens: int = 0) -> None:
        """Record one optimizer step over ``samples`` sequences holding ``tokens`` tokens."""
        now = time.perf_counter()
        self.step_times.append(now - self._last)
        self._last = now
        self.steps += 1
        self.samples += int(samples)
        self.tokens += int(tokens)

    @property
    def wall_s(self) -> float:
        return self._wall_before + time.perf_counter() - self._start

    def summary(self) -> dict[str, float | int | None]:
        wall = max(self.wall_s, 1e-9)
        steady = self.step_times[self.WARMUP_STEPS:]
        return {"steps": self.steps, "wall_s": round(wall, 3),
                "samples_per_s": self.samples / wall, "tokens_per_s": self.tokens / wall,
                # The steady state: the median step after warm-up (None for too short a run).
                "median_step_s": float(np.median(steady)) if steady else None}

    def state_dict(self) -> dict[str, float | int]:
        return {"steps": self.steps, "samples": self.samples, "tokens": self.tokens,
                "wall_s": self.wall_s}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        self.tokens, self._wall_before = int(state["tokens"]), float(state["wall_s"])
        self._start = self._last = time.perf_counter()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _plain(value: Any) -> Any:
    """JSON-able form of a metric value (tensors and NumPy scalars to Python numbers; a NaN or
    infinite number, e.g. KTO's rewards/chosen in a step without desirable rows, to null, so
    that metrics.jsonl and summary.json stay strict JSON)."""
    if isinstance(value, torch.Tensor):
        return _plain(value.item()) if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


RESUME_MAY_CHANGE = frozenset({
    # bookkeeping
    "resume", "overwrite", "out", "log_every", "save_every", "eval_every", "sample_every",
    "report_to", "early_stopping_patience", "max_restarts",
    # where and how fast it runs, not what it learns
    "device", "strategy", "precision", "dist_timeout", "gradient_checkpointing",
    "chunked_lm_head", "grad_accum", "micro_batch_size", "ref_batch_size", "eval_batch_size",
    "reward_batch_size", "generator", "hf_decoding", "vllm_mode", "vllm_server",
    "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_sleep",
    "vllm_max_model_len", "ray", "placement", "actor_cpus", "actor_timeout", "trainers",
    "trainer_gpus", "rollout_gpus", "reward_gpus", "reference_gpus", "rollout_actors",
    "reward_actors", "reference_actors", "async_rollout",
    # how long it runs (the schedule then stretches: warned)
    "max_steps", "epochs",
    # the peak learning rate: applied to the restored optimizer and schedule (RunDir.restore)
    "lr", "value_lr"})
"""Options a ``--resume`` may change; any other change is refused (the checkpoint's optimizer,
schedule and KL state would override some, others would apply part-way, and config.yaml would
describe neither)."""


def resume_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[list[str],
                                                                              list[str]]:
    """(refused, length) changes of ``now`` against the run's saved config, each as "key: old
    -> new"; keys only one of them has (options added or dropped by an upgrade) are skipped."""
    now = yaml.safe_load(yaml.safe_dump(dict(now), sort_keys=False))  # as saved
    refused, length = [], []
    for key in saved.keys() & now.keys():
        if saved[key] != now[key] and not _same_path(saved[key], now[key]):
            change = f"{key}: {saved[key]!r} -> {now[key]!r}"
            if key in ("max_steps", "epochs"):
                length.append(change)
            elif key not in RESUME_MAY_CHANGE:
                refused.append(change)
    return sorted(refused), sorted(length)


def _same_path(a: Any, b: Any) -> bool:
    """Whether two option values name one existing file or directory (``dir/`` and ``dir``,
    a relative and an absolute path)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


class RunDir:
    """The ``--out`` directory of one training run (layout in DESIGN.md, "Run directory").

    Nothing on disk changes until ``start()``: a trainer builds ``RunDir(..., start=False)``
    first (the directory checks fail fast), loads and validates everything, restores a
    checkpoint, and only then starts the run, so a refused command leaves the directory as it
    was. ``start()`` creates the directory, or replaces the run in it (``overwrite``, or one
    that never trained: ``run_entries.RECORDS``), or continues it (``resume``). It refuses a
    directory that holds a trained run unless ``resume`` or ``overwrite`` is given, one that
    holds anything a run does not write (``run_entries.RUN_ENTRIES``), a resume where there is
    no run, and a replacement that would delete one of the run's own inputs. Metrics also go
    to the experiment trackers named in ``report_to`` (``rewardloop.tracking``), which end with
    the summary.
    """

    def __init__(self, out: Path | str, config: Any, *, resume: bool = False,
                 overwrite: bool = False, runtime: Any = None,
                 report_to: Sequence[str] = (), start: bool = True) -> None:
        """``runtime`` (a ``train.runtime.Runtime``): every rank checks the directory, rank 0
        alone changes it, and the others wait for that; only rank 0 writes metrics and reports
        them to the trackers named in ``report_to``. ``start``: start the run at once (False:
        the trainer calls ``start()`` when everything has loaded)."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite exclude each other")
        check_report_to(report_to)  # a missing package must not leave a half-made run behind
        self.out = Path(out)
        self.resume, self.overwrite, self.report_to = resume, overwrite, tuple(report_to)
        self.runtime = runtime
        self.main = runtime is None or runtime.is_main
        self.runtime_facts: dict[str, Any] = runtime.describe() if runtime is not None else {}
        self.config = config_to_dict(config) if not isinstance(config, Mapping) else dict(config)
        self.config_type = "" if isinstance(config, Mapping) else type(config).__name__
        self.started = False
        self._truncate_at: int | None = None  # a resume's metrics cut, made by start()
        self.meter = ThroughputMeter()
        self.trackers: list[Any] = []
        self._saved_config: dict[str, Any] = {}  # a resumed run's config.yaml
        self._check()  # on every rank: all refuse alike, none waits
        if resume and is_run(self.out):
            self._check_resumed_config()
        if start:
            self.start()

    def _check_resumed_config(self) -> None:
        """Refuse a resume that changes what the run learns (``RESUME_MAY_CHANGE`` lists what
        may change); warn when a longer or shorter run stretches the schedule."""
        path = self.out / "config.yaml"
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read {path} to check the resumed options: {exc}") from None
        if not isinstance(saved, Mapping):
            raise UserError(f"{path} is not a mapping of options; cannot resume this run")
        self._saved_config = dict(saved)
        refused, length = resume_changes(saved, self.config)
        if refused:
            raise UserError(
                f"--resume keeps the options the run in {self.out} was started with; changed: "
                f"{'; '.join(refused)}. Resume with those values, or start a new run (another "
                "--out, or --overwrite). If a path only moved, edit it in config.yaml there")
        if length and self.config.get("schedule", "constant") != "constant" and self.main:
            log.warning("%s on resume: the %s learning-rate schedule stretches to the new "
                        "length from the restored step on, so the run differs from one started "
                        "with it", "; ".join(length), self.config.get("schedule"))

    def start(self) -> None:
        """Create the run directory, replacing the run in it when allowed, or continue the run
        in it (``resume``: drop its summary, and the metrics after the restored checkpoint);
        write ``config.yaml`` and open the trackers. Every rank calls it, once."""
        if self.started:
            return
        replace = self._check()  # again: the directory may have changed while models loaded
        if self.runtime is not None and self.runtime.distributed:
            self._check_shared()
        if self.runtime is not None:
            self.runtime.barrier()
        if self.main:
            if replace:
                clear_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            self.checkpoints_dir.mkdir(exist_ok=True)
            if self.resume:
                # A resumed run is unfinished until it writes a new summary.
                (self.out / "summary.json").unlink(missing_ok=True)
            atomic_write_text(self.out / "config.yaml",
                              yaml.safe_dump(self.config, sort_keys=False))
        self.started = True
        if self._truncate_at is not None:
            self.truncate_metrics(self._truncate_at)
        if self.runtime is not None:
            self.runtime.barrier()
        self.trackers = open_trackers(self.report_to, self.out, self.config) if self.main else []

    def _check_shared(self) -> None:
        """Every process must see what rank 0 writes beside --out: on several machines, --out
        must be one directory they all share, or a checkpoint would be marked complete while
        other machines' shards lie in their own copies. Checked with a file rank 0 writes in
        --out (a ``.tmp-`` name, as the leftovers of atomic writes) and removes; a UserError on
        every rank alike."""
        rt = self.runtime
        token = rt.broadcast_object(uuid.uuid4().hex if self.main else None)
        marker = self.out / f"{TMP_PREFIX}shared-{token}"
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            marker.write_text(token)
        rt.barrier()
        blind = int(rt.sum_floats(0.0 if marker.is_file() else 1.0)[0])
        rt.barrier()  # every rank has looked
        if self.main:
            marker.unlink(missing_ok=True)
        if blind:
            raise UserError(f"{blind} of {rt.world_size} processes do not see the files rank 0 "
                            f"writes in --out {self.out}: on several machines --out must be "
                            "one directory they all share (NFS or a cluster file system)")

    def _check(self) -> bool:
        """UserError when ``out`` may not be used; True when the run in it is to be replaced."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        if not out.is_dir() or not any(out.iterdir()):
            return False
        if self.resume:
            if not is_run(out):
                raise UserError(f"--out {out} is not empty and holds no rewardloop run "
                                "(config.yaml and checkpoints/) to resume; choose another --out")
            if not list_checkpoints(out) and has_trained(out):
                # Nothing to continue from: "resuming" would train again from step 0 and
                # replace the trained model (sft, rm and dpo save no checkpoint by default).
                what = "finished run" if (out / "summary.json").exists() else "run"
                raise UserError(f"--out {out} holds a {what} with no complete checkpoint to "
                                "resume from (checkpoints come with --save-every N); pass "
                                "--overwrite to train it again from step 0, or choose another "
                                "--out")
            return False
        foreign = foreign_entries(out)
        if foreign or not is_run(out):
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            holds = f" (it holds {shown})" if foreign else ""
            raise UserError(f"--out {out} is not empty and is not a rewardloop run "
                            f"directory{holds}; refusing to "
                            f"{'delete' if self.overwrite else 'write into'} it, choose another "
                            "--out")
        if has_trained(out) and not self.overwrite:
            if (out / "summary.json").exists():
                raise UserError(f"--out {out} holds a finished run; pass --overwrite to replace "
                                "it or choose another directory")
            raise UserError(f"--out {out} is not empty; pass --resume to continue the run in it "
                            "or --overwrite to start again")
        for key, value in self.config.items():
            inputs = [] if key == "out" else [p for p in paths_in(value) if lies_in(p, out)]
            if inputs:
                raise UserError(f"--out {out} holds an input of this run ({key}: {inputs[0]}), "
                                "which replacing the run there would delete; move it out or "
                                "choose another --out")
        return True

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
        """Append ``{"step": step, **metrics}`` as one JSON line, flushed at once, and send
        its numbers to the trackers under the same names (rank 0)."""
        if not self.main:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        numbers = scalars(record)
        numbers.pop("step")
        for tracker in self.trackers:
            tracker.log(int(step), numbers)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines logged after ``after_step`` (and a torn last line) before resuming.

        Before ``start()`` it only notes the step, so a refused resume keeps its record."""
        if not self.started:
            self._truncate_at = after_step
            return
        if not self.main or not self.metrics_path.exists():
            return
        kept = [line + "\n" for line, record in json_objects(self.metrics_path)
                if int(record.get("step", 0)) <= after_step]
        atomic_write_text(self.metrics_path, "".join(kept))

    def logged_metrics(self) -> list[dict[str, Any]]:
        """The metric records of metrics.jsonl, in order (after ``start()`` on a resume: those
        up to the restored checkpoint); rank 0 alone keeps the file, other ranks get []."""
        if not self.main:
            return []
        return [record for _, record in json_objects(self.metrics_path)]

    def saved_models(self) -> list[Path]:
        """The model directories saved in the run (model/, and e.g. PPO's value_model/)."""
        return sorted(d for d in self.out.iterdir() if d.is_dir() and d != self.checkpoints_dir
                      and ((d / "config.json").is_file() or (d / "adapter_config.json").is_file()))

    def write_summary(self, figures: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` atomically (throughput, peak memory, what the run ran on and
        ``figures``), complete
        the model cards of the saved models with them, and end the trackers' runs.

        Every rank gets the summary back; only rank 0 writes it.
        """
        summary: dict[str, Any] = {**self.meter.summary(), **peak_memory_mb(),
                                   **self.runtime_facts}
        summary.update({k: _plain(v) for k, v in (figures or {}).items()})
        if not self.main:
            return summary
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        card = info_from_run(self.config, self.config_type, summary)
        for model_dir in self.saved_models():
            write_model_card(model_dir, card)
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        return summary

    def restore(self, *, models: Mapping[str, nn.Module],
                optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                schedulers: Mapping[str, Any] | None = None, runtime: Any = None
                ) -> Checkpoint | None:
        """With ``resume``, load the latest complete checkpoint into the given objects.

        Returns None for a fresh run (or a resumed one that never trained: it starts over; one
        that trained without a checkpoint was refused by ``_check``).
        """
        if not self.resume:
            return None
        latest = latest_checkpoint(self)
        if latest is None:
            log.warning("--resume: no complete checkpoint in %s; starting from step 0", self.out)
            self.truncate_metrics(0)
            return None
        ckpt = load_checkpoint(self, latest, models=models, optimizers=optimizers,
                               schedulers=schedulers, runtime=runtime)
        for name, optimizer in (optimizers or {}).items():
            self._apply_new_lr(name, optimizer, (schedulers or {}).get(name))
        return ckpt

    def _apply_new_lr(self, name: str, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """A resume with another ``--lr`` (``--value-lr`` for PPO's value model): the restored
        optimizer and schedule continue from their step at the new peak (the checkpoint's
        learning rate would win otherwise, whatever config.yaml says)."""
        key = "value_lr" if name == "value" else "lr"
        old, new = self._saved_config.get(key), self.config.get(key)
        if not (isinstance(old, int | float) and isinstance(new, int | float)) or old == new \
                or old <= 0:
            return
        ratio = float(new) / float(old)
        for group in optimizer.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [base * ratio for base in scheduler.base_lrs]
        if self.main:
            log.info("--%s changed on resume from %g to %g: the schedule continues from the "
                     "restored step at the new peak", key.replace("_", "-"), old, new)

def adamw(params: Sequence[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``params``, as one fused kernel where torch has one for them (CPU and CUDA
    floating-point tensors): the same update rule, ~5x cheaper per step for small models
    (0.5 vs 2.6 ms for the RL benchmark's policy)."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


