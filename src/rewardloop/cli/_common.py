"""Options shared by several commands, so each flag is spelled and explained once."""

from __future__ import annotations

import os
from pathlib import Path

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
