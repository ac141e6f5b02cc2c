"""``rewardloop train grpo | rloo | ppo``: online RL against rewards (see docs/rl.md). Their
flags are ``GRPOConfig``'s and ``PPOConfig``'s fields (cli/_flags.py)."""

from __future__ import annotations

from typing import Any

import typer

from rewardloop.cli._flags import train_command
from rewardloop.cli._ray import run_on_ray
from rewardloop.cli._train_group import train_app
from rewardloop.train.configs import GRPOConfig, OnlineOptions, PPOConfig

ORDER = 41

_GRPO_HELP = (
    "Online RL without a critic: sample --num-generations completions per prompt, score them "
    "with --reward, and push up completions that beat their group. GRPO by default; "
    "--advantage rloo or reinforce++ picks the baseline. Writes --out (model/, metrics.jsonl, "
    "samples.jsonl, summary.json, checkpoints/). See docs/rl.md."
)
_RLOO_HELP = ("RLOO: `train grpo --advantage rloo` (leave-one-out baseline, k1 KL in the "
              "reward). See docs/rl.md.")
_PPO_HELP = (
    "PPO with a critic: per-token KL (k1) in the reward, the score on the last real token, GAE "
    "advantages from a separate value model, clipped policy and value losses. Writes --out "
    "(model/, value_model/, metrics.jsonl, samples.jsonl, summary.json, checkpoints/)."
)


def run_rl(cfg: OnlineOptions) -> None:
    # Each trainer imports torch: only the one asked for is loaded, when the command runs.
    summary: dict[str, Any]
    if cfg.ray:  # the same trainer, in Ray actors (rewardloop.cluster)
        ppo = isinstance(cfg, PPOConfig)
        kind = "ppo" if ppo else cfg.advantage  # type: ignore[attr-defined]
        summary = run_on_ray("ppo" if ppo else "grpo", cfg)
    elif isinstance(cfg, PPOConfig):
        from rewardloop.train.ppo import train as train_ppo

        kind, summary = "ppo", train_ppo(cfg)
    else:
        from rewardloop.train.grpo import train as train_grpo

        assert isinstance(cfg, GRPOConfig)
        kind, summary = cfg.advantage, train_grpo(cfg)
    shown = ", ".join(f"{k} {summary[k]:.4g}" for k in ("reward_first", "reward_last",
                                                          "kl_k1_last", "samples_per_s")
                      if isinstance(summary.get(k), float))
    typer.echo(f"{kind}: {summary['steps']} steps in {summary['wall_s']:.1f}s ({shown}); "
               f"model saved to {cfg.out / 'model'}")


def register(app: typer.Typer) -> None:
    train_app.command("grpo")(train_command(GRPOConfig, run_rl, doc=_GRPO_HELP))
    # rloo is grpo with another estimator: given here, --advantage still wins.
    train_app.command("rloo")(train_command(GRPOConfig, run_rl, doc=_RLOO_HELP,
                                            cli_defaults={"advantage": "rloo"}))
    train_app.command("ppo")(train_command(PPOConfig, run_rl, doc=_PPO_HELP))
