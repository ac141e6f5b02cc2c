"""The trainer's side of the actors: a ``Generator`` whose samples come from a generation
actor, a reward source scored by a reward actor, a KL reference held by a reference actor, and
``RayRoles`` handing them to a trainer.

Weights flow from trainer rank 0 through Ray's object store: after an optimizer step the
generator is marked stale (``engines.weight_sync.WeightSync``), and before the next generation
every rank gathers the full weights (``engine_weights``: LoRA merged, FSDP shards gathered),
rank 0 puts them in the object store once and every generation actor loads them, the other
ranks waiting at a barrier (``push_once``). A rank then waits only for its own actor's samples.

Every call has a timeout, and a dead or silent actor is an ``ActorLost`` naming it, which
stops the run (``rl.py`` restarts it from the last checkpoint when asked to).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

from rewardloop.cluster.actors import moved
from rewardloop.engines.base import Rollout, SamplingSettings, check_request
from rewardloop.engines.weight_sync import WeightSync, engine_weights, push_once
from rewardloop.errors import TrainingError


class ActorLost(TrainingError):
    """An actor of the run died or stopped answering; the message names it."""


def call(label: str, ref: Any, timeout_s: float) -> Any:
    """``ray.get(ref)``, with a dead or silent actor turned into ``ActorLost``."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorLost(f"the {label} did not answer within {timeout_s:g} s (hung or "
                        "overloaded?)") from None
    except ray.exceptions.RayActorError as exc:
        raise ActorLost(f"the {label} died ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass(frozen=True)
class Actor:
    """A handle and the name messages give it (``generation actor 0``)."""

    label: str
    handle: Any


class RayGenerator:
    """A :class:`~rewardloop.engines.base.Generator` whose completions come from ``own``, one
    of the run's generation ``actors`` (all of which get the weights).

    ``prefetch`` (one-step off-policy) starts a generation before the trainer's update; the
    next ``generate`` of the same prompts returns it, with ``staleness`` the optimizer steps
    the trainer took since those samples' weights, and the engine's log-probs of its samples
    (``sampler_logps``) for the importance-weight correction.
    """

    def __init__(self, actors: Sequence[Actor], own: Actor, tokenizer: Any, timeout_s: float,
                 model: Any, *, off_policy: bool = False) -> None:
        self.actors, self.own, self.timeout_s = list(actors), own, timeout_s
        self.tokenizer = tokenizer
        self.off_policy = off_policy
        self.sync = WeightSync()
        # The actors loaded the policy from disk; the trainer's may already differ (a LoRA
        # adapter over the base, a resumed checkpoint): push before the first generation.
        self.sync.mark(model)
        self.version = 0  # optimizer steps seen (policy_updated calls)
        self.staleness = 0  # of the last rollout generate returned
        self._ahead: tuple[Any, int, Any] | None = None  # (request, version, ObjectRef)

    def policy_updated(self, model: Any) -> None:
        self.version += 1
        self.sync.mark(model)

    def _submit(self, prompts: Sequence[Sequence[int]], n: int, settings: SamplingSettings
                ) -> tuple[Any, Any]:
        check_request(prompts, n)
        model = self.sync.take()
        if model is not None:
            with engine_weights(model) as weights:
                push_once(self._send, weights)
        request = ([list(p) for p in prompts], n, settings)
        return request, self.own.handle.generate.remote(*request, self.off_policy)

    def prefetch(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> None:
        request, ref = self._submit(prompts, n, settings)
        self._ahead = (request, self.version, ref)

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        request = ([list(p) for p in prompts], n, settings)
        if self._ahead is not None and self._ahead[0] == request:
            _, version, ref = self._ahead
        else:
            (_, ref), version = self._submit(prompts, n, settings), self.version
        self._ahead = None
        self.staleness = self.version - version
        return call(self.own.label, ref, self.timeout_s)

    def _send(self, weights: list[tuple[str, Any]]) -> None:
        """One copy in the object store, loaded by every generation actor (waited for: a
        rank's next generation must not reach its actor before the new weights)."""
        ref = ray.put({name: t.detach().cpu() for name, t in weights})
        pending = [(a, a.handle.load_weights.remote(ref)) for a in self.actors]
        for actor, loaded in pending:
            call(actor.label, loaded, self.timeout_s)


class RemoteModelReward:
    """A reward-model source (``rewards.ModelReward``'s interface) scored by a reward actor."""

    def __init__(self, actor: Actor, spec: str, name: str, timeout_s: float) -> None:
        self.actor, self.spec, self.name, self.timeout_s = actor, spec, name, timeout_s

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any
                 ) -> list[float]:
        ref = self.actor.handle.score.remote(self.spec, list(prompts), list(completions))
        return call(self.actor.label, ref, self.timeout_s)


class RemoteReference:
    """The KL reference (``train.roles.RemoteReference``) held by a reference actor."""

    def __init__(self, actor: Actor, timeout_s: float) -> None:
        self.actor, self.timeout_s = actor, timeout_s

    def logps(self, rollout: Rollout, temperature: float, micro_batch_size: int) -> Any:
        ref = self.actor.handle.logps.remote(moved(rollout, "cpu"), temperature,
                                             micro_batch_size)
        return call(self.actor.label, ref, self.timeout_s).to(rollout.completion_ids.device)


@dataclass(frozen=True)
class RayRoles:
    """``train.roles.RemoteRoles`` on Ray: trainer rank r samples from generation actor
    ``r % M``, scores with reward actor ``r % K`` and asks reference actor ``r % R``."""

    rollout: list[Actor]
    reward: list[Actor]
    reward_names: dict[str, str]  # reward-model spec -> its metric name
    timeout_s: float
    off_policy: bool = False  # one-step off-policy: samples carry the engine's log-probs
    references: list[Actor] = field(default_factory=list)

    @staticmethod
    def _rank() -> int:
        return int(os.environ.get("RANK", "0"))

    def generator(self, model: Any, tokenizer: Any, settings: SamplingSettings) -> RayGenerator:
        own = self.rollout[self._rank() % len(self.rollout)]
        return RayGenerator(self.rollout, own, tokenizer, self.timeout_s, model,
                            off_policy=self.off_policy)

    def reference(self) -> RemoteReference | None:
        if not self.references:
            return None
        actor = self.references[self._rank() % len(self.references)]
        return RemoteReference(actor, self.timeout_s)

    def reward_model(self, spec: str) -> RemoteModelReward | None:
        if not self.reward or spec not in self.reward_names:
            return None
        actor = self.reward[self._rank() % len(self.reward)]
        return RemoteModelReward(actor, spec, self.reward_names[spec], self.timeout_s)
