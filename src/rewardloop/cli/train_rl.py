"""``rewardloop train grpo | rloo | ppo``: online RL against rewards (see docs/rl.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import CHAT_TEMPLATE, CONFIG, OUT, REPORT_TO, SEED, trackers
from rewardloop.cli._engine import (
    GENERATOR,
    IS_CAP,
    IS_LEVEL,
    VLLM_MAX_LEN,
    VLLM_MEMORY,
    VLLM_MODE,
    VLLM_SERVER,
    VLLM_SLEEP,
    VLLM_TP,
)
from rewardloop.cli._launch import (
    DIST_TIMEOUT,
    GRADIENT_CHECKPOINTING,
    NPROC,
    PRECISION,
    STRATEGY,
    runtime_flags,
)
from rewardloop.cli._ray import (
    ACTOR_CPUS,
    ACTOR_TIMEOUT,
    ASYNC_ROLLOUT,
    MAX_RESTARTS,
    PLACEMENT,
    RAY,
    REWARD_ACTORS,
    REWARD_GPUS,
    ROLLOUT_ACTORS,
    ROLLOUT_GPUS,
    SPREAD,
    TRAINER_GPUS,
    TRAINERS,
    run_on_ray,
)
from rewardloop.cli._train_group import train_app

ORDER = 41

# Options shared by every online-RL command, spelled and explained once.
POLICY = typer.Option(None, "--policy", help="Policy to train: model dir (e.g. an SFT run's "
                      "model/), LoRA adapter dir or hub id. Required (flag or config).")
PROMPTS = typer.Option(None, "--prompts", help="Prompts (JSONL, Parquet, Arrow or a dataset "
                       "folder, DIR:SPLIT for a split): `prompt` (text or chat) or "
                       "`messages` per line; `meta` keys are passed to reward functions.")
REWARD = typer.Option(None, "--reward", help="Reward SPEC[@WEIGHT], repeatable: a reward-model "
                      "run dir (or its model/), normalised by its reward_stats.json, or "
                      "package.module:function with TRL's signature. Weighted rewards are summed.")
BATCH = typer.Option(None, "--batch-size", help="Completions sampled per step (prompts per step "
                     "x --num-generations). Default 16.")
MINI = typer.Option(None, "--mini-batch-size", help="Completions per optimizer update; each step "
                    "does ppo-epochs x batch/mini updates. Default: --batch-size.")
MICRO = typer.Option(None, "--micro-batch-size", help="Completions per forward/backward pass "
                     "(gradient accumulation, same result). Default: --mini-batch-size.")
EPOCHS = typer.Option(None, "--ppo-epochs", help="Passes over each step's samples (TRL's "
                      "num_iterations). Default 1 (grpo/rloo), 4 (ppo).")
STEPS = typer.Option(None, "--max-steps", help="Steps to run; each samples --batch-size "
                     "completions. Default 100.")
LR = typer.Option(None, "--lr", help="AdamW learning rate. Default 1e-6 (policy).")
WD = typer.Option(None, "--weight-decay", help="AdamW weight decay. Default 0.")
WARMUP = typer.Option(None, "--warmup-steps", help="Optimizer updates of linear LR warm-up.")
GRAD = typer.Option(None, "--max-grad-norm", help="Clip the gradient norm (0 = off). Default 1.")
MAX_PROMPT = typer.Option(None, "--max-prompt-length", help="Keep the last N prompt tokens. "
                          "Default 512.")
MAX_NEW = typer.Option(None, "--max-new-tokens", help="Longest completion in tokens; longer "
                       "ones are cut and count as missing EOS. Default 64.")
TEMP = typer.Option(None, "--temperature", help="Sampling temperature; log-probs use the same. "
                    "Default 1.")
TOP_P = typer.Option(None, "--top-p", help="Nucleus sampling threshold. Default 1 (off).")
TOP_K = typer.Option(None, "--top-k", help="Top-k sampling (0 = off). Default 0.")
KL_COEF = typer.Option(None, "--kl-coef", help="KL penalty coefficient beta (0 = no reference "
                       "model). Default 0.04 (grpo/rloo), 0.05 (ppo).")
KL_EST = typer.Option(None, "--kl-estimator", help="k1 (log-ratio), k2 (squared/2) or k3 "
                      "(GRPO's). Default: the method's (grpo k3; rloo, reinforce++, ppo k1).")
KL_IN = typer.Option(None, "--kl-in", help="Put the KL penalty in the `reward` or the `loss`. "
                     "Default: the method's (grpo loss; the others reward; ppo reward only).")
KL_TARGET = typer.Option(None, "--kl-target", help="Adaptive KL controller: target KL per "
                         "sequence (k1, summed); kl-coef is its starting value. Default off.")
KL_HORIZON = typer.Option(None, "--kl-horizon", help="Adaptive KL horizon in completions. "
                          "Default 10000.")
CLIP = typer.Option(None, "--clip-eps", help="PPO clip range epsilon. Default 0.2.")
CLIP_HIGH = typer.Option(None, "--clip-eps-high", help="Upper clip range (DAPO clip-higher). "
                         "Default: --clip-eps.")
DUAL = typer.Option(None, "--dual-clip", help="Dual-clip constant c > 1 bounding the loss of "
                    "negative-advantage tokens. Default off.")
ENT = typer.Option(None, "--entropy-coef", help="Entropy bonus coefficient (entropy is logged "
                   "anyway). Default 0.")
AGG = typer.Option(None, "--loss-aggregation", help="token-mean (global token count), "
                   "seq-mean-token-mean, seq-mean-token-sum or seq-mean-token-sum-norm. "
                   "Default token-mean.")
RCLIP = typer.Option(None, "--reward-clip", help="Clip the weighted reward to [-c, c]. "
                     "Default off.")
EOS_PEN = typer.Option(None, "--missing-eos-penalty", help="Subtract this from the reward of "
                       "completions that never end (cut at --max-new-tokens). Default 0.")
RBATCH = typer.Option(None, "--reward-batch-size", help="Completions per reward-model forward "
                      "pass. Default 16.")
GOLD = typer.Option(None, "--gold", help="package.module:function scored on every sample and "
                    "logged as gold/mean, never optimised (watch the proxy/gold gap).")
LORA_R = typer.Option(None, "--lora-r", help="Train LoRA adapters of this rank (the reference "
                      "is the base with adapters off). Default: full fine-tuning.")
LORA_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA alpha. Default 32.")
MERGE = typer.Option(None, "--merge-lora/--no-merge-lora", help="Save the policy with LoRA "
                     "adapters merged into the weights.")
PAD = typer.Option(None, "--add-pad-token/--no-add-pad-token", help="Add a pad token when the "
                   "tokenizer has none or uses EOS as pad.")
DTYPE = typer.Option(None, "--dtype", help="auto, float32, bfloat16 or float16. Default auto.")
DEVICE = typer.Option(None, "--device", help="auto, cpu or cuda. Default auto.")
REMOTE = typer.Option(None, "--trust-remote-code/--no-trust-remote-code", help="Run the model "
                      "repository's own code. Default off.")
SAVE = typer.Option(None, "--save-every", help="Checkpoint every N steps (and at the end). "
                    "Default 50.")
SAMPLE = typer.Option(None, "--sample-every", help="Write sample completions to samples.jsonl "
                      "every N steps (0 = never). Default 10.")
NSAMPLES = typer.Option(None, "--num-samples", help="Completions written per sample step. "
                        "Default 4.")
RESUME = typer.Option(None, "--resume/--no-resume", help="Continue the run in --out from its "
                      "latest checkpoint.")
OVERWRITE = typer.Option(None, "--overwrite/--no-overwrite", help="Delete the run in --out "
                         "first.")


def _run(kind: str, cfg_cls: Any, config: Path | None, flags: dict[str, Any]) -> None:
    from rewardloop.config import load_config

    rewards = flags.pop("reward")
    flags.update(runtime_flags(*(flags.pop(k) for k in (
        "strategy", "precision", "gradient_checkpointing", "dist_timeout", "nproc"))))
    flags["rewards"] = tuple(rewards) if rewards else None
    flags["report_to"] = trackers(flags["report_to"])
    cfg = load_config(cfg_cls, config, **flags)
    # Each trainer imports torch: only the one asked for is loaded.
    if cfg.ray:
        summary = run_on_ray("ppo" if kind == "ppo" else "grpo", cfg)
    elif kind == "ppo":
        from rewardloop.train.ppo import train as train_ppo

        summary = train_ppo(cfg)
    else:
        from rewardloop.train.grpo import train as train_grpo

        summary = train_grpo(cfg)
    shown = ", ".join(f"{k} {summary[k]:.4g}" for k in ("reward_first", "reward_last",
                                                          "kl_k1_last", "samples_per_s")
                      if isinstance(summary.get(k), float))
    typer.echo(f"{kind}: {summary['steps']} steps in {summary['wall_s']:.1f}s ({shown}); "
               f"model saved to {cfg.out / 'model'}")


def _group_command(default_advantage: str) -> Any:
    def command(
        out: Path = OUT, policy: str | None = POLICY, prompts: Path | None = PROMPTS,
        reward: list[str] | None = REWARD,
        advantage: str = typer.Option(
            default_advantage, "--advantage",
            help="Advantage estimator: grpo (group mean, / std), rloo (leave-one-out mean) or "
            "reinforce++ (globally whitened returns; works with --num-generations 1)."),
        num_generations: int | None = typer.Option(
            None, "--num-generations", help="Completions per prompt (group size; >= 2 for "
            "grpo/rloo). Default 4."),
        scale_rewards: bool | None = typer.Option(
            None, "--scale-rewards/--no-scale-rewards", help="GRPO: divide by the group's "
            "reward std (--no-scale-rewards = Dr. GRPO). Default on."),
        gamma: float | None = typer.Option(None, "--gamma", help="REINFORCE++ discount. "
                                           "Default 1."),
        batch_size: int | None = BATCH, mini_batch_size: int | None = MINI,
        micro_batch_size: int | None = MICRO, ppo_epochs: int | None = EPOCHS,
        max_steps: int | None = STEPS, lr: float | None = LR, weight_decay: float | None = WD,
        warmup_steps: int | None = WARMUP, max_grad_norm: float | None = GRAD,
        max_prompt_length: int | None = MAX_PROMPT, max_new_tokens: int | None = MAX_NEW,
        temperature: float | None = TEMP, top_p: float | None = TOP_P,
        top_k: int | None = TOP_K, kl_coef: float | None = KL_COEF,
        kl_estimator: str | None = KL_EST, kl_in: str | None = KL_IN,
        kl_target: float | None = KL_TARGET, kl_horizon: int | None = KL_HORIZON,
        clip_eps: float | None = CLIP, clip_eps_high: float | None = CLIP_HIGH,
        dual_clip: float | None = DUAL, entropy_coef: float | None = ENT,
        loss_aggregation: str | None = AGG, reward_clip: float | None = RCLIP,
        missing_eos_penalty: float | None = EOS_PEN, reward_batch_size: int | None = RBATCH,
        gold: str | None = GOLD, lora_r: int | None = LORA_R,
        lora_alpha: int | None = LORA_ALPHA, merge_lora: bool | None = MERGE,
        add_pad_token: bool | None = PAD, dtype: str | None = DTYPE,
        device: str | None = DEVICE, trust_remote_code: bool | None = REMOTE,
        seed: int | None = SEED, save_every: int | None = SAVE,
        sample_every: int | None = SAMPLE, num_samples: int | None = NSAMPLES,
        resume: bool | None = RESUME, overwrite: bool | None = OVERWRITE,
        chat_template: Path | None = CHAT_TEMPLATE,
        report_to: list[str] | None = REPORT_TO,
        strategy: str | None = STRATEGY, precision: str | None = PRECISION,
        gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
        dist_timeout: int | None = DIST_TIMEOUT, nproc: int | None = NPROC,
        generator: str | None = GENERATOR, vllm_mode: str | None = VLLM_MODE,
        vllm_gpu_memory_utilization: float | None = VLLM_MEMORY,
        vllm_tensor_parallel_size: int | None = VLLM_TP, vllm_sleep: bool | None = VLLM_SLEEP,
        vllm_server: str | None = VLLM_SERVER, vllm_max_model_len: int | None = VLLM_MAX_LEN,
        is_level: str | None = IS_LEVEL, is_cap: float | None = IS_CAP,
        ray: str | None = RAY, trainers: int | None = TRAINERS,
        rollout_actors: int | None = ROLLOUT_ACTORS, reward_actors: int | None = REWARD_ACTORS,
        placement: str | None = PLACEMENT, spread: bool | None = SPREAD,
        trainer_gpus: float | None = TRAINER_GPUS, rollout_gpus: float | None = ROLLOUT_GPUS,
        reward_gpus: float | None = REWARD_GPUS, actor_cpus: float | None = ACTOR_CPUS,
        max_restarts: int | None = MAX_RESTARTS, actor_timeout: int | None = ACTOR_TIMEOUT,
        async_rollout: bool | None = ASYNC_ROLLOUT, config: Path | None = CONFIG,
    ) -> None:
        flags = dict(locals())
        flags.pop("config")
        from rewardloop.train.grpo import GRPOConfig

        _run(flags["advantage"], GRPOConfig, config, flags)

    return command


_GRPO_HELP = (
    "Online RL without a critic: sample --num-generations completions per prompt, score them "
    "with --reward, and push up completions that beat their group. GRPO by default; "
    "--advantage rloo or reinforce++ picks the baseline. Writes --out (model/, metrics.jsonl, "
    "samples.jsonl, summary.json, checkpoints/). See docs/rl.md."
)
_RLOO_HELP = ("RLOO: `train grpo --advantage rloo` (leave-one-out baseline, k1 KL in the "
              "reward). See docs/rl.md.")


def ppo(
    out: Path = OUT, policy: str | None = POLICY, prompts: Path | None = PROMPTS,
    reward: list[str] | None = REWARD,
    value_model: str | None = typer.Option(
        None, "--value-model", help="Where the critic starts: a reward-model run/model dir "
        "(recommended) or, by default, the policy's weights with a fresh scalar head."),
    value_lr: float | None = typer.Option(None, "--value-lr", help="Value model learning "
                                          "rate. Default: --lr."),
    vf_coef: float | None = typer.Option(None, "--vf-coef", help="Value loss weight. "
                                         "Default 0.1."),
    value_clip: float | None = typer.Option(None, "--value-clip", help="Clip value updates to "
                                            "+-this around rollout-time values. Default 0.2."),
    gamma: float | None = typer.Option(None, "--gamma", help="GAE discount. Default 1."),
    lam: float | None = typer.Option(None, "--lam", help="GAE lambda. Default 0.95."),
    whiten_advantages: bool | None = typer.Option(
        None, "--whiten-advantages/--no-whiten-advantages", help="Whiten advantages over the "
        "batch's real tokens. Default on."),
    num_generations: int | None = typer.Option(None, "--num-generations", help="Completions "
                                               "per prompt. Default 1."),
    batch_size: int | None = BATCH, mini_batch_size: int | None = MINI,
    micro_batch_size: int | None = MICRO, ppo_epochs: int | None = EPOCHS,
    max_steps: int | None = STEPS, lr: float | None = LR, weight_decay: float | None = WD,
    warmup_steps: int | None = WARMUP, max_grad_norm: float | None = GRAD,
    max_prompt_length: int | None = MAX_PROMPT, max_new_tokens: int | None = MAX_NEW,
    temperature: float | None = TEMP, top_p: float | None = TOP_P, top_k: int | None = TOP_K,
    kl_coef: float | None = KL_COEF, kl_estimator: str | None = KL_EST,
    kl_target: float | None = KL_TARGET, kl_horizon: int | None = KL_HORIZON,
    clip_eps: float | None = CLIP, clip_eps_high: float | None = CLIP_HIGH,
    dual_clip: float | None = DUAL, entropy_coef: float | None = ENT,
    loss_aggregation: str | None = AGG, reward_clip: float | None = RCLIP,
    missing_eos_penalty: float | None = EOS_PEN, reward_batch_size: int | None = RBATCH,
    gold: str | None = GOLD, lora_r: int | None = LORA_R, lora_alpha: int | None = LORA_ALPHA,
    merge_lora: bool | None = MERGE, add_pad_token: bool | None = PAD,
    dtype: str | None = DTYPE, device: str | None = DEVICE,
    trust_remote_code: bool | None = REMOTE, seed: int | None = SEED,
    save_every: int | None = SAVE, sample_every: int | None = SAMPLE,
    num_samples: int | None = NSAMPLES, resume: bool | None = RESUME,
    overwrite: bool | None = OVERWRITE, chat_template: Path | None = CHAT_TEMPLATE,
    report_to: list[str] | None = REPORT_TO, strategy: str | None = STRATEGY,
    precision: str | None = PRECISION, gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
    dist_timeout: int | None = DIST_TIMEOUT, nproc: int | None = NPROC,
    generator: str | None = GENERATOR, vllm_mode: str | None = VLLM_MODE,
    vllm_gpu_memory_utilization: float | None = VLLM_MEMORY,
    vllm_tensor_parallel_size: int | None = VLLM_TP, vllm_sleep: bool | None = VLLM_SLEEP,
    vllm_server: str | None = VLLM_SERVER, vllm_max_model_len: int | None = VLLM_MAX_LEN,
    is_level: str | None = IS_LEVEL, is_cap: float | None = IS_CAP,
    ray: str | None = RAY, trainers: int | None = TRAINERS,
    rollout_actors: int | None = ROLLOUT_ACTORS, reward_actors: int | None = REWARD_ACTORS,
    placement: str | None = PLACEMENT, spread: bool | None = SPREAD,
    trainer_gpus: float | None = TRAINER_GPUS, rollout_gpus: float | None = ROLLOUT_GPUS,
    reward_gpus: float | None = REWARD_GPUS, actor_cpus: float | None = ACTOR_CPUS,
    max_restarts: int | None = MAX_RESTARTS, actor_timeout: int | None = ACTOR_TIMEOUT,
    config: Path | None = CONFIG,
) -> None:
    """PPO with a critic: per-token KL (k1) in the reward, the score on the last real token,
    GAE advantages from a separate value model, clipped policy and value losses. Writes --out
    (model/, value_model/, metrics.jsonl, samples.jsonl, summary.json, checkpoints/)."""
    flags = dict(locals())
    flags.pop("config")
    from rewardloop.train.ppo import PPOConfig

    _run("ppo", PPOConfig, config, flags)


def register(app: typer.Typer) -> None:
    train_app.command("grpo", help=_GRPO_HELP)(_group_command("grpo"))
    train_app.command("rloo", help=_RLOO_HELP)(_group_command("rloo"))
    train_app.command("ppo")(ppo)
