"""Option blocks shared by several commands' configs, and their documentation.

A command's config (one frozen dataclass) inherits the blocks it needs: model and tokenizer
(``ModelOptions``), optimisation (``OptimOptions``, and ``OfflineOptions`` for the trainers that
make passes over a dataset), run and checkpoint (``RunOptions``), LoRA (``LoraOptions``),
processes and precision (``RuntimeOptions``); generation is ``engines.options.EngineOptions``.
Each field is declared and documented once, in its block; a command changes only a default,
by declaring the field again without a docstring. The docstrings are the documentation:
``field_docs`` reads them for the command line's flags and ``--help`` (cli/_flags.py). Nothing
here imports torch, so the CLI can build its flags at start-up.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

STRATEGIES = ("auto", "ddp", "fsdp")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TIMEOUT_S = 90
SCHEDULES = ("linear", "cosine", "constant")
PLACEMENTS = ("split", "colocate")
WEIGHTINGS = ("none", "reliability")
GROUP_BALANCES = ("none", "equal", "minmax")
"""--group-balance of train rm and train dpo (train/group_balance.py)."""


def check_finite(config: object) -> None:
    """ValueError naming the first number of dataclass ``config`` that is NaN or infinite: no
    setting means anything there, and a range check such as ``lr <= 0`` is False for NaN."""
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name} must be a finite number, got {value}")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where a run writes, how it restarts and where its metrics go."""

    out: Path
    """Run directory to write: model/, config.yaml, metrics.jsonl, summary.json, checkpoints/."""
    seed: int = 0
    """Seed of initialisation, data order and sampling."""
    save_every: int = 0
    """Write a checkpoint every this many steps (and the model at the end; 0: only the final
    model)."""
    resume: bool = False
    """Continue from the latest complete checkpoint in --out."""
    overwrite: bool = False
    """Replace the rewardloop run in --out (only a run's own files; never other files, never
    an input of this run), once everything has loaded."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers that also get the metrics: tensorboard, wandb (offline without an
    API key), mlflow or trackio (docs/tracking.md)."""

    def check_run(self) -> None:
        if self.save_every < 0:
            raise ValueError("save_every must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """How the model and its tokenizer are loaded."""

    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), float32,
    bfloat16 or float16."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    add_pad_token: bool = False
    """Add a new pad token when the tokenizer has none (or pads with EOS)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (only for repositories you trust)."""
    chat_template: Path | None = None
    """Jinja chat-template file for a tokenizer without one (chat rows need one) or to replace
    its own; saved with the trained model."""


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """Low-rank adapters instead of full fine-tuning."""

    lora_r: int | None = None
    """Train LoRA adapters of this rank instead of all weights (the reference, where there is
    one, is the base model with the adapters off)."""
    lora_alpha: int = 32
    """LoRA scale alpha (the update is multiplied by alpha / r)."""
    merge_lora: bool = False
    """Save a merged plain model instead of the adapter at the end of a LoRA run."""

    def check_lora(self) -> None:
        if self.lora_r is not None:
            if self.lora_r < 1 or self.lora_alpha <= 0:
                raise ValueError("lora_r must be at least 1 and lora_alpha positive")
        elif self.merge_lora:
            raise ValueError("merge_lora needs lora_r")


@dataclass(frozen=True, kw_only=True)
class OptimOptions:
    """The optimizer (AdamW) and its learning rate."""

    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warm-up from 0."""
    max_grad_norm: float = 1.0
    """Clip the gradient to this global norm (0 turns clipping off)."""

    def check_optim(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("lr must be > 0; weight_decay and max_grad_norm >= 0")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")


@dataclass(frozen=True, kw_only=True)
class OfflineOptions(OptimOptions):
    """Passes over a dataset: steps, batches, lengths and the schedule (sft, rm, dpo)."""

    epochs: int = 1
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to take; None runs ``epochs`` passes."""
    batch_size: int = 16
    """Examples (rows, comparisons or pairs) per optimizer step, over all micro-batches and
    all processes (the global batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step in each process; processes x grad_accum must divide
    batch_size."""
    schedule: str = "linear"
    """After warm-up: linear or cosine (decay to 0 at the last step), or constant."""
    max_length: int = 512
    """Longest prompt + answer in tokens; longer answers are cut (and lose their EOS)."""
    max_prompt_length: int | None = None
    """Longest prompt in tokens, cut from the left; None: the prompt gives way to the answer,
    which keeps all of itself or, when longer, half of max_length."""
    log_every: int = 1
    """Log metrics every this many steps."""

    def check_offline(self) -> None:
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be at least 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of "
                             f"grad_accum ({self.grad_accum})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if self.max_length < 2 or (self.max_prompt_length is not None
                                   and not 1 <= self.max_prompt_length < self.max_length):
            raise ValueError("max_length >= 2 and 1 <= max_prompt_length < max_length required")
        if self.log_every < 1:
            raise ValueError("log_every must be at least 1")

    @property
    def micro_batch_size(self) -> int:
        """Examples per micro-batch over all processes."""
        return self.batch_size // self.grad_accum


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
    chunked_lm_head: bool = True
    """Compute token log-probs from the last hidden states a chunk of positions at a time,
    never holding the whole (tokens x vocabulary) logits, and project each chunk again in the
    backward pass (docs/distributed.md, "Memory"). Same numbers; --no-chunked-lm-head
    materialises the logits instead."""
    dist_timeout: int = DEFAULT_TIMEOUT_S
    """Seconds a process waits for the others in a training collective (and at start-up, for
    all to join) before it stops with an error: a dead or hung rank must not hang the run.
    Waits for rank 0's saves have their own, 30-minute limit."""

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
class BestPointOptions:
    """Held-out data and the best point: the options of the offline preference trainers (rm,
    dpo) that evaluate while training, keep the best checkpoint and stop early."""

    eval_fraction: float = 0.0
    """Without --eval-data: hold out this share of --data, split by prompt (and stratified by
    annotator group when groups are known); 0 holds out nothing."""
    eval_every: int = 0
    """Evaluate every this many steps, keep the checkpoint with the lowest eval loss and save
    it as model/ (0: evaluate once, at the end)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row without a lower eval loss (needs
    --eval-every)."""

    def check_best_point(self, eval_data: object) -> None:
        """ValueError for inconsistent options (called by each config's __post_init__ with its
        --eval-data, which excludes --eval-fraction)."""
        if math.isnan(self.eval_fraction) or not (
                self.eval_fraction == 0.0 or 0.0 < self.eval_fraction < 1.0):
            raise ValueError("eval_fraction must be 0 (off) or in (0, 1)")
        if eval_data is not None and self.eval_fraction > 0:
            raise ValueError("give --eval-data or --eval-fraction, not both")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.eval_every > 0 and eval_data is None and self.eval_fraction == 0:
            raise ValueError("--eval-every needs held-out data: --eval-data FILE or "
                             "--eval-fraction 0.1")
        if self.early_stopping_patience is not None and (
                self.early_stopping_patience < 1 or self.eval_every == 0):
            raise ValueError("--early-stopping-patience must be >= 1 and needs --eval-every")


@dataclass(frozen=True, kw_only=True)
class AnnotatorOptions:
    """Who judged the preferences: reliability weights, flagged annotators and annotator groups,
    from the store (--db) or from files (the options of the preference trainers, rm and dpo).
    The rows' ``annotator`` field names the annotator; rows without one weigh 1 and have no
    group."""

    db: str | None = None
    """Store URL to read annotator reliability, flags and groups from (the rows themselves come
    from --data, e.g. `rewardloop data export`)."""
    weighting: str = "none"
    """none, or reliability: weigh each row by its annotator's estimated reliability (from --db
    or --annotator-weights)."""
    annotator_weights: Path | None = None
    """JSON file {annotator: weight} used by weighting=reliability instead of the store."""
    exclude_flagged: bool = False
    """Drop the rows of annotators the quality checks flag, held-out rows included (needs
    --db)."""
    annotator_groups: Path | None = None
    """JSON file {annotator: [group, ...]}: the groups of the rows' annotators, for
    --group-balance and the per-group figures of the summary (with --db the store's groups are
    added)."""
    group_balance: str = "none"
    """none; equal: every annotator group carries the same total weight; minmax: group DRO
    (Ramesh et al. 2024), minimise the worst group's loss. A row counts for its annotator's
    first group."""
    group_step_size: float = 0.1
    """eta of --group-balance minmax: how fast weight moves to the group with the higher loss."""

    def check_annotators(self) -> None:
        """ValueError for inconsistent options."""
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}")
        if self.group_balance not in GROUP_BALANCES or not self.group_step_size > 0:
            raise ValueError(f"group_balance must be one of {list(GROUP_BALANCES)} and "
                             "group_step_size > 0")
        if self.weighting == "reliability" and self.db is None and self.annotator_weights is None:
            raise ValueError("weighting=reliability needs --db (the store's annotator "
                             "reliability) or --annotator-weights FILE.json")
        if self.exclude_flagged and self.db is None:
            raise ValueError("exclude_flagged needs --db (flags come from the store's judgments)")
        if self.group_balance != "none" and self.db is None and self.annotator_groups is None:
            raise ValueError("group_balance needs annotator groups: --db (the store's groups) or "
                             "--annotator-groups FILE.json")


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """Running on Ray (``--ray``; docs/cluster.md): what every command with ``--ray`` shares.
    Ignored unless ``ray`` is set."""

    ray: str | None = None
    """Run on Ray: local (start a Ray on this machine for the run; what --ray alone means),
    auto (the cluster this machine joined with `ray start`), HOST:PORT or ray://HOST:PORT.
    None: no Ray."""
    actor_cpus: float = 1.0
    """CPUs each Ray actor reserves."""
    actor_timeout: int = 600
    """Seconds to wait for one call to an actor before stopping with an error naming it (a
    hung actor must not hang the job)."""

    def check_ray(self) -> None:
        check_finite(self)
        if self.actor_cpus <= 0 or self.actor_timeout < 1:
            raise ValueError("actor_cpus must be > 0 and actor_timeout >= 1")


@dataclass(frozen=True, kw_only=True)
class RayJobOptions(RayOptions):
    """A batch job's rows dealt over Ray actors (``score --ray``, ``generate --ray``)."""

    actors: int = 1
    """With --ray: actors the rows are dealt over (each loads the model)."""
    actor_gpus: float = 0.0
    """With --ray: GPUs of each actor (0: CPU)."""

    def check_ray_job(self) -> None:
        self.check_ray()
        if self.actors < 1 or self.actor_gpus < 0:
            raise ValueError("actors must be at least 1 and actor_gpus >= 0")


@dataclass(frozen=True, kw_only=True)
class ClusterOptions(RayOptions):
    """Online RL on Ray (``--ray``): the actors of each role and the resources they take."""

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
    """GPUs of each trainer actor, at most 1: a rank drives one GPU (0: CPU). With colocate,
    the GPUs of each bundle, which its trainer shares with the generation and reward actors
    placed there. An actor given no GPU sees none (its device is the CPU)."""
    rollout_gpus: float = 0.0
    """GPUs of each generation actor (split placement)."""
    reward_gpus: float = 0.0
    """GPUs of each reward-model actor (split placement)."""
    reference_actors: int = 0
    """Actors holding the KL reference model and computing its log-probs (0: a frozen copy
    in each trainer). Not with LoRA, whose reference is the trainer's base with the adapters
    off."""
    reference_gpus: float = 0.0
    """GPUs of each reference actor (split placement)."""
    max_restarts: int = 0
    """When an actor dies: restart the whole run from its last good checkpoint, at most this
    many times (0: stop with a message naming the actor and the checkpoint)."""

    def check_cluster(self) -> None:
        """ValueError for counts, resources or a placement outside their range."""
        self.check_ray()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if self.trainers < 1 or self.rollout_actors < 1 or min(self.reward_actors,
                                                                  self.reference_actors) < 0:
            raise ValueError("trainers and rollout_actors must be at least 1, reward_actors "
                             "and reference_actors at least 0")
        if min(self.trainer_gpus, self.rollout_gpus, self.reward_gpus, self.reference_gpus) < 0:
            raise ValueError("GPU counts must be >= 0")
        if self.trainer_gpus > 1:
            raise ValueError("each trainer rank drives one GPU: trainer_gpus must be at most 1 "
                             "(more GPUs: more --trainers)")
        if self.placement == "colocate" and (self.rollout_gpus or self.reward_gpus
                                             or self.reference_gpus):
            raise ValueError("with placement colocate the generation, reward and reference "
                             "actors share the trainers' GPUs (--trainer-gpus); --rollout-gpus, "
                             "--reward-gpus and --reference-gpus are for placement split")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")


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


def flag_help(cls: type, name: str, default: object = dataclasses.MISSING) -> str:
    """``--help`` text of field ``name`` of dataclass ``cls``: its docstring, then its default
    (taken from the dataclass, so the two never disagree; ``default`` is a command's own,
    when it gives the flag another, as ``train rloo`` gives ``advantage``)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    doc = field_docs(cls)[name].replace("``", "`")  # reST literals read as plain quotes
    if default is dataclasses.MISSING:
        default = field.default
    if default is dataclasses.MISSING or default in (None, ()):
        return doc
    if isinstance(default, bool):
        shown = "on" if default else "off"
    else:  # an empty string would read as no default at all ("Default: .")
        shown = '""' if default == "" else str(default)
    return f"{doc} Default: {shown}."
