"""The one optimizer step of the offline trainers (sft, rm, dpo/kto).

A trainer says how to compute the loss of a micro-batch; ``accumulate_and_step`` runs this
rank's micro-batches (gradient sync only on the last), then ``Runtime.optimizer_step`` (clip,
real grad norm, finite check agreed by all ranks, step, schedule, zero_grad). Online RL calls
the same ``Runtime`` pieces from its own minibatch loop.

Each micro-batch loss must already be divided by the GLOBAL count of the step (tokens,
sequences or comparison weight over all ranks' rows), so the losses of all micro-batches of all
ranks sum to the step's loss; that sum is what ``StepOutput.loss`` reports on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rewardloop.train.runtime import Runtime

MicroLoss = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
"""indices of one micro-batch -> (its share of the step's loss, metric sums over its rows)."""


@dataclass
class StepOutput:
    """What one optimizer step measured, the same on every rank."""

    loss: float
    """The step's loss (summed over micro-batches and ranks: the global loss)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    metric_sums: dict[str, float]
    """Each metric summed over the step's rows on all ranks (divide by the row count)."""


def accumulate(rt: Runtime, model: nn.Module, micro_batches: Sequence[tuple[list[int], bool]],
               micro_loss: MicroLoss) -> tuple[float, dict[str, float]]:
    """Forward/backward of this rank's ``micro_batches`` (``train.data.rank_micro_batches``:
    a filler's loss counts 0), gradients synced on the last; returns this rank's (loss, metric
    sums)."""
    total = 0.0
    sums: dict[str, float] = {}
    for k, (indices, filler) in enumerate(micro_batches):
        rt.sync_gradients(model, last=k == len(micro_batches) - 1)
        with rt.autocast():
            loss, metrics = micro_loss(indices)
        if filler:
            loss = loss * 0.0
        rt.backward(loss)
        total += float(loss.detach())
        # A filler's metrics count 0 but keep their keys: a rank that holds only fillers (a
        # batch shorter than the number of processes) must sum as many numbers as the others.
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + (0.0 if filler else float(value))
    return total, sums


def accumulate_and_step(rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer,
                        params: Sequence[torch.Tensor],
                        micro_batches: Sequence[tuple[list[int], bool]], micro_loss: MicroLoss,
                        *, max_grad_norm: float, step: int, run: Any = None,
                        scheduler: Any = None) -> StepOutput:
    """``accumulate`` this rank's micro-batches, then one optimizer step."""
    total, sums = accumulate(rt, model, micro_batches, micro_loss)
    keys = sorted(sums)
    reduced = rt.sum_floats(total, *(sums[k] for k in keys))
    grad_norm = rt.optimizer_step(optimizer, params, max_grad_norm, step=step, loss=total,
                                  run=run, scheduler=scheduler)
    return StepOutput(reduced[0], grad_norm, dict(zip(keys, reduced[1:], strict=True)))
