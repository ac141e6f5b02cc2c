"""``rewardloop tiny``: write a tiny random model + tokenizer for tests, benchmarks and the demo
(its flags are ``TinyConfig``'s fields, cli/_flags.py)."""

from __future__ import annotations

import typer

from rewardloop.cli._flags import config_command
from rewardloop.tiny import TinyConfig

ORDER = 40


def run_tiny(cfg: TinyConfig) -> None:
    from rewardloop.tiny import build_tiny

    path = build_tiny(
        cfg.out, cfg.texts, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, max_position=cfg.max_position,
        seed=cfg.seed, overwrite=cfg.overwrite,
    )
    typer.echo(f"wrote tiny model to {path}")


def register(app: typer.Typer) -> None:
    app.command("tiny")(config_command(
        TinyConfig, run_tiny, doc="Build a tiny random Llama-style model and a byte-level BPE "
        "tokenizer, offline."))
