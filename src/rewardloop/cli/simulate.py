"""``rewardloop simulate``: let a pool of simulated annotators judge the open tasks."""

from __future__ import annotations

from pathlib import Path

import typer

from rewardloop.cli._common import DB, resolve_db
from rewardloop.errors import UserError

ORDER = 24


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def simulate(
    pool: Path = typer.Option(
        ..., "--pool", help="Pool YAML: the simulated annotators (see docs/quality.md)."
    ),
    gold: str = typer.Option(
        ..., "--gold",
        help="Gold function package.module:function with the TRL reward signature "
        "(prompts, completions, **kwargs) -> list of floats, or of dicts of named components.",
    ),
    db: str | None = DB,
    batch: str | None = typer.Option(
        None, "--batch", help="Only judge tasks of this batch. Default: any open task."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed for choices, display orders and times (same seed, same run)."
    ),
    max_judgments: int | None = typer.Option(
        None, "--max-judgments", help="Stop after this many judgments in total. Default: no limit."
    ),
) -> None:
    """Simulated annotators judge open tasks through the same service layer as the server."""
    from rewardloop.data.store import Store
    from rewardloop.feedback.simulate import load_pool
    from rewardloop.feedback.simulate import simulate as run_pool

    try:
        annotators = load_pool(pool)
        store = Store(resolve_db(db))
        try:
            summary = run_pool(store, annotators, gold, batch=batch, seed=seed,
                               max_judgments=max_judgments)
        finally:
            store.dispose()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    for name, n in summary.judgments.items():
        typer.echo(f"{name}\t{n}")
    typer.echo(f"total\t{summary.total}")
