"""``rewardloop train rm``: a reward model from pairwise or ranking preferences (its flags are
``RewardConfig``'s fields, cli/_flags.py)."""

from __future__ import annotations

import typer

from rewardloop.cli._flags import train_command
from rewardloop.cli._train_group import train_app
from rewardloop.cli.train_sft import show_summary
from rewardloop.train.configs import RewardConfig

ORDER = 42


def register(app: typer.Typer) -> None:
    train_app.command("rm")(train_command(
        RewardConfig, run_rm,
        doc="Train a reward model (Bradley-Terry on pairs, Plackett-Luce on rankings)."))


def run_rm(cfg: RewardConfig) -> None:
    from rewardloop.cli._common import preference_inputs
    from rewardloop.metrics import group_table
    from rewardloop.train.reward import train_rm  # imports torch: only when it runs

    stored = preference_inputs(cfg)
    summary = train_rm(cfg, stored)
    show_summary(summary, cfg.out, ("steps", "samples_per_s", "eval_accuracy", "eval_loss",
                                    "eval_ece", "length_correlation", "best_step",
                                    "best_eval_accuracy", "best_eval_loss", "label_ceiling"))
    if "groups" in summary:
        typer.echo(group_table(summary["groups"]))
