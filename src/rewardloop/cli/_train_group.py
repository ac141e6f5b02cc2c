"""The ``rewardloop train`` command group. Each algorithm's CLI module adds its subcommand here
(``train_app.command("sft")`` ...), and ``cli/train.py`` mounts the group on the main app."""

from __future__ import annotations

import typer

train_app = typer.Typer(
    help=(
        "Train a model; every run writes --out DIR: model/ (loadable by transformers), "
        "config.yaml, metrics.jsonl, summary.json, checkpoints/. Commands: sft (supervised), "
        "rm (reward model), dpo (DPO/IPO/cDPO/robust/KTO from preferences), grpo, rloo, ppo "
        "(online RL against a reward)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)
