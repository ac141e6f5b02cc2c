"""``rewardloop data import | export | stats``: move preference data between files and the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rewardloop.cli._common import DB, existing_file, resolve_db

ORDER = 20

_FORMATS_HELP = (
    "prompts, candidates, trl (pairwise), ranking, hh (HH-RLHF transcripts), ultrafeedback "
    "(rated completions), kto (unpaired labels)"
)

data_app = typer.Typer(
    name="data",
    help="Import feedback files into the store, export it in training formats, show statistics.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")


def _counts(counter: dict[str, int]) -> str:
    order = ("prompts", "responses", "tasks", "judgments", "ratings", "annotators", "batches")
    parts = [f"{counter[k]} {k}" for k in order if counter.get(k)]
    return ", ".join(parts) if parts else "nothing new"


@data_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="JSONL file to import (one JSON object a line).")],
    fmt: Annotated[str | None, typer.Option(
        "--format", help=f"File format: {_FORMATS_HELP}. Default: detected from the keys of "
        "the first rows.")] = None,
    db: str | None = DB,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Put the imported comparison tasks in this batch (created if new).",
    )] = None,
) -> None:
    """Import a file in one transaction: all of it or, on any bad row, none of it.

    Rows already in the store, or repeated in the file, are skipped and counted, so importing
    the same file twice adds nothing.
    """
    from rewardloop.data.formats import detect_format
    from rewardloop.data.store import Store
    from rewardloop.data.transfer import import_file

    existing_file(file)
    if fmt is None:
        fmt = detect_format(file)
        typer.echo(f"detected format: {fmt} (pass --format to override)")
    store = Store(resolve_db(db))
    try:
        report = import_file(store, file, fmt, batch=batch)
    finally:
        store.dispose()
    typer.echo(f"read {report.records} {report.format} records from {file}")
    typer.echo(f"imported {report.imported}: {_counts(report.created)}")
    typer.echo(f"duplicates skipped: {report.duplicates}")
    for reason, n in report.skipped.items():
        typer.echo(f"skipped {n} {reason}")


@data_app.command("export")
def export_(
    fmt: Annotated[str, typer.Option(
        "--format", help="Format to write: trl, ranking, hh, kto, prompts or candidates.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="JSONL file to write (replaced atomically if it exists).")],
    db: str | None = DB,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Export only this batch's judgments (trl, ranking, hh).")] = None,
) -> None:
    """Write the store's feedback as a training file, oldest first."""
    from rewardloop.data.store import Store
    from rewardloop.data.transfer import export

    store = Store(resolve_db(db))
    try:
        report = export(store, fmt, out, batch=batch)
    finally:
        store.dispose()
    typer.echo(f"wrote {report.rows} {fmt} rows to {out}")
    for reason, n in report.skipped.items():
        typer.echo(f"skipped {n} {reason}")


def _print_stats(result: dict[str, Any]) -> None:
    typer.echo("counts:")
    for name, n in result["counts"].items():
        typer.echo(f"  {name:<12} {n}")
    if result["judgments_by_source"]:
        by_source = ", ".join(f"{k} {v}" for k, v in result["judgments_by_source"].items())
        typer.echo(f"judgments by source: {by_source}")
    if result["annotators"]:
        typer.echo("per annotator (judgments / ratings):")
        for name, row in result["annotators"].items():
            typer.echo(f"  {name:<24} {row['judgments']:>8} / {row['ratings']}")
    lengths = result["response_length"]
    if lengths.get("n"):
        typer.echo("response length: " + ", ".join(
            f"{k} {v:.1f}" for k, v in lengths.items() if k != "n"))
    tie_rate = result["tie_rate"]
    typer.echo(f"tie rate: {'n/a' if tie_rate is None else f'{tie_rate:.1%}'}")


@data_app.command("stats")
def stats_(
    db: str | None = DB,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the statistics as one JSON object instead of text.")] = False,
) -> None:
    """Counts, per-annotator totals, response lengths and the tie rate of the store."""
    from rewardloop.data.store import Store
    from rewardloop.data.transfer import stats

    store = Store(resolve_db(db))
    try:
        result = stats(store)
    finally:
        store.dispose()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_stats(result)
