"""``rewardloop train dpo``: DPO, cDPO, IPO, robust DPO and KTO straight from preference files
(its flags are ``DPOConfig``'s fields, cli/_flags.py)."""

from __future__ import annotations

import typer

from rewardloop.cli._flags import train_command
from rewardloop.cli._train_group import train_app
from rewardloop.train.configs import DPOConfig

ORDER = 45


def register(app: typer.Typer) -> None:
    train_app.command("dpo")(train_command(
        DPOConfig, run_dpo, doc="Optimise a policy directly on preferences (no reward model): "
        "DPO and its variants."))


def run_dpo(cfg: DPOConfig) -> None:
    from rewardloop.cli._common import preference_inputs
    from rewardloop.metrics import group_table
    from rewardloop.train.dpo import train_dpo  # imports torch: only when it runs

    stored = preference_inputs(cfg)
    summary = train_dpo(cfg, stored)
    line = f"trained {summary['steps']} steps ({cfg.loss}) in {summary['wall_s']:.1f}s"
    if "eval_accuracy" in summary:
        line += f"; eval_loss {summary['eval_loss']:.4f}, eval_accuracy " \
                f"{summary['eval_accuracy']:.3f}"
    if "best_step" in summary:
        line += f"; best step {summary['best_step']} (eval_loss " \
                f"{summary['best_eval_loss']:.4f}, saved as the model)"
    typer.echo(f"{line}; model in {cfg.out / 'model'}")
    if "groups" in summary:
        typer.echo(group_table(summary["groups"]))
