"""Option blocks shared by several commands' configs, and their documentation.

A command's config (one frozen dataclass) inherits the blocks it needs; each field's docstring
is its documentation, read by ``field_docs`` for the command line's ``--help``. Nothing here
imports torch, so the CLI can read the docs at start-up.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TIMEOUT_S = 90
PLACEMENTS = ("split", "colocate")


@dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Processes, sharding and precision: the options every trainer shares."""

    strategy: str = "auto"
    """With several processes: ddp (a full copy of the model per process, gradients averaged)
    or fsdp (FSDP2: parameters, gradients and optimizer state sharded per decoder layer; needs
    2+ processes). auto is ddp with several processes."""
    precision: str = "auto"
    """Compute precision: fp32, bf16 or fp16 (GPU only, with a gradient scaler). Weights,
    gradients and optimizer state stay fp32 (master weights) whatever this says. auto: bf16 on
    a GPU that supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: much less memory for ~30% more compute."""
    dist_timeout: int = DEFAULT_TIMEOUT_S
    """Seconds a process waits for the others in a collective before it stops with an error
    (a dead or hung rank must not hang the run)."""

    def check_runtime(self) -> None:
        """ValueError for a name outside the choices (called by each config's __post_init__)."""
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, "
                             f"got {self.precision!r}")
        if self.dist_timeout < 1:
            raise ValueError("dist_timeout must be at least 1 second")


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """Online RL on Ray (``--ray``): the actors of each role and the resources they take
    (docs/cluster.md). Ignored unless ``ray`` is set."""

    ray: str | None = None
    """Run on Ray: local (start a Ray on this machine for the run), auto (the cluster this
    machine joined with `ray start`), HOST:PORT or ray://HOST:PORT. None: no Ray."""
    trainers: int = 1
    """Trainer actors: one torch.distributed process each, running the same trainer code as
    torchrun; --batch-size stays the global batch."""
    rollout_actors: int = 1
    """Generation actors, each holding an engine (--generator) and a copy of the policy that
    trainer rank 0 updates after every step."""
    reward_actors: int = 1
    """Reward-model actors scoring the --reward models in batches (0: the trainers score them
    themselves). Reward functions always run in the trainers."""
    placement: str = "split"
    """split: every role on GPUs of its own (--trainer-gpus, --rollout-gpus, --reward-gpus);
    colocate: generation and reward actors share the trainers' GPUs, one bundle per trainer."""
    spread: bool = False
    """Place the bundles on as many nodes as possible (Ray's SPREAD) instead of as few as
    possible (PACK)."""
    trainer_gpus: float = 0.0
    """GPUs of each trainer actor (0: CPU). With colocate, the GPUs of each bundle, which its
    trainer shares with the generation and reward actors placed there."""
    rollout_gpus: float = 0.0
    """GPUs of each generation actor (split placement)."""
    reward_gpus: float = 0.0
    """GPUs of each reward-model actor (split placement)."""
    actor_cpus: float = 1.0
    """CPUs each actor reserves."""
    max_restarts: int = 0
    """When an actor dies: restart the whole run from its last good checkpoint, at most this
    many times (0: stop with a message naming the actor and the checkpoint)."""
    actor_timeout: int = 600
    """Seconds a trainer waits for one call to a generation or reward actor before it stops
    with an error naming the actor (a hung actor must not hang the run)."""
    async_rollout: bool = False
    """One-step off-policy: the generation actors sample step t+1 with the weights from
    before step t's update while the trainers run that update. The samples' staleness (in
    optimizer steps) is logged, and the importance weights (--is-level, --is-cap) correct
    for it. Needs --ray; grpo/rloo only."""

    def check_cluster(self) -> None:
        """ValueError for counts, resources or a placement outside their range."""
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if self.trainers < 1 or self.rollout_actors < 1 or self.reward_actors < 0:
            raise ValueError("trainers and rollout_actors must be at least 1, reward_actors "
                             "at least 0")
        if min(self.trainer_gpus, self.rollout_gpus, self.reward_gpus) < 0 \
                or self.actor_cpus <= 0:
            raise ValueError("GPU counts must be >= 0 and actor_cpus > 0")
        if self.placement == "colocate" and (self.rollout_gpus or self.reward_gpus):
            raise ValueError("with placement colocate the generation and reward actors share "
                             "the trainers' GPUs (--trainer-gpus); --rollout-gpus and "
                             "--reward-gpus are for placement split")
        if self.async_rollout and not self.ray:
            raise ValueError("async_rollout overlaps generation actors with the trainers: it "
                             "needs --ray")
        if self.max_restarts < 0 or self.actor_timeout < 1:
            raise ValueError("max_restarts must be >= 0 and actor_timeout >= 1")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass and its bases: the string statement right after
    each annotated field, whitespace folded to single spaces."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flag_help(cls: type, name: str) -> str:
    """``--help`` text of field ``name`` of dataclass ``cls``: its docstring, then its default
    (taken from the dataclass, so the two never disagree)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    doc = field_docs(cls)[name].replace("``", "`")  # reST literals read as plain quotes
    if field.default is dataclasses.MISSING or field.default is None:
        return doc
    shown = ("on" if field.default else "off") if isinstance(field.default, bool) \
        else field.default
    return f"{doc} Default: {shown}."
