"""Atomic, resumable checkpoints: ``checkpoints/step-N/`` of a run directory.

Each checkpoint is written to a temporary directory, fsynced, renamed into place and only then
marked complete with a ``COMPLETE`` file; older ones are deleted only after that, so a crash
mid-save leaves the last good checkpoint. Model weights are safetensors; optimizer, scheduler,
sampler and RNG states are ``torch.save`` of plain containers and tensors, read back with
``weights_only=True`` (never a full pickle).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from rewardloop.errors import UserError
from rewardloop.util.files import atomic_write_text

if TYPE_CHECKING:
    from rewardloop.train.run import RunDir

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` hands back besides the restored objects."""

    step: int
    path: Path
    sampler_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_STEP_PREFIX) or not name[len(_STEP_PREFIX):].isdigit():
        return None
    return int(name[len(_STEP_PREFIX):])


def list_checkpoints(run: RunDir | Path) -> list[Path]:
    """Complete checkpoints (with their marker), oldest first."""
    root = Path(run) / "checkpoints" if isinstance(run, str | Path) else run.checkpoints_dir
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
    atomic_write_text(final / COMPLETE, json.dumps({"step": int(step), "time": time.time()}))
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
