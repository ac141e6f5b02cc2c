"""Atomic, resumable checkpoints: ``checkpoints/step-N/`` of a run directory.

Each checkpoint is written to a temporary directory, fsynced, renamed into place and only then
marked complete with a ``COMPLETE`` file; older ones are deleted only after that, so a crash
mid-save leaves the last good checkpoint. Trainable weights and optimizer states are written by
torch.distributed.checkpoint (every rank its own shards; a resume at another world size
reshards them); scheduler, sampler and RNG states are ``torch.save`` of plain containers and
tensors, read back with ``weights_only=True`` (never a full pickle).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from rewardloop.errors import UserError
from rewardloop.util.files import atomic_write_text

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


class Meter(Protocol):
    def state_dict(self) -> dict[str, float | int]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class RunLike(Protocol):
    """What checkpoints need of a run directory (``train.run.RunDir``)."""

    @property
    def checkpoints_dir(self) -> Path: ...
    @property
    def meter(self) -> Meter: ...
    def truncate_metrics(self, after_step: int) -> None: ...


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


def list_checkpoints(run: RunLike | Path) -> list[Path]:
    """Complete checkpoints (with their marker), oldest first."""
    root = Path(run) / "checkpoints" if isinstance(run, str | Path) else run.checkpoints_dir
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir()
             if (s := _step_of(p)) is not None and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: RunLike | Path) -> Path | None:
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


def _trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters a checkpoint holds: every one of a full model, the adapters and
    heads of a LoRA model (frozen base weights are re-read from the model directory)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {name for name, p in inner.named_parameters() if p.requires_grad}


def _dcp_state(models: Mapping[str, nn.Module],
               optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """``{name: {"model": trainable tensors, "optim": state}}`` keyed by parameter names, so a
    checkpoint is independent of the world size and of DDP/FSDP wrapping (DCP reshards)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    unknown = set(optimizers) - set(models)
    if unknown:
        raise ValueError(f"optimizers {sorted(unknown)} have no model of the same name")
    state: dict[str, Any] = {}
    for name, model in models.items():
        keep = _trainable_names(model)
        if name in optimizers:
            msd, osd = get_state_dict(model, optimizers[name])
            state[name] = {"optim": osd}
        else:
            msd = get_model_state_dict(model)
            state[name] = {}
        state[name]["model"] = {k: v for k, v in msd.items() if k in keep}
    return state


def save_checkpoint(
    run: RunLike,
    step: int,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    sampler_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int = 2,
    keep: Collection[int] = (),
    runtime: Any = None,
) -> Path:
    """Atomically write ``checkpoints/step-{step}/`` and keep the newest ``keep_last`` (and
    those of the steps in ``keep``, e.g. the best one so far).

    Every rank calls it (``runtime`` is the run's ``train.runtime.Runtime``; None in one plain
    process). The models' trainable parameters and the optimizer states go through
    torch.distributed.checkpoint (``dcp/``: each rank writes its shards, a resume at another
    world size reshards); ``state.pt`` holds the schedulers, the sampler position, the
    throughput meter, the fp16 loss scaler and ``extra`` (controller state such as an adaptive
    KL coefficient: plain Python values and tensors only); ``rng-R.pt`` every rank's RNG
    states.
    """
    import torch.distributed.checkpoint as dcp

    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    main = runtime is None or runtime.is_main
    root = run.checkpoints_dir
    final = root / f"{_STEP_PREFIX}{step}"
    tmp = root / f"{_TMP_PREFIX}{_STEP_PREFIX}{step}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(runtime)
    try:
        with _quiet_single_process(), unwrapped_dcp_errors():
            dcp.save(_dcp_state(models, optimizers or {}), checkpoint_id=str(tmp / "dcp"))
        rank = runtime.rank if runtime is not None else 0
        torch.save(_rng_state(), tmp / f"rng-{rank}.pt")
        if main:
            state = {
                "step": int(step),
                "world_size": runtime.world_size if runtime is not None else 1,
                "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
                "sampler": dict(sampler_state) if sampler_state is not None else None,
                "meter": run.meter.state_dict(),
                "extra": dict(extra or {}),
                "scaler": _scaler_state(runtime),
            }
            torch.save(state, tmp / "state.pt")
    except BaseException:
        if main:  # a Ctrl-C or a full disk: the partial copy would only hold the space
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier(runtime)
    if main:
        for file in tmp.rglob("*"):
            _fsync_path(file)
        _fsync_path(tmp)
        if final.exists():  # an incomplete leftover, or the same step saved again
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write_text(final / COMPLETE, json.dumps({"step": int(step), "time": time.time()}))
        _fsync_path(root)
        _prune(root, keep_last, newest=final, keep=keep)
        log.info("saved checkpoint %s", final)
    _barrier(runtime)
    return final


def _scaler_state(runtime: Any) -> dict[str, Any] | None:
    """The fp16 loss scaler's state (its scale and growth tracker), None without one: a resume
    that started again at the initial scale would skip or apply other steps."""
    scaler = getattr(runtime, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return dict(scaler.state_dict())


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call in a plain single process, which is a case we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def unwrapped_dcp_errors() -> Iterator[None]:
    """torch.distributed.checkpoint wraps whatever stops it (a Ctrl-C, a full disk) in a
    ``CheckpointException``, a BaseException no handler expects: raise the first rank's own
    error instead, so a Ctrl-C is an interruption and a full disk an OSError the CLI names."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = [error for error, _ in exc.failures.values()]
        if failures:
            raise failures[0] from None
        raise


def _barrier(runtime: Any) -> None:
    if runtime is not None:
        runtime.barrier()


def _prune(root: Path, keep_last: int, *, newest: Path, keep: Collection[int] = ()) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last`` (but not the steps in
    ``keep``) and older incomplete ones."""
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep_last]:
        if _step_of(old) not in keep:
            # The marker goes first: a run killed mid-delete leaves an incomplete directory
            # (pruned next time), never a half-deleted one that still says it is complete.
            (old / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)
    newest_step = _step_of(newest) or 0
    for path in root.iterdir():
        step = _step_of(path)
        if step is not None and step < newest_step and not (path / COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(_TMP_PREFIX) and path.is_dir():
            # A save killed part-way (its process stopped before it could clean up): the save
            # just made has been renamed to step-N, so no .tmp- directory is in use now.
            shutil.rmtree(path, ignore_errors=True)


def _check_names(path: Path, name: str, saved: Mapping[str, Any],
                 wanted: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    resized = sorted(k for k in set(saved) & set(wanted)
                     if tuple(getattr(saved[k], "size", ())) != tuple(wanted[k].shape))
    if missing or unexpected or resized:
        raise UserError(f"checkpoint {path} does not match model '{name}' (missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}, other shape "
                        f"{resized[:3]}); resume with the same "
                        "model and LoRA settings")


def _load_models(path: Path, models: Mapping[str, nn.Module],
                 optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (path / "dcp" / ".metadata").is_file():
        raise UserError(f"checkpoint {path} has no dcp/.metadata: it was written by an older "
                        "rewardloop (before sharded checkpoints) or damaged, and cannot be "
                        f"resumed; remove it to resume from an earlier one, or train again "
                        "with --overwrite")
    reader = dcp.FileSystemReader(str(path / "dcp"))
    meta = reader.read_metadata().state_dict_metadata
    keys = set(meta)
    state = _dcp_state(models, optimizers)
    for name, parts in state.items():
        prefix = f"{name}.model."
        saved = {k[len(prefix):]: meta[k] for k in keys if k.startswith(prefix)}
        if not saved:
            raise UserError(f"checkpoint {path} has no weights for model '{name}'")
        _check_names(path, name, saved, parts["model"])
        if "optim" in parts and not any(k.startswith(f"{name}.optim.") for k in keys):
            raise UserError(f"checkpoint {path} has no state for optimizer '{name}'")
    try:
        with _quiet_single_process(), unwrapped_dcp_errors():
            dcp.load(state, storage_reader=reader)
    except (RuntimeError, EOFError, FileNotFoundError) as exc:
        # Complete checkpoints are fsynced before COMPLETE is written: a shard cut short or
        # missing is damage from outside (a copy cut short, a bad disk). Anything else (a
        # process group failing, a GPU error, a permission) is raised as it is.
        if not _damaged(exc):
            raise
        raise UserError(f"checkpoint {path} is damaged: a shard is cut short or missing "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "an earlier checkpoint in the same directory may still be whole "
                        "(remove this one to resume from it)") from None
    for name, model in models.items():
        set_state_dict(model, optimizers[name] if name in optimizers else (),
                       model_state_dict=state[name]["model"],
                       optim_state_dict=state[name].get("optim", {}),
                       options=StateDictOptions(strict=False))


_DAMAGE = ("PytorchStreamReader failed", "failed finding central directory",
           "unexpected EOF", "file is truncated")


def _damaged(exc: BaseException) -> bool:
    """Whether reading a shard failed because the file is cut short or missing."""
    if isinstance(exc, EOFError | FileNotFoundError):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _DAMAGE)


def load_checkpoint(
    run: RunLike,
    path: Path | None = None,
    *,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    runtime: Any = None,
) -> Checkpoint:
    """Restore models, optimizers, schedulers, RNGs and the meter from a complete checkpoint.

    ``path`` defaults to the latest complete one. Metric lines logged after its step are
    dropped so that ``metrics.jsonl`` holds each step once. Call it after building every object
    (building draws random numbers; the RNG states are restored last). Every rank calls it; a
    checkpoint written at another world size loads too (a rank without saved RNG states keeps
    its own seeded ones).
    """
    path = path if path is not None else latest_checkpoint(run.checkpoints_dir.parent)
    if path is None or not (path / COMPLETE).is_file():
        raise UserError(f"no complete checkpoint at {path or run.checkpoints_dir}")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    _load_models(path, models, optimizers or {})
    for name, obj in (schedulers or {}).items():
        if name not in state["schedulers"]:
            raise UserError(f"checkpoint {path} has no state for scheduler '{name}'")
        obj.load_state_dict(state["schedulers"][name])
    run.meter.load_state_dict(state["meter"])
    scaler = getattr(runtime, "scaler", None)
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])  # fp16: the loss scale it had reached
    if runtime is None or runtime.is_main:
        run.truncate_metrics(int(state["step"]))
    rank = runtime.rank if runtime is not None else 0
    rng = path / f"rng-{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    else:
        log.info("%s has no RNG state for rank %d (saved at world size %s)", path, rank,
                 state["world_size"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return Checkpoint(step=int(state["step"]), path=path, sampler_state=state["sampler"],
                      extra=state["extra"])


def restore_weights(path: Path, *, models: Mapping[str, nn.Module]) -> None:
    """Load only the model weights of the complete checkpoint ``path`` (optimizers, schedulers,
    RNGs, the meter and metrics.jsonl are left alone): how a trainer puts its best step back
    before saving ``model/``. Every rank calls it."""
    if not (path / COMPLETE).is_file():
        raise UserError(f"no complete checkpoint at {path}")
    _load_models(path, models, {})
    log.info("restored the weights of %s", path)
