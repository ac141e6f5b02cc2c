"""Options shared by several commands, so each flag is spelled and explained once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer


def default_db() -> str:
    return os.environ.get("REWARDLOOP_DB", "sqlite:///rewardloop.db")


DB = typer.Option(
    None,
    "--db",
    help="Store URL (SQLAlchemy): sqlite:///FILE or postgresql+psycopg://USER:PASS@HOST/DB. "
    "Default: $REWARDLOOP_DB, else sqlite:///rewardloop.db.",
)
CONFIG = typer.Option(
    None, "--config", help="YAML file of config keys; flags given on the command line win."
)
def resolve_db(db: str | None) -> str:
    """The --db flag, else $REWARDLOOP_DB, else the default SQLite file."""
    return db or default_db()


def existing_file(path: Path) -> Path:
    from rewardloop.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


DATA_INPUTS = "a JSONL, Parquet or Arrow file, a datasets.save_to_disk dir or a Hub-style folder"


def existing_data(path: Path) -> Path:
    """``path`` if it names data rewardloop can read (a file, a saved dataset, a dataset
    folder, ``DIR:SPLIT``); else the UserError saying what is missing."""
    from rewardloop.data.sources import open_source

    open_source(path)
    return path


def headline_lines(summary: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``key: value`` lines of a loop summary's figures; the reward model's accuracy is shown
    beside its label ceiling, so a reader can tell a weak model from noisy labels."""
    lines = []
    for key in keys:
        value = summary.get(key)
        if value is None:
            continue
        line = f"{key}: {value:.3f}"
        ceiling = summary.get("rm_label_ceiling") if key == "rm_accuracy" else None
        if ceiling is not None:
            line += f" of a label ceiling of {ceiling:.3f}"
        lines.append(line)
    return lines
