"""The trainers' configs: each command's frozen dataclass, composed from the shared option
blocks of ``rewardloop.options`` (and ``OnlineOptions`` here for the online RL commands).

A field is declared and documented once; a config that wants another default declares the
field again without a docstring. Nothing here imports torch: the command line reads these
classes at start-up to make its flags (cli/_flags.py). The checks that need a trainer's own
tables (KL estimators, loss aggregations) import them when a config is built, which happens
only when a command runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rewardloop.engines.options import EngineOptions
from rewardloop.options import (
    AnnotatorOptions,
    BestPointOptions,
    ClusterOptions,
    LoraOptions,
    ModelOptions,
    OfflineOptions,
    OptimOptions,
    RunOptions,
    RuntimeOptions,
    check_finite,
)

PAIRWISE_FORMATS = ("trl", "hh", "ultrafeedback")
RANKING_FORMATS = ("ranking",)
UNPAIRED_FORMATS = ("kto",)
DPO_LOSSES = ("dpo", "cdpo", "ipo", "robust", "kto", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
ADVANTAGE_NAMES = ("grpo", "rloo", "reinforce++")
GROUP_METHODS = ("grpo", "rloo")
# Each method's paper default: where the KL penalty goes and how it is estimated.
KL_DEFAULTS = {"grpo": ("loss", "k3"), "rloo": ("reward", "k1"), "reinforce++": ("reward", "k1"),
               "ppo": ("reward", "k1")}


def _check_blocks(cfg: object) -> None:
    """Run the checks of every option block ``cfg`` is made of, after refusing NaN and
    infinity in any of its numbers."""
    check_finite(cfg)
    for block, check in ((RuntimeOptions, "check_runtime"), (RunOptions, "check_run"),
                         (LoraOptions, "check_lora"), (OfflineOptions, "check_offline"),
                         (OptimOptions, "check_optim"), (ClusterOptions, "check_cluster")):
        if isinstance(cfg, block):
            getattr(cfg, check)()
    if isinstance(cfg, BestPointOptions):
        cfg.check_best_point(getattr(cfg, "eval_data", None))
    if isinstance(cfg, AnnotatorOptions):
        cfg.check_annotators()


# ---------------------------------------------------------------------------------------------
# Offline trainers: sft, rm, dpo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SFTConfig(RuntimeOptions, ModelOptions, LoraOptions, OfflineOptions, RunOptions):
    """Options of ``rewardloop train sft``."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "model": ("--model", "--policy")}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    model: str
    """Causal LM to start from: a local model directory (e.g. from `rewardloop tiny`) or a hub
    id."""
    data: Path
    """Training rows in the sft format: prompt + completion, messages, or text (JSONL, Parquet,
    Arrow or a dataset folder, DIR:SPLIT for a split)."""
    eval_data: Path | None = None
    """Held-out sft rows: eval loss and perplexity on their target tokens (summary.json)."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (default: only the completion and its EOS)."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens (isolated by position_ids);
    batch_size then counts packed rows."""
    eval_batch_size: int = 32
    """Items per no-grad evaluation batch."""
    eval_every: int = 0
    """Evaluate on eval_data every this many steps (0: only at the end)."""
    lr: float = 2e-5

    def __post_init__(self) -> None:
        _check_blocks(self)
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be at least 1")
        if self.eval_every < 0:
            raise ValueError("eval_every must be >= 0")
        if self.eval_every > 0 and self.eval_data is None:
            raise ValueError("--eval-every needs held-out rows: --eval-data FILE")


@dataclass(frozen=True, kw_only=True)
class RewardConfig(RuntimeOptions, ModelOptions, LoraOptions, OfflineOptions, RunOptions,
                   BestPointOptions, AnnotatorOptions):
    """Options of ``rewardloop train rm``."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "model": ("--model", "--policy"), "data_format": "--format"}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    model: str
    """A causal LM (a fresh scalar head is added) or an existing reward model (dir or hub id)."""
    data: Path
    """Training preferences (JSONL, Parquet, Arrow or a dataset folder, DIR:SPLIT for a split):
    pairwise rows (prompt, chosen, rejected; hh and ultrafeedback are converted) or ranking
    rows."""
    eval_data: Path | None = None
    """Held-out preferences: accuracy, loss, calibration, per-annotator accuracy, length bias."""
    data_format: str | None = None
    """Format of --data/--eval-data (trl, hh, ultrafeedback, ranking); None detects it from the
    rows."""
    use_margin: bool = False
    """Bradley–Terry with the rows' ``margin``: chosen must win by at least that (Llama 2)."""
    label_smoothing: float = 0.0
    """ε: the target probability that chosen wins is 1 - ε (pairwise data only)."""
    center_rewards_coef: float = 0.0
    """Weight of the auxiliary loss mean((Σ rewards of a comparison)²) keeping rewards near 0
    (0.01 is typical)."""
    ensemble: int = 1
    """Number of reward heads on one shared trunk; > 1 gives a mean reward and its std
    (uncertainty)."""
    group_heads: bool = False
    """One reward head per annotator group on the shared body, each trained on its group's
    judgments: the heads' spread shows where groups disagree; --reward RM@group=w,... mixes
    them (unweighted, the reward is their mean)."""
    eval_batch_size: int = 32
    """Comparisons per no-grad evaluation batch."""
    length_debias: bool = False
    """ODIN (Chen et al. 2024): train an extra head that tracks answer length beside the reward
    heads, keep the reward heads uncorrelated with length, and drop the length head when the
    model is saved."""
    length_debias_coef: float = 0.1
    """Weight of ODIN's correlation and orthogonality terms (with --length-debias); 1.0 starved
    the reward head in our length-bias test (docs/reward-models.md)."""
    lr: float = 1e-4

    def __post_init__(self) -> None:
        _check_blocks(self)
        if self.data_format is not None and self.data_format not in (
                PAIRWISE_FORMATS + RANKING_FORMATS):
            raise ValueError(f"data_format must be one of "
                             f"{list(PAIRWISE_FORMATS + RANKING_FORMATS)}")
        if not 0.0 <= self.label_smoothing < 0.5 or self.center_rewards_coef < 0:
            raise ValueError("label_smoothing must be in [0, 0.5) and center_rewards_coef >= 0")
        if self.ensemble < 1:
            raise ValueError("ensemble must be at least 1")
        if self.eval_batch_size < 1:
            raise ValueError("eval_batch_size must be at least 1")
        if self.length_debias and (self.lora_r is not None or self.length_debias_coef < 0
                                   or self.group_heads or self.group_balance != "none"):
            raise ValueError("length_debias needs full fine-tuning (no --lora-r), "
                             "length_debias_coef >= 0, and no --group-heads or --group-balance")
        if self.group_heads and (self.ensemble > 1 or self.group_balance != "none"):
            raise ValueError("group_heads trains one head per group: it takes no --ensemble "
                             "and no --group-balance")
        if self.lora_r is not None and (self.ensemble > 1 or self.group_heads) \
                and not self.merge_lora:
            raise ValueError("an ensemble trained with LoRA must be saved merged: add "
                             "--merge-lora")


@dataclass(frozen=True, kw_only=True)
class DPOConfig(RuntimeOptions, ModelOptions, LoraOptions, OfflineOptions, RunOptions,
                BestPointOptions, AnnotatorOptions):
    """Options of ``rewardloop train dpo``."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "model": ("--model", "--policy"), "data_format": "--format",
        "precompute_ref": "--ref-cached/--ref-on-the-fly"}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    model: str
    """Policy to start from: a local model directory or a hub id (also the default reference)."""
    data: Path
    """Training preferences (JSONL, Parquet, Arrow or a dataset folder, DIR:SPLIT for a split):
    pairwise rows (trl, hh, ultrafeedback) or, for KTO, kto rows."""
    loss: str = "dpo"
    """dpo (sigmoid), cdpo (DPO with label smoothing), ipo, robust (unbiased under label flips),
    kto (unpaired rows); or, with no reference model, simpo (length-normalised margin) or orpo
    (odds ratio + the chosen answers' NLL)."""
    beta: float = 0.1
    """β: the strength of the pull toward the reference (IPO's τ); smaller moves further. simpo:
    the reward scale (its paper uses 2 to 2.5); orpo: λ, the weight of the odds-ratio term."""
    simpo_gamma: float = 0.5
    """simpo's γ: the target margin between the chosen and rejected rewards β·(mean log-prob)."""
    label_smoothing: float = 0.0
    """ε, the assumed rate of flipped labels: cdpo needs 0 < ε < 0.5, robust 0 <= ε < 0.5; dpo
    with ε > 0 is cdpo; ipo and kto take none."""
    length_normalize: bool | None = None
    """Use the mean log-prob per completion token instead of the sum. None: on for ipo (its
    authors' choice, as in TRL: the target margin 1/(2β) is per token); off for the others.
    simpo and orpo always use it (they are defined on it)."""
    nll_coef: float = 0.0
    """RPO (Pang et al. 2024): add this times the token-mean NLL of the chosen answers."""
    desirable_weight: float = 1.0
    """KTO λ_D: weight of desirable examples."""
    undesirable_weight: float = 1.0
    """KTO λ_U: weight of undesirable examples."""
    ref_model: str | None = None
    """Reference model; None uses the initial policy (with LoRA: the adapter disabled)."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training and cache them (no reference model in
    memory while training); off (--ref-on-the-fly) scores the reference every step."""
    data_format: str | None = None
    """Format of --data/--eval-data (trl, hh, ultrafeedback, kto); None detects it from the
    rows."""
    eval_data: Path | None = None
    """Held-out preferences (same kind as --data) for eval loss and implicit-reward accuracy."""
    ref_batch_size: int = 32
    """Examples per batch of the reference (and evaluation) no-grad passes."""
    batch_size: int = 8
    lr: float = 1e-6

    @property
    def mean_logps(self) -> bool:
        """Whether sequences score by their mean per-token log-prob: always for simpo and orpo
        (defined on it: SimPO eq. 4, ORPO eq. 2; a saved ``length_normalize: false`` of another
        loss does not stop them), else ``length_normalize``, whose None means on for ipo only.
        The field itself is kept as given, so a saved config.yaml reused with another --loss
        gets that loss's default."""
        if self.loss in REFERENCE_FREE_LOSSES:
            return True
        if self.length_normalize is None:
            return self.loss == "ipo"
        return self.length_normalize

    def __post_init__(self) -> None:  # noqa: C901 (one independent check per field)
        _check_blocks(self)
        if self.loss not in DPO_LOSSES:
            raise ValueError(f"loss must be one of {list(DPO_LOSSES)}, got {self.loss!r}")
        if self.beta <= 0:
            raise ValueError("beta must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5)")
        if self.loss == "cdpo" and self.label_smoothing == 0.0:
            raise ValueError("cdpo needs --label-smoothing in (0, 0.5), e.g. 0.1")
        if self.loss in ("ipo", "kto", "orpo") and self.label_smoothing != 0.0:
            raise ValueError(f"{self.loss} has no label smoothing; leave it at 0")
        if self.loss == "orpo" and self.nll_coef != 0.0:
            raise ValueError("orpo already adds the chosen answers' NLL (its SFT term, weight "
                             "1); leave nll_coef at 0")
        if self.loss in REFERENCE_FREE_LOSSES:
            if self.ref_model is not None or not self.precompute_ref:
                raise ValueError(f"{self.loss} uses no reference model: drop --ref-model and "
                                 "--ref-on-the-fly")
        if self.simpo_gamma < 0:
            raise ValueError("simpo_gamma must be >= 0")
        if self.nll_coef < 0:
            raise ValueError("nll_coef must be >= 0")
        if self.loss == "kto" and self.nll_coef != 0.0:
            raise ValueError("nll_coef (RPO) applies to chosen answers of pairwise losses, "
                             "not kto")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be > 0")
        if self.ref_batch_size < 1:
            raise ValueError("ref_batch_size must be at least 1")
        if self.loss == "kto" and (self.group_balance != "none"
                                   or self.weighting != "none"):
            raise ValueError("group_balance and weighting weigh pairs: they need a pairwise "
                             "loss, not kto")
        if self.data_format is not None and self.data_format not in (
                PAIRWISE_FORMATS + UNPAIRED_FORMATS):
            raise ValueError(f"data_format must be one of "
                             f"{list(PAIRWISE_FORMATS + UNPAIRED_FORMATS)}")


# ---------------------------------------------------------------------------------------------
# Online RL: grpo, rloo, ppo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OnlineOptions(RuntimeOptions, EngineOptions, ModelOptions, LoraOptions, OptimOptions,
                    RunOptions, ClusterOptions):
    """What every online-RL command shares: the policy, its prompts and rewards, sampling, the
    KL leash, the clipped policy loss, samples written along the way."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "policy": ("--policy", "--model"), "rewards": "--reward"}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    policy: str
    """Policy to train: a model directory (e.g. an SFT run's model/), a LoRA adapter dir or a
    hub id."""
    prompts: Path
    """Prompts (JSONL, Parquet, Arrow or a dataset folder, DIR:SPLIT for a split): ``prompt``
    (text or chat) or ``messages`` per row; ``meta`` keys are passed to reward functions."""
    rewards: tuple[str, ...] = ()
    """Rewards, SPEC[@WEIGHT] each: a reward-model run dir (or its model/),
    normalised by its reward_stats.json, or package.module:function with TRL's signature.
    Weighted rewards are summed."""
    num_generations: int = 4
    """Completions sampled per prompt (the group size; at least 2 for grpo/rloo)."""
    batch_size: int = 16
    """Completions per step (prompts per step x num_generations), over all processes: each
    generates for its share of the step's prompts (a prompt's group stays on one process)."""
    mini_batch_size: int = 0
    """Completions per optimizer update, over all processes; 0: batch_size (one update per
    epoch)."""
    micro_batch_size: int = 0
    """Completions per forward/backward pass in each process (gradient accumulation, same
    result); 0: the process's share of mini_batch_size."""
    ppo_epochs: int = 1
    """Passes over each step's batch (TRL's num_iterations; > 1 reuses samples, clipped)."""
    max_steps: int = 100
    """Steps to run (each samples batch_size completions)."""
    max_prompt_length: int = 512
    """Prompts longer than this (tokens) keep their last tokens."""
    max_new_tokens: int = 64
    """Longest completion (tokens); longer ones are cut and count as missing EOS."""
    temperature: float = 1.0
    """Sampling temperature; log-probs use the same one."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    kl_coef: float = 0.04
    """KL penalty coefficient beta (0 = no reference model, no KL)."""
    kl_estimator: str = "auto"
    """k1 (log-ratio), k2 (squared/2) or k3 (GRPO's); auto: the method's default (grpo k3;
    rloo, reinforce++ and ppo k1)."""
    kl_in: str = "auto"
    """Where the KL penalty goes: reward or loss; auto: the method's default (grpo loss, or
    reward with kl_estimator k1; rloo and reinforce++ reward; ppo reward only)."""
    kl_target: float | None = None
    """Adaptive KL: target KL per sequence (k1, summed over tokens), kl_coef its starting value
    (> 0: the controller scales it); None = fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL horizon in completions (Ziegler et al. 2019)."""
    gamma: float = 1.0
    """Discount factor (REINFORCE++ returns, PPO's GAE)."""
    clip_eps: float = 0.2
    """PPO clip range epsilon (lower side)."""
    clip_eps_high: float | None = None
    """Upper clip range (DAPO clip-higher); None = clip_eps."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None = off."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (entropy is logged either way)."""
    loss_aggregation: str = "token-mean"
    """token-mean (global token count), seq-mean-token-mean, seq-mean-token-sum or
    seq-mean-token-sum-norm."""
    reward_clip: float | None = None
    """Clip the weighted reward to [-c, c]; None = no clipping."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of completions that never end (cut at max_new_tokens)."""
    reward_uncertainty_penalty: float = 0.0
    """λ: a reward-model ensemble (train rm --ensemble K) gives mean - λ x std across its heads
    (uncertainty-weighted optimisation, Coste et al. 2023): answers the heads disagree on,
    where the model is guessing, earn less. 0 uses the mean."""
    reward_batch_size: int = 16
    """Completions per reward-model forward pass."""
    gold: str | None = None
    """Optional ``package.module:function`` scored on every sample but never optimised (a gold
    judge to watch the proxy/gold gap), logged as gold/mean."""
    is_level: str = "token"
    """Correction of samples from another engine (vllm): token (truncated importance sampling),
    sequence (drop sequences whose ratio exceeds is_cap) or off."""
    is_cap: float = 2.0
    """Cap C of the trainer/sampler importance ratio (per token, or per sequence)."""
    sample_every: int = 10
    """Write sample completions to samples.jsonl every this many steps (0 = never)."""
    num_samples: int = 4
    """Completions written per sampling step."""
    lr: float = 1e-6
    save_every: int = 50

    def check_online(self) -> None:
        """The checks every online config shares, after its method's defaults are filled in."""
        # The trainers' own tables, imported when a config is built (a command runs), not when
        # the CLI reads this module for its flags: they load torch.
        from rewardloop.ops import AGGREGATIONS, KL_ESTIMATORS
        from rewardloop.pg_losses import IS_LEVELS

        if not self.rewards:
            raise ValueError("give at least one reward (--reward SPEC[@WEIGHT])")
        _check_blocks(self)
        EngineOptions.of(self)  # validates the generator options
        self._check_sizes()
        self._check_sampling()
        self._check_coefs()
        if self.kl_in not in ("reward", "loss"):
            raise ValueError(f"kl_in must be reward or loss, got {self.kl_in!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}")
        if self.loss_aggregation not in AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {sorted(AGGREGATIONS)}")
        if self.is_level not in IS_LEVELS:
            raise ValueError(f"is_level must be one of {', '.join(IS_LEVELS)}")

    def _check_coefs(self) -> None:
        """The ranges of the KL leash, the clipped loss and the reward's shaping."""
        positive = [("clip_eps", self.clip_eps), ("clip_eps_high", self.clip_eps_high),
                    ("kl_target", self.kl_target), ("reward_clip", self.reward_clip),
                    ("is_cap", self.is_cap)]
        for name, value in positive:
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        non_negative = ("kl_coef", "missing_eos_penalty", "sample_every", "num_samples",
                        "reward_uncertainty_penalty", "entropy_coef")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("kl_target adapts kl_coef multiplicatively from its starting "
                             "value, which is 0: give the starting coefficient (--kl-coef > 0)")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError("dual_clip must be > 1")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError("gamma must be in (0, 1]")

    def _check_sampling(self) -> None:
        """The ranges ``engines.SamplingSettings`` accepts, checked here so that a wrong flag
        stops the command before a model loads."""
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    def _check_sizes(self) -> None:
        positive = ("batch_size", "max_steps", "ppo_epochs", "max_new_tokens",
                    "max_prompt_length", "save_every", "kl_horizon", "reward_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        mini, micro = self.mini_batch_size, self.micro_batch_size
        if mini < 1 or micro < 1:
            raise ValueError("mini_batch_size and micro_batch_size must be at least 1")
        if self.batch_size % mini:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of "
                             f"mini_batch_size {mini}")
        if mini % micro:
            raise ValueError(f"mini_batch_size {mini} must be a multiple of "
                             f"micro_batch_size {micro}")
        if self.num_generations < 1 or self.batch_size % self.num_generations:
            raise ValueError(f"batch_size {self.batch_size} (completions per step) must be a "
                             f"multiple of num_generations {self.num_generations}")

    def fill_default(self, name: str, value: object) -> None:
        """Set a field left unset (auto, 0 or None) to the method's default,
        in ``__post_init__``: a built config holds the values the run uses."""
        if getattr(self, name) in (None, "auto", 0):
            object.__setattr__(self, name, value)

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations


@dataclass(frozen=True, kw_only=True)
class GRPOConfig(OnlineOptions):
    """Options of ``rewardloop train grpo`` / ``rloo`` (``rloo`` sets ``advantage="rloo"``)."""

    advantage: str = "grpo"
    """Advantage estimator: grpo (group mean, / std), rloo (leave-one-out mean) or
    reinforce++ (globally whitened returns; works with num_generations 1)."""
    scale_rewards: bool = True
    """GRPO: divide group-centred rewards by the group std (off = Dr. GRPO)."""
    mask_truncated: bool = False
    """Leave completions cut at max_new_tokens (no EOS) out of the loss (DAPO's overlong
    filtering; TRL's mask_truncated_completions): a run-on answer is neither rewarded nor
    punished as if it had ended. They still count for their group's baseline; see also
    --missing-eos-penalty."""
    async_rollout: bool = False
    """One-step off-policy: the generation actors sample step t+1 with the weights from
    before step t's update while the trainers run that update. The samples' staleness (in
    optimizer steps) is logged, and the importance weights (--is-level, --is-cap) correct
    for it. Needs --ray."""

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGE_NAMES:
            raise ValueError(f"advantage must be one of {list(ADVANTAGE_NAMES)}, "
                             f"got {self.advantage!r}")
        kl_in, estimator = KL_DEFAULTS[self.advantage]
        if self.kl_in == "auto" and self.kl_estimator == "k1":
            kl_in = "reward"  # k1's principled place; in the loss its gradient averages to 0
        self.fill_default("kl_in", kl_in)
        self.fill_default("kl_estimator", estimator)
        self.fill_default("mini_batch_size", self.batch_size)
        self.fill_default("micro_batch_size", self.mini_batch_size)
        self.check_online()
        if self.advantage in GROUP_METHODS and self.num_generations < 2:
            raise ValueError(f"{self.advantage} needs num_generations >= 2: with one completion "
                             "per prompt the group baseline equals the reward and every "
                             "advantage is 0")
        if self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ValueError("k1 in the loss has zero expected gradient (the KL leash would do "
                             "nothing on average): put it in the reward (--kl-in reward) or use "
                             "--kl-estimator k2 or k3 in the loss")
        if self.async_rollout and not self.ray:
            raise ValueError("async_rollout overlaps generation actors with the trainers: it "
                             "needs --ray")


@dataclass(frozen=True, kw_only=True)
class PPOConfig(OnlineOptions):
    """Options of ``rewardloop train ppo``."""

    value_model: str | None = None
    """Where the critic starts: a reward-model run/model dir (recommended) or None = the
    policy's weights with a fresh scalar head."""
    value_lr: float = 0.0
    """Value model learning rate; 0: lr."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Whiten advantages over the real tokens of the batch (masked)."""
    value_clip: float | None = 0.2
    """Clip the value update to +-this around the rollout-time values; None = no clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    num_generations: int = 1
    ppo_epochs: int = 4
    kl_coef: float = 0.05

    def __post_init__(self) -> None:
        kl_in, estimator = KL_DEFAULTS["ppo"]
        self.fill_default("kl_in", kl_in)
        self.fill_default("kl_estimator", estimator)
        self.fill_default("mini_batch_size", self.batch_size)
        self.fill_default("micro_batch_size", self.mini_batch_size)
        self.fill_default("value_lr", self.lr)
        self.check_online()
        if self.kl_in != "reward":
            raise ValueError("ppo puts the KL penalty in the per-token reward (kl_in=reward)")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError("lam in [0, 1] required (the GAE lambda)")
        if self.vf_coef <= 0 or self.value_lr <= 0:
            raise ValueError("vf_coef and value_lr must be > 0")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError("value_clip must be > 0")
