"""Roles an online-RL trainer can hand to other processes: generation and reward-model scoring.

In one process (or under torchrun) a trainer builds its generator, reward models and reference
itself. On a cluster (``rewardloop.cluster``) they may run in actors of their own; the trainer is
then given a ``RemoteRoles`` and asks it for the same things, so its loop stays the one loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from rewardloop.engines.base import Generator, Rollout, SamplingSettings


class RemoteReference(Protocol):
    """The KL reference model held by another process."""

    def logps(self, rollout: Rollout, temperature: float, micro_batch_size: int
              ) -> torch.Tensor:
        """(B, C) reference log-probs of ``rollout``'s completions, on the rollout's device."""
        ...


class RemoteRoles(Protocol):
    """Where a trainer's generation and reward-model scoring run when not in its process."""

    def generator(self, model: Any, tokenizer: Any, settings: SamplingSettings) -> Generator:
        """The generator this trainer process samples with; ``model`` is the (unwrapped)
        policy whose weights it must sample from after every ``policy_updated``."""
        ...

    def reward_model(self, spec: str) -> Any:
        """A reward source for the reward-model directory ``spec`` (``.name`` and TRL's call
        signature), or None to load the model in this process."""
        ...

    def reference(self) -> RemoteReference | None:
        """The KL reference model elsewhere, or None to keep a frozen copy in this process."""
        ...
