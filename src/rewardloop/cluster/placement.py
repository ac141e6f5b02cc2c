"""Which actor goes in which placement-group bundle, with which share of it (no Ray import).

- ``split``: one bundle per actor, each role with its own GPUs (``--trainer-gpus``,
  ``--rollout-gpus``, ``--reward-gpus``): generation and scoring never wait for memory the
  trainer holds, at the price of GPUs that idle while another role works.
- ``colocate``: one bundle per trainer; generation actor j, reward actor k (and reference
  actor l) join bundle ``j % N``, ``k % N`` (``l % N``), and the actors of a bundle split its
  GPUs evenly (Ray's fractional GPUs: they share the devices, one after the other in the
  step).

The group is PACKed on as few nodes as possible, or SPREAD over as many (``--spread``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rewardloop.options import ClusterOptions

ROLES = ("trainer", "rollout", "reward", "reference")


@dataclass(frozen=True)
class Slot:
    """One actor's place: its bundle and the resources it asks for there."""

    role: str
    index: int
    bundle: int
    cpus: float
    gpus: float

    def runtime_env(self) -> dict[str, Any]:
        """The actor's environment: one given no GPU sees none. Ray leaves CUDA_VISIBLE_DEVICES
        alone for it, so its ``auto`` device would be the node's GPU 0, which Ray gave to
        another actor (out of memory, or two NCCL ranks on one device)."""
        return {} if self.gpus else {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}


@dataclass(frozen=True)
class Layout:
    """A placement group's bundles and strategy, and every actor's slot in it."""

    bundles: list[dict[str, float]]
    strategy: str
    slots: list[Slot]

    def of(self, role: str) -> list[Slot]:
        """The slots of ``role``'s actors, by index."""
        return sorted((s for s in self.slots if s.role == role), key=lambda s: s.index)

    def needs(self) -> dict[str, float]:
        """Total CPUs and GPUs of the bundles."""
        return {key: sum(b.get(key, 0.0) for b in self.bundles) for key in ("CPU", "GPU")}


def _share(total: float, parts: int) -> float:
    """``total / parts`` rounded down to Ray's resource precision (1e-4), so that the shares
    of a bundle never add up to more than the bundle."""
    return math.floor(total / parts * 1e4) / 1e4


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}


def plan(options: ClusterOptions, reward_actors: int, reference_actors: int = 0) -> Layout:
    """The layout of ``options.trainers`` trainers, ``options.rollout_actors`` generation
    actors, ``reward_actors`` reward actors (0 when no reward model is given) and
    ``reference_actors`` reference actors (0 when the reference stays in the trainers)."""
    counts = {"trainer": options.trainers, "rollout": options.rollout_actors,
              "reward": reward_actors, "reference": reference_actors}
    cpus = options.actor_cpus
    strategy = "SPREAD" if options.spread else "PACK"
    if options.placement == "colocate":
        n = options.trainers
        members = [[(role, i) for role in ROLES for i in range(counts[role]) if i % n == b]
                   for b in range(n)]
        bundles = [_bundle(cpus * len(m), options.trainer_gpus) for m in members]
        slots = [Slot(role, i, b, cpus, _share(options.trainer_gpus, len(m)))
                 for b, m in enumerate(members) for role, i in m]
        return Layout(bundles, strategy, slots)
    gpus = {"trainer": options.trainer_gpus, "rollout": options.rollout_gpus,
            "reward": options.reward_gpus, "reference": options.reference_gpus}
    slots, bundles = [], []
    for role in ROLES:
        for i in range(counts[role]):
            slots.append(Slot(role, i, len(bundles), cpus, gpus[role]))
            bundles.append(_bundle(cpus, gpus[role]))
    return Layout(bundles, strategy, slots)
