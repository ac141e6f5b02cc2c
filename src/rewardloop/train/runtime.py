"""THE training runtime: one process or many, the same trainer code.

Every trainer (sft, rm, dpo, grpo/rloo/reinforce++, ppo) builds one ``Runtime`` and lets it do
what depends on the scale it runs at:

- **processes**: rank and world size come from torch.distributed's environment (``torchrun``,
  ``rewardloop ... --nproc N`` or a Ray actor); with one process nothing is initialised;
- **strategy**: ``ddp`` (a full replica per rank, gradients all-reduced) or ``fsdp`` (FSDP2:
  ``fully_shard`` on every decoder layer, then on the whole model, so parameters, gradients and
  optimizer state are sharded); frozen models are sharded the same way under fsdp;
- **precision**: weights, gradients, their reduction and the optimizer state stay fp32 (master
  weights); ``bf16``/``fp16`` only change the compute (autocast in one process or under DDP,
  FSDP2's ``MixedPrecisionPolicy`` when sharded). AdamW on bf16 weights rounds away any update
  under ~0.4% of a weight, which at RL learning rates is most of them;
- **one optimizer step** (``optimizer_step``): unscale, clip, the real grad norm (also with
  clipping off), a finite check every rank agrees on, step, zero_grad.

Gradient accumulation: call ``sync_gradients(model, last)`` before each micro-batch's forward
(only the step's last micro-batch all-reduces) and ``backward(loss)`` after it. The losses are
normalised by GLOBAL counts (tokens or sequences of the whole step on all ranks), so each rank's
loss is its share of the global loss; DDP and FSDP average gradients over ranks, so ``backward``
multiplies by the world size to turn that average back into the sum. N processes then take
exactly the step one process would (``tests/invariants/test_distributed.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from rewardloop.errors import TrainingError, UserError
from rewardloop.lm_head import FULL_LOGITS_ATTR
from rewardloop.options import PRECISIONS, STRATEGIES, RuntimeOptions

log = logging.getLogger(__name__)

T = TypeVar("T")
_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IO_TIMEOUT_S = 1800
"""How long the ranks wait at a barrier (``Runtime.barrier``) for one of them to finish its I/O:
rank 0 alone writes the final model and fsyncs every checkpoint file, which for a 7B model in
fp32 (27 GB) on network storage takes minutes, far past --dist-timeout, the hang detector of
the training collectives. Every barrier is such a wait."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


class Runtime:
    """Rank, device, strategy and precision of this process (see the module docstring)."""

    def __init__(self, options: RuntimeOptions, device: str = "auto") -> None:
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.device = self._device(device)
        self.strategy = self._strategy(options.strategy)
        self.precision = self._precision(options.precision)
        self.gradient_checkpointing = options.gradient_checkpointing
        self.chunked_lm_head = options.chunked_lm_head
        self.timeout_s = options.dist_timeout
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self._mesh: Any = None
        self._before_leaving: list[Callable[[], None]] = []
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        # Barriers wait on a group of their own (the same ranks and backend), with a timeout
        # long enough for rank 0's saves.
        self._io_group = dist.new_group(timeout=datetime.timedelta(
            seconds=max(self.timeout_s, IO_TIMEOUT_S))) if self.distributed else None
        if self.distributed:
            log.info("rank %d of %d on %s (%s, %s)", self.rank, self.world_size, self.device,
                     self.strategy, self.precision)

    # -- resolution of the options -----------------------------------------------------------

    def _device(self, device: str) -> torch.device:
        from rewardloop.models import resolve_device

        dev = resolve_device(device)
        if dev.type == "cuda" and self.world_size > 1:
            if torch.cuda.device_count() <= self.local_rank:
                raise UserError(f"local rank {self.local_rank} has no GPU: "
                                f"{torch.cuda.device_count()} visible on this machine")
            return torch.device("cuda", self.local_rank)
        return dev

    def _strategy(self, strategy: str) -> str:
        if strategy not in STRATEGIES:
            raise UserError(f"--strategy must be one of {list(STRATEGIES)}")
        if self.world_size == 1:
            if strategy == "fsdp":
                raise UserError("--strategy fsdp shards the model over several processes; with "
                                "one process use the default, or launch several with --nproc N "
                                "or torchrun")
            return "none"
        return "ddp" if strategy == "auto" else strategy

    def _precision(self, precision: str) -> str:
        if precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {list(PRECISIONS)}")
        on_gpu = self.device.type == "cuda"
        if precision == "auto":
            return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp16" and not on_gpu:
            raise UserError("--precision fp16 needs a CUDA GPU (its gradient scaler and fast "
                            "kernels are GPU-only); use bf16 or fp32 on the CPU")
        return precision

    # -- who am I -----------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes metrics, samples, summaries and the final model."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """What the run ran on, for its summary: device, precision, strategy, world size."""
        return {"device": self.device.type, "precision": self.precision,
                "strategy": self.strategy, "world_size": self.world_size}

    @property
    def compute_dtype(self) -> torch.dtype:
        return _COMPUTE_DTYPES[self.precision]

    def weights_dtype(self, requested: str) -> str:
        """The dtype to load TRAINED weights in: fp32 master weights unless the user asked for
        another one explicitly (then it is theirs, with a warning when updates will round)."""
        if requested == "auto":
            return "float32"
        if requested in ("bfloat16", "float16"):
            log.warning("--dtype %s keeps the trained weights themselves in half precision: "
                        "AdamW updates under ~0.4%% of a weight round away. Leave --dtype auto "
                        "and use --precision bf16 for fp32 master weights.", requested)
        return requested

    def frozen_dtype(self, requested: str) -> str:
        """The dtype of frozen models (reference, reward models): the compute precision."""
        if requested != "auto":
            return requested
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]

    # -- collectives ---------------------------------------------------------------------------

    def barrier(self) -> None:
        """Wait for every rank, for up to ``IO_TIMEOUT_S`` (one may be saving alone)."""
        if self.distributed:
            dist.barrier(group=self._io_group)

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max/min) of ``value`` over ranks, returned on the value's own device."""
        if not self.distributed:
            return value
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        out = value.detach().clone().to(self._comm_device)
        dist.all_reduce(out, op=ops[op])
        return out.to(value.device)

    def sum_floats(self, *values: float) -> list[float]:
        """Sums over ranks of a few numbers (global token and sequence counts), one collective."""
        tensor = torch.tensor(values, dtype=torch.float64)
        return self.all_reduce(tensor).tolist()

    def reduce_metrics(self, values: dict[str, float], count: int = 0,
                       weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """The whole batch's figures from each rank's: a ``*_max`` key is the largest of any
        rank, every other number the mean over ranks (per-process means of equal-sized shares:
        the whole batch's mean). With ``count`` (the items of each rank's equal share), a
        ``<x>/std`` key next to ``<x>/mean`` is the whole batch's sample standard deviation,
        not the mean of the ranks' ones. A key of ``weights`` is a mean over units whose number
        differs between ranks (completion tokens): weighed by this rank's number of them.
        Every rank must pass the same keys."""
        if not self.distributed:
            return dict(values)
        weights = weights or {}
        # One item a rank still pools into a batch std (its own is 0): what is needed is two
        # items in all, not two on each rank.
        stds = sorted(k for k in values if count >= 1 and count * self.world_size > 1
                      and k.endswith("/std") and f"{k[:-4]}/mean" in values)
        weighted = sorted(k for k in values if k in weights and k not in stds)
        means = sorted(k for k in values if not k.endswith("_max") and k not in stds
                       and k not in weighted)
        maxima = sorted(k for k in values if k.endswith("_max"))
        # Σ over ranks of each share's sum of squares about 0: (n - 1) s² + n m²
        squares = [(count - 1) * float(values[k]) ** 2 if count > 1 else 0.0
                   for k in stds]
        squares = [sq + count * float(values[f"{k[:-4]}/mean"]) ** 2
                   for sq, k in zip(squares, stds, strict=True)]
        sums = self.sum_floats(*(float(values[k]) for k in means), *squares,
                               *(float(values[k]) * weights[k] for k in weighted),
                               *(float(weights[k]) for k in weighted))
        out = {k: v / self.world_size for k, v in zip(means, sums, strict=False)}
        tail = sums[len(means) + len(squares):]
        for k, total_vw, total_w in zip(weighted, tail, tail[len(weighted):], strict=False):
            out[k] = total_vw / total_w if total_w > 0 else 0.0
        total = count * self.world_size
        for k, square in zip(stds, sums[len(means):len(means) + len(squares)], strict=True):
            mean = out[f"{k[:-4]}/mean"]
            out[k] = math.sqrt(max(0.0, (square - total * mean * mean) / (total - 1)))
        if maxima:
            top = self.all_reduce(torch.tensor([float(values[k]) for k in maxima],
                                               dtype=torch.float64), op="max")
            out.update(zip(maxima, top.tolist(), strict=True))
        return out

    def map_chunks(self, n: int, fn: Callable[[int], T]) -> list[T]:
        """``[fn(0), ..., fn(n - 1)]`` with the calls dealt over the ranks (rank r runs chunks r,
        r + W, ...) and the results gathered in order, on every rank (evaluation: each rank
        scores its share). Every rank makes as many calls, which FSDP's collectives need: a
        rank short of one repeats chunk 0 and drops the result. Results must be small and on
        the CPU (they are pickled)."""
        if not self.distributed:
            return [fn(k) for k in range(n)]
        mine: dict[int, T] = {}
        for k in range(self.rank, n + (-n % self.world_size), self.world_size):
            result = fn(k if k < n else 0)
            if k < n:
                mine[k] = result
        merged: dict[int, T] = {}
        for part in self.gather_objects(mine):
            merged.update(part)
        return [merged[k] for k in range(n)]

    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order (small Python objects: metrics, texts)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of ``items`` (the caller made the count divisible)."""
        size = len(items) // self.world_size
        return list(items[self.rank * size:(self.rank + 1) * size])

    def check_divisible(self, count: int, what: str) -> None:
        """UserError unless ``count`` splits evenly over the ranks."""
        if count % self.world_size:
            raise UserError(f"{what} ({count}) must be a multiple of the number of processes "
                            f"({self.world_size}) so that every process gets the same share")

    # -- models ----------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, *, trainable: bool = True) -> nn.Module:
        """Checkpointing, then DDP / FSDP2 wrapping; frozen models are sharded under fsdp only.

        The returned module is what the loop calls; ``unwrap`` gives the HF model back.
        """
        if trainable and self.gradient_checkpointing:
            _enable_checkpointing(model)
        if self.strategy == "fsdp":
            model = self._fully_shard(model)
        elif self.strategy == "ddp" and trainable:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if not self.chunked_lm_head:
            setattr(model, FULL_LOGITS_ATTR, True)
        return model

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self._mesh is None:
            self._mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=self.compute_dtype,
                                      reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self._mesh, mp_policy=policy)
        fully_shard(model, mesh=self._mesh, mp_policy=policy)
        return model

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """The whole model on every rank for a while (generation under FSDP2: the decoding
        loop runs a different number of steps on each rank, so forward passes must not need
        the others). Every rank must enter it; a no-op without sharding."""
        if self.strategy != "fsdp":
            yield model
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False)
            unit.unshard()
        try:
            yield model
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module under a DDP wrapper (FSDP2 keeps the model's own class)."""
        return model.module if hasattr(model, "module") and isinstance(
            model, torch.nn.parallel.DistributedDataParallel) else model

    def save_model(self, model: nn.Module, tokenizer: Any, out_dir: Any, *,
                   merge_lora: bool = False) -> None:
        """``models.save_model`` of the whole model by rank 0 (FSDP shards are gathered on
        every rank first: a rank that sent while others still gathered would hang), with the
        chat template's end of turn among its generation config's EOS ids."""
        from rewardloop.models import add_stop_token, save_model
        from rewardloop.tokenize import end_of_turn_id

        inner = self.unwrap(model)
        state = None
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
            # Tied weights (embeddings = output layer) come back as two gathered copies that
            # save_pretrained cannot recognise as one: keep the first name, as it would.
            seen: dict[int, str] = {}
            for name, param in inner.named_parameters(remove_duplicate=False):
                if id(param) in seen:
                    state.pop(name, None)
                seen.setdefault(id(param), name)
        if self.is_main:
            add_stop_token(inner, end_of_turn_id(tokenizer) if tokenizer is not None else None)
            save_model(inner, tokenizer, out_dir, merge_lora=merge_lora, state_dict=state)
        self.barrier()

    def check_merge_lora(self, merge_lora: bool) -> None:
        """--merge-lora folds adapters into full weights, which FSDP never holds in one place."""
        if merge_lora and self.strategy == "fsdp":
            raise UserError("--merge-lora does not work with --strategy fsdp (no process holds "
                            "the full weights); save the adapter and merge it afterwards, or "
                            "use --strategy ddp")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Reduced-precision compute for forward passes (a no-op in fp32 and under FSDP2,
        whose policy casts the parameters itself)."""
        if self.precision == "fp32" or self.strategy == "fsdp":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    # -- the step ----------------------------------------------------------------------------------

    def sync_gradients(self, model: nn.Module, last: bool) -> None:
        """Before a micro-batch's forward: all-reduce its gradients only if it is the step's
        last (accumulating micro-batches locally saves (n - 1) all-reduces a step)."""
        if self.strategy == "ddp":
            model.require_backward_grad_sync = last  # type: ignore[assignment]
        elif self.strategy == "fsdp":
            model.set_requires_gradient_sync(last)  # type: ignore[operator]

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this rank's share of a globally normalised loss (see module docstring)."""
        if self.world_size > 1:
            loss = loss * self.world_size
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                       max_grad_norm: float, *, step: int, loss: torch.Tensor | float,
                       run: Any = None, scheduler: Any = None) -> float:
        """Clip, check, step and zero the gradients; returns the global grad norm before
        clipping (the real one, also when ``max_grad_norm`` is 0: no clipping).

        A NaN or infinite loss or grad norm on ANY rank stops every rank with the same
        TrainingError (exit 3) before the weights change; the last checkpoint stays good.
        Several models updated together (PPO's policy and critic): ``checked_grad_norm`` for
        each, then ``apply_steps`` of all, so that none changes when one is not finite.
        """
        grad_norm = self.checked_grad_norm(optimizer, params, max_grad_norm, step=step,
                                           loss=loss, run=run)
        self.apply_steps([(optimizer, scheduler)])
        return grad_norm

    def checked_grad_norm(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                          max_grad_norm: float, *, step: int, loss: torch.Tensor | float,
                          run: Any = None) -> float:
        """The first half of ``optimizer_step``: unscale, clip and check on every rank."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        grad_norm = self.clip_gradients(params, max_grad_norm)
        loss_value = float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        # Row 0: this rank's loss; row 1: the grad norm (under fp16 an infinite grad norm is
        # the scaler's business: it skips the step). A NaN in one rank's loss reaches every
        # rank's gradient through the all-reduce, so the loss row names where it started.
        bad = torch.zeros(2, self.world_size, dtype=torch.float64)
        bad[0, self.rank] = float(not math.isfinite(loss_value))
        bad[1, self.rank] = float(self.scaler is None and not math.isfinite(grad_norm))
        bad = self.all_reduce(bad)
        if bad.any():
            row = bad[0] if bad[0].any() else bad[1]
            ranks = [r for r in range(self.world_size) if row[r] > 0]
            what = f"loss {loss_value}, grad norm {grad_norm}"
            raise TrainingError(self._nan_message(ranks, what, step, run))
        return grad_norm

    def apply_steps(self, steps: Sequence[tuple[torch.optim.Optimizer, Any]]) -> None:
        """The second half of ``optimizer_step`` for (optimizer, scheduler or None) pairs:
        step, schedule and zero the gradients (fp16: the loss scale moves once, after all)."""
        for optimizer, scheduler in steps:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    def clip_gradients(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """The global L2 norm of the gradients, then scale them to ``max_norm`` if above it
        (0: no clipping). Under FSDP2 every gradient element lives on exactly one rank, so the
        squared norms of the local shards are summed over ranks; under DDP every rank holds
        the whole (already averaged) gradient."""
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        squares = torch.zeros((), dtype=torch.float64)
        if local:
            norms = torch._foreach_norm([g.detach() for g in local])
            squares = torch.stack([n.double() for n in norms]).pow(2).sum().cpu()
        if self.strategy == "fsdp":
            squares = self.all_reduce(squares)
        norm = float(squares.sqrt())
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            torch._foreach_mul_(local, max_norm / (norm + 1e-6))
        return norm

    def _nan_message(self, ranks: list[int], what: str, step: int, run: Any) -> str:
        from rewardloop.train.checkpoint import latest_checkpoint

        where = f" on rank {', '.join(map(str, ranks))}" if self.distributed else ""
        message = f"not finite{where} at step {step} ({what}); stopped."
        if run is not None:
            latest = latest_checkpoint(run.out)
            message += (f" The last good checkpoint is {latest}; lower the learning rate and "
                        "rerun with --resume." if latest else " No checkpoint was written yet.")
        return message

    def before_leaving(self, fn: Callable[[], None] | None) -> None:
        """Run ``fn`` when the run ends, before this process leaves the process group: an
        engine built on the group (a colocated vLLM engine of several ranks) shuts down while
        the group still exists."""
        if fn is not None:
            self._before_leaving.append(fn)

    def leave_hooks(self) -> None:
        """The ``before_leaving`` functions, last first; a failure is logged, not raised."""
        while self._before_leaving:
            fn = self._before_leaving.pop()
            try:
                fn()
            except Exception as exc:  # shutting down: the run's own outcome matters more
                log.warning("shutting down %s failed: %s", fn, exc)

    def close(self) -> None:
        """Leave the process group (waits for the others first, so none is left hanging)."""
        if self.distributed and dist.is_initialized():
            self.barrier()
        self.leave_hooks()
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in
    ``_no_split_modules``; those are the units FSDP shards and gathers one at a time)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def _enable_checkpointing(model: nn.Module) -> None:
    inner: Any = getattr(model, "get_base_model", lambda: model)()
    if not hasattr(inner, "gradient_checkpointing_enable"):
        raise UserError(f"{type(inner).__name__} does not support --gradient-checkpointing")
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    outer: Any = model
    if hasattr(outer, "enable_input_require_grads"):  # LoRA: frozen embeddings need this
        outer.enable_input_require_grads()


@contextlib.contextmanager
def runtime_for(options: RuntimeOptions, device: str = "auto") -> Iterator[Runtime]:
    """A Runtime that leaves the process group when the run ends, however it ends."""
    try:
        runtime = Runtime(options, device)
    except dist.DistError as exc:  # the rendezvous: not every process of the run joined
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(
            f"rank {_env_int('RANK', 0)} of {_env_int('WORLD_SIZE', 1)}: the processes of the "
            f"run did not all join within --dist-timeout {options.dist_timeout} s; check that "
            "every process started (see its own output: a missing input file stops one before "
            f"it joins) and that MASTER_ADDR/MASTER_PORT reach rank 0: {first[:300]}") from None
    try:
        yield runtime
    except BaseException as exc:
        # Another rank may be waiting in a collective: do not wait for it in close().
        runtime.leave_hooks()
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()
        if runtime.distributed and _lost_peer(exc):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(
                f"rank {runtime.rank} of {runtime.world_size} lost contact with another process "
                f"of the run, which died or hung (see its own output; the last good checkpoint "
                f"stays): {first[:300]}") from None
        raise
    runtime.close()


def _lost_peer(exc: BaseException) -> bool:
    """A collective that failed because a peer went away (gloo/NCCL errors, timeouts)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection reset", "connection closed"))
