"""``rewardloop train sft``: supervised fine-tuning on prompt/completion, chat or text rows.

Its flags are ``SFTConfig``'s fields (cli/_flags.py); ``show_summary`` is shared with the other
offline trainers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._flags import train_command
from rewardloop.cli._train_group import train_app
from rewardloop.train.configs import SFTConfig

ORDER = 41


def show_summary(summary: dict[str, Any], out: Path, keys: tuple[str, ...]) -> None:
    shown = ", ".join(f"{k} {summary[k]:.4g}" if isinstance(summary[k], float)
                      else f"{k} {summary[k]}" for k in keys if summary.get(k) is not None)
    typer.echo(f"wrote {out}/model ({shown})")


def run_sft(cfg: SFTConfig) -> None:
    from rewardloop.cli._common import existing_data
    from rewardloop.train.sft import train_sft  # imports torch: only when the command runs

    for path in (cfg.data, cfg.eval_data):
        if path is not None:
            existing_data(path)
    summary = train_sft(cfg)
    show_summary(summary, cfg.out, ("steps", "samples_per_s", "eval_loss", "eval_perplexity"))


def register(app: typer.Typer) -> None:
    train_app.command("sft")(train_command(
        SFTConfig, run_sft, doc="Supervised fine-tuning: cross-entropy on the completion tokens "
        "(or all tokens)."))
