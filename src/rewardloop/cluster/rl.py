"""``rewardloop train grpo|rloo|ppo --ray``: the driver of an online-RL run on Ray.

It places the actors (``placement.plan``) in one placement group, starts them, hands the
trainers the generation and reward actors (``remote.RayRoles``) and waits. The first failure
stops every actor of the run: an actor that died (or stopped answering) is named together
with the last good checkpoint, and with ``--max-restarts K`` the run starts again from that
checkpoint, at most K times. Errors of the run itself (a user error, a NaN) are the same as
in one process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rewardloop.cluster.actors import ReferenceActor, RewardActor, RolloutActor, TrainerActor
from rewardloop.cluster.connect import connect
from rewardloop.cluster.placement import Layout, Slot, plan
from rewardloop.cluster.remote import Actor, ActorLost, RayRoles, call
from rewardloop.errors import TrainingError, UserError
from rewardloop.rewards import parse_reward_spec
from rewardloop.train.checkpoint import latest_checkpoint
from rewardloop.util.files import atomic_write_text

log = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the driver looks at the trainers (a failure stops the run within this)."""
GRACE_S = 3.0
"""After a first failure, how long the driver waits for the others' reasons: the rank whose
generation actor died says so, while its peers only report a lost collective."""
PLACE_TIMEOUT_S = 120.0
"""Seconds to wait for the cluster to place the group before saying it cannot."""


def actor_name(out: Path, attempt: int, role: str, index: int) -> str:
    """The Ray name of an actor of the run in ``out`` (unique per attempt)."""
    return f"rewardloop:{Path(out).resolve()}:{attempt}:{role}-{index}"


def model_rewards(cfg: Any) -> list[str]:
    """The reward-model directories among the run's ``--reward`` specs (functions run in the
    trainers)."""
    specs = [parse_reward_spec(text).spec for text in cfg.rewards]
    return list(dict.fromkeys(s for s in specs if Path(s).expanduser().exists()))


def reference_actors(cfg: Any) -> int:
    """Reference actors the run starts: none without a KL term, or with LoRA (its reference
    is the trainer's own base with the adapters off)."""
    needs_reference = cfg.kl_coef > 0 or cfg.kl_target is not None
    return cfg.reference_actors if needs_reference and cfg.lora_r is None else 0


def record_restarts(out: Path, summary: Mapping[str, Any], restarts: int) -> dict[str, Any]:
    """``summary`` with the number of ``restarts`` the run took, which is also merged into
    ``out/summary.json`` (rank 0 wrote it without: only the driver knows), atomically."""
    path = Path(out) / "summary.json"
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        atomic_write_text(path, json.dumps({**saved, "restarts": restarts}, indent=2) + "\n")
    else:
        log.warning("%s is not on this machine (is --out on a filesystem the driver sees?): "
                    "restarts=%d is not recorded in it", path, restarts)
    return {**summary, "restarts": restarts}


def train_on_ray(kind: str, cfg: Any) -> dict[str, Any]:
    """Run the online-RL trainer ``kind`` (grpo or ppo) on Ray per ``cfg``; the summary, with
    the number of ``restarts`` it took (also in OUT/summary.json)."""
    layout = plan(cfg, cfg.reward_actors if model_rewards(cfg) else 0, reference_actors(cfg))
    started = connect(cfg.ray, cpus=layout.needs()["CPU"])
    try:
        attempt = 0
        while True:
            try:
                return record_restarts(cfg.out, Job(kind, cfg, attempt).run(), attempt)
            except ActorLost as exc:
                last = latest_checkpoint(cfg.out)
                where = (f"the last good checkpoint is {last}" if last is not None
                         else "no checkpoint was written yet")
                if attempt >= cfg.max_restarts:
                    hint = " (rerun with --resume)" if last is not None else ""
                    raise TrainingError(f"{exc}; the run stopped, {where}{hint}") from None
                attempt += 1
                log.warning("%s; restart %d of %d, %s", exc, attempt, cfg.max_restarts, where)
                cfg = dataclasses.replace(cfg, resume=last is not None,
                                          overwrite=last is None)
    finally:
        if started:
            ray.shutdown()


class Job:
    """One attempt: the placement group, the actors, the trainers' futures."""

    def __init__(self, kind: str, cfg: Any, attempt: int) -> None:
        self.kind, self.cfg, self.attempt = kind, cfg, attempt
        self.specs = model_rewards(cfg)
        self.layout = plan(cfg, cfg.reward_actors if self.specs else 0, reference_actors(cfg))
        self.group: Any = None
        self.actors: list[Actor] = []

    def run(self) -> dict[str, Any]:
        try:
            self.group = self._place(self.layout)
            trainers, roles = self._start()
            master = call("trainer rank 0", trainers[0].handle.endpoint.remote(),
                          self.cfg.actor_timeout)
            futures = [t.handle.train.remote(self.kind, self.cfg, master, roles)
                       for t in trainers]
            return self._wait(trainers, futures)
        finally:
            self.close()

    def _place(self, layout: Layout) -> Any:
        needs, has = layout.needs(), ray.cluster_resources()
        short = [f"{needs[k]:g} {k}s (the cluster has {has.get(k, 0):g})" for k in needs
                 if needs[k] > has.get(k, 0.0) + 1e-9]
        if short:
            raise UserError(f"the run needs {', '.join(short)}: lower --trainers, "
                            "--rollout-actors, --reward-actors, the --*-gpus or --actor-cpus, "
                            "or add nodes")
        group = placement_group(layout.bundles, strategy=layout.strategy)
        ready, _ = ray.wait([group.ready()], timeout=PLACE_TIMEOUT_S)
        if not ready:
            remove_placement_group(group)
            raise UserError(f"Ray could not place {len(layout.bundles)} bundles "
                            f"({layout.strategy}) within {PLACE_TIMEOUT_S:g} s: the resources "
                            "are there but taken, or no node fits one bundle")
        return group

    def _spawn(self, cls: type, slot: Slot, label: str, *args: Any) -> Actor:
        options = {"num_cpus": slot.cpus, "num_gpus": slot.gpus,
                   "runtime_env": slot.runtime_env(),
                   "name": actor_name(self.cfg.out, self.attempt, slot.role, slot.index),
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       self.group, placement_group_bundle_index=slot.bundle)}
        actor = Actor(label, ray.remote(cls).options(**options).remote(*args))
        self.actors.append(actor)
        return actor

    def _start(self) -> tuple[list[Actor], RayRoles]:
        cfg, layout = self.cfg, self.layout
        rollout = [self._spawn(RolloutActor, s, f"generation actor {s.index}", cfg, s.index)
                   for s in layout.of("rollout")]
        reward = [self._spawn(RewardActor, s, f"reward actor {s.index}", self.specs, cfg.device,
                              cfg.reward_batch_size, cfg.max_prompt_length + cfg.max_new_tokens)
                  for s in layout.of("reward")]
        references = [self._spawn(ReferenceActor, s, f"reference actor {s.index}", cfg)
                      for s in layout.of("reference")]
        trainers = [self._spawn(TrainerActor, s, f"trainer rank {s.index}", s.index,
                                cfg.trainers) for s in layout.of("trainer")]
        for actor in self.actors:  # loading errors surface here, before any training
            call(actor.label, actor.handle.ready.remote(), cfg.actor_timeout)
        names = call(reward[0].label, reward[0].handle.names.remote(),
                     cfg.actor_timeout) if reward else {}
        return trainers, RayRoles(rollout, reward, names, float(cfg.actor_timeout),
                                  off_policy=getattr(cfg, "async_rollout", False),  # grpo
                                  references=references)

    def _wait(self, trainers: list[Actor], futures: list[Any]) -> dict[str, Any]:
        """Rank 0's summary once every trainer is done; the first failure, with the others'
        reasons gathered for ``GRACE_S``, raised as the most telling one."""
        pending, results = list(futures), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in done:
                rank = futures.index(ref)
                try:
                    results[rank] = ray.get(ref)
                except Exception as exc:  # classified below
                    raise self._failure(trainers, futures, rank, exc) from None
        return results[0]

    def _failure(self, trainers: list[Actor], futures: list[Any], rank: int,
                 first: Exception) -> Exception:
        errors = {rank: first}
        deadline = time.monotonic() + GRACE_S
        for other, ref in enumerate(futures):
            if other in errors:
                continue
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception as exc:  # classified below
                errors[other] = exc
        reasons = {r: _reason(trainers[r].label, exc) for r, exc in errors.items()}
        lost = [e for e in reasons.values() if isinstance(e, ActorLost)]
        return lost[0] if lost else reasons[rank]

    def close(self) -> None:
        """Stop every actor of the attempt and free its placement group."""
        for actor in self.actors:
            ray.kill(actor.handle)
        self.actors = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None


def _reason(label: str, exc: Exception) -> Exception:
    """What a trainer's failure means: its own death (ActorLost), an error of the run (the
    original UserError / TrainingError / ActorLost), or anything else as a TrainingError."""
    if isinstance(exc, ray.exceptions.RayActorError):
        return ActorLost(f"the {label} died ({str(exc).strip().splitlines()[0][:200]})")
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError | TrainingError):
        return cause
    text = str(cause or exc).strip().splitlines()
    return TrainingError(f"{label} failed: {type(cause or exc).__name__}: "
                         f"{text[-1][:300] if text else ''}")
