"""``rewardloop data import | export | stats``: move preference data between files and the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rewardloop.cli._common import DB, resolve_db

ORDER = 20

_FORMATS_HELP = (
    "prompts, candidates, trl (pairwise), ranking, hh (HH-RLHF transcripts), ultrafeedback "
    "(rated completions), kto (unpaired labels); published data sets: arena (Chatbot Arena "
    "conversations), oasst (OpenAssistant message trees), shp (Stanford Human Preferences), "
    "saferlhf-better / saferlhf-safer (PKU-SafeRLHF, one label each)"
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
    file: Annotated[Path, typer.Argument(
        help="What to import: a JSONL, Parquet or Arrow file, a datasets.save_to_disk "
        "directory, or a Hub-style dataset folder (data/train-*.parquet).")],
    fmt: Annotated[str | None, typer.Option(
        "--format", help=f"Data format: {_FORMATS_HELP}. Default: detected from the keys of "
        "the first rows.")] = None,
    split: Annotated[str | None, typer.Option(
        "--split", help="The split to read from a dataset folder with several (train, test, "
        "...); also written DIR:SPLIT.")] = None,
    db: str | None = DB,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Put the imported comparison tasks in this batch (created if new).",
    )] = None,
) -> None:
    """Import a file in one transaction: all of it or, on any bad row, none of it.

    Rows already in the store, or repeated in the file, are skipped and counted, so importing
    the same file twice, or an export of the same store, adds nothing.
    """
    from rewardloop.data.formats import detect_format
    from rewardloop.data.store import Store
    from rewardloop.data.transfer import import_file

    if fmt is None:
        fmt = detect_format(file, split)
        typer.echo(f"detected format: {fmt} (pass --format to override)")
    store = Store(resolve_db(db))
    try:
        report = import_file(store, file, fmt, batch=batch, split=split)
    finally:
        store.dispose()
    typer.echo(f"read {report.records} {report.format} records from {file}")
    typer.echo(f"imported {report.imported}: {_counts(report.created)}")
    typer.echo(f"duplicates skipped: {report.duplicates}")
    for what in ("prompt ids or meta filled", "response models filled"):
        if report.created.get(what):  # stored without them before, given by this file
            typer.echo(f"{what}: {report.created[what]}")
    for reason, n in report.skipped.items():
        typer.echo(f"skipped {n} {reason}")


@data_app.command("export")
def export_(
    fmt: Annotated[str, typer.Option(
        "--format", help="Format to write: trl, ranking, hh, kto, prompts or candidates.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="File to write, replaced atomically if it exists: Parquet for "
        ".parquet, Arrow for .arrow, else JSONL.")] = None,
    hf_dataset: Annotated[Path | None, typer.Option(
        "--to-hf-dataset", help="Write a directory that datasets.load_from_disk loads, "
        "instead of a file.")] = None,
    db: str | None = DB,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Export only this batch's judgments (trl, ranking, hh).")] = None,
    dimension: Annotated[str | None, typer.Option(
        "--dimension", help="Export only judgments on this dimension (PKU-SafeRLHF: better or "
        "safer); needed when the store holds several.")] = None,
    ties: Annotated[bool, typer.Option(
        "--ties", help="trl only: write tied pairs too, marked tie: true (rewardloop's train rm "
        "uses them, train dpo drops them; TRL itself would read them as preferences, so they "
        "are left out by default).")] = False,
) -> None:
    """Write the store's feedback as a training file or dataset, oldest first."""
    from rewardloop.data.columnar import check_saved_dataset_target
    from rewardloop.data.store import Store, store_files
    from rewardloop.data.transfer import export
    from rewardloop.errors import UserError
    from rewardloop.util.files import check_output_file

    if (out is None) == (hf_dataset is None):
        raise UserError("give exactly one of -o FILE and --to-hf-dataset DIR")
    target = out if out is not None else hf_dataset
    assert target is not None
    # Where it will write, checked before the store is read: never over the store itself.
    url = resolve_db(db)
    if out is not None:
        check_output_file(out, flag="-o", inputs=store_files(url))
    else:
        check_saved_dataset_target(target)
    store = Store(url, existing=True)
    try:
        report = export(store, fmt, target, batch=batch, dimension=dimension,
                        hf_dataset=hf_dataset is not None, ties=ties)
    finally:
        store.dispose()
    typer.echo(f"wrote {report.rows} {fmt} rows to {target}")
    for reason, n in report.skipped.items():
        typer.echo(f"skipped {n} {reason}")
    if report.zero_margins:
        typer.echo(f"wrote margin 0 for {report.zero_margins} pairs with none of their own or "
                   "tied (other pairs have a margin; TRL's RewardTrainer then needs one in "
                   "every row)")


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

    store = Store(resolve_db(db), existing=True)
    try:
        result = stats(store)
    finally:
        store.dispose()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_stats(result)
