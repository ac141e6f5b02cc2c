"""``rewardloop tiny``: write a tiny random model + tokenizer for tests, benchmarks and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rewardloop.cli._common import CONFIG

ORDER = 40


def register(app: typer.Typer) -> None:
    app.command("tiny")(tiny)


def tiny(
    out: Annotated[
        Path, typer.Option("--out", help="Directory to write the model and tokenizer to.")
    ],
    texts: Annotated[Path | None, typer.Option(
        "--texts",
        help="JSONL (prompt/text/chosen/rejected/... fields) or plain-text file to train the "
        "tokenizer on. Default: a built-in corpus of customer-support sentences.",
    )] = None,
    vocab_size: int | None = typer.Option(
        None, "--vocab-size", help="Target tokenizer vocabulary size (>= 300). Default 1024."
    ),
    hidden: int | None = typer.Option(None, "--hidden", help="Model width. Default 64."),
    layers: int | None = typer.Option(None, "--layers", help="Transformer blocks. Default 2."),
    heads: int | None = typer.Option(None, "--heads", help="Attention heads. Default 4."),
    max_position: int | None = typer.Option(
        None, "--max-position", help="Longest sequence in tokens. Default 512."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for the corpus and the weights (same seed, same files)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing model directory at --out."
    ),
    config: Path | None = CONFIG,
) -> None:
    """Build a tiny random Llama-style model and a byte-level BPE tokenizer, offline."""
    from rewardloop.config import load_config
    from rewardloop.tiny import TinyConfig, build_tiny

    cfg = load_config(
        TinyConfig, config, out=out, texts=texts, vocab_size=vocab_size, hidden_size=hidden,
        num_layers=layers, num_heads=heads, max_position=max_position, seed=seed,
        overwrite=overwrite or None,
    )
    path = build_tiny(
        cfg.out, cfg.texts, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, max_position=cfg.max_position,
        seed=cfg.seed, overwrite=cfg.overwrite,
    )
    typer.echo(f"wrote tiny model to {path}")
