"""Deterministic, resumable data order and gradient-accumulation helpers shared by the trainers.

The most reported resume bug in RLHF libraries is the data position not being restored
(transformers #11323, OpenRLHF #1103), or restored at an epoch boundary so that no training
happens. ``EpochSampler`` keeps its whole position in two integers, and each epoch's order is a
pure function of ``(seed, epoch)``, so a resumed run draws exactly the batches an uninterrupted
one would. ``LengthGroupedSampler`` does the same for batches of similar-length rows, and
``scheduler`` is the learning-rate schedule every trainer uses.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardloop.errors import UserError
from rewardloop.tokenize import length_grouped_batches


class EpochSampler:
    """Batches of indices into a dataset of ``n`` items, epoch after epoch, forever.

    Each epoch is a fresh permutation drawn from ``numpy.random.default_rng((seed, epoch))``
    (independent of the global RNGs). The last short batch of an epoch is yielded unless
    ``drop_last``; a batch never spans two epochs.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, *, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if n < 1:
            raise ValueError("EpochSampler needs at least one item")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} > dataset size {n} with drop_last: "
                             "no batch could ever be drawn")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next item to hand out
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
            else:
                self._order = np.arange(self.n)
        return self._order

    def next_batch(self) -> list[int]:
        """The next batch of indices; moves to the next epoch when this one is used up."""
        remaining = self.n - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._order = None
        order = self._epoch_order()
        batch = order[self.position:self.position + self.batch_size]
        self.position += len(batch)
        return [int(i) for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": self.n,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue at ``state``'s position; refuses a state from a different data set-up (or
        none: a checkpoint written without one)."""
        state = _sampler_state(state)
        _check_same_setup(state, {"n": self.n, "batch_size": self.batch_size, "seed": self.seed})
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = None


_SETUP_NAMES = {"n": "items in the data (rows of --data, prompts of --prompts)",
                "batch_size": "--batch-size", "seed": "--seed"}


def _check_same_setup(state: Mapping[str, Any], mine: Mapping[str, int]) -> None:
    """A UserError naming what differs when a checkpoint's sampler comes from another data
    set-up: the position it holds means nothing in this one."""
    for key, value in mine.items():
        if int(state[key]) != value:
            raise UserError(f"the checkpoint was written with {_SETUP_NAMES[key]} = {state[key]}"
                            f", this run has {value}; resume with the same data and settings "
                            "(or start a new run)")


def read_json_mapping(path: Path, what: str) -> dict[str, Any]:
    """A JSON file holding one object ``{annotator: what}`` (annotator weights, groups); a
    UserError for a missing file, bad JSON or another shape."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object mapping annotator names to {what}")
    return data


def _sampler_state(state: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if state is None:
        raise UserError("the checkpoint has no data-order state to resume from (it was not "
                        "written by this trainer); start a new run or resume the right one")
    return state


def microbatches(batch: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Split one optimizer step's batch into consecutive micro-batches for accumulation."""
    if micro_batch_size < 1:
        raise ValueError("micro_batch_size must be at least 1")
    items = list(batch)
    return [items[i:i + micro_batch_size] for i in range(0, len(items), micro_batch_size)]


def rank_micro_batches(batch: Sequence[int], lengths: Sequence[int] | Mapping[int, int],
                       grad_accum: int, rank: int, world_size: int
                       ) -> list[tuple[list[int], bool]]:
    """This rank's ``grad_accum`` micro-batches of one optimizer step: ``(indices, filler)``.

    The step's batch is cut into ``world_size * grad_accum`` micro-batches of similar lengths
    and dealt out round-robin, so the ranks together process exactly the rows one process
    would. Every rank must run the same number of forward/backward passes (the last one
    all-reduces the gradients), so when a short batch (an epoch's last) leaves a rank with
    nothing, it gets a *filler*: the batch's first row, whose loss the caller multiplies by 0.
    """
    n_micro = world_size * grad_accum
    ordered = sorted(batch, key=lambda i: -lengths[i])
    size = math.ceil(len(ordered) / n_micro)
    chunks = [ordered[k:k + size] for k in range(0, len(ordered), size)]
    if world_size > 1:
        chunks += [[] for _ in range(n_micro - len(chunks))]
    return [(chunk, False) if chunk else ([ordered[0]], True)
            for chunk in chunks[rank::world_size]]


def count_tokens(masks: Sequence[torch.Tensor]) -> int:
    """Total of 1s over all micro-batches' masks (each (batch, seq)): the global normaliser.

    Divide each micro-batch's *summed* token loss by this count before ``backward()``, and the
    accumulated gradient equals that of one big batch with a token-mean loss, whatever the split.
    """
    return int(sum(int(m.sum().item()) for m in masks))


class LengthGroupedSampler:
    """Resumable epochs of batches of similar-length rows (``tokenize.length_grouped_batches``).

    Each epoch's batches are a pure function of ``(seed, epoch)``, and the position is two
    integers, so a resumed run draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0) -> None:
        if not lengths:
            raise ValueError("LengthGroupedSampler needs at least one item")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.epoch, self.position = 0, 0
        self._batches: list[list[int]] | None = None

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = self._batches_of(self.epoch)
        return self._batches

    def _batches_of(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        return length_grouped_batches(self.lengths, self.batch_size, rng)

    def rows_drawn(self, steps: int) -> list[int] | None:
        """The rows a run's first ``steps`` batches draw (from the start), in order; None when
        they take a whole epoch or more, i.e. every row. Reads no state and changes none."""
        first = self._batches_of(0)
        if steps >= len(first):
            return None
        return sorted({i for batch in first[:steps] for i in batch})

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches())

    def next_batch(self) -> list[int]:
        """The next batch of indices; moves to the next epoch when this one is used up."""
        if self.position >= len(self._epoch_batches()):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        batch = self._epoch_batches()[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": len(self.lengths),
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue at ``state``'s position; refuses a state from a different data set-up (or
        none: a checkpoint written without one)."""
        state = _sampler_state(state)
        _check_same_setup(state, {"n": len(self.lengths), "batch_size": self.batch_size,
                                  "seed": self.seed})
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None


def scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
              schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the peak, then linear or cosine decay to 0 at ``total_steps``, or flat."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
