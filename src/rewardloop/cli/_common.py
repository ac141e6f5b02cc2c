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


def input_file(path: Path, flag: str | None = None) -> Path:
    """``path`` if it is a file, else the UserError naming ``flag`` (a directory, no file)."""
    from rewardloop.errors import UserError

    name = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UserError(f"{name} is a directory; give a file")
    if not path.is_file():
        raise UserError(f"{name}: no such file")
    return path


def read_text_file(path: Path, flag: str) -> str:
    """The text of the UTF-8 file ``path`` given to ``flag`` (a leading BOM dropped); a
    UserError naming the flag for a directory, a missing file or bytes that are not UTF-8."""
    from rewardloop.errors import UserError

    data = input_file(path, flag).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise UserError(f"{flag} {path}:line {line}: not UTF-8 text (bad byte at column "
                        f"{column}); save it as UTF-8") from None


DATA_INPUTS = "a JSONL, Parquet or Arrow file, a datasets.save_to_disk dir or a Hub-style folder"


def existing_data(path: Path) -> Path:
    """``path`` if it names data rewardloop can read (a file, a saved dataset, a dataset
    folder, ``DIR:SPLIT``); else the UserError saying what is missing."""
    from rewardloop.data.sources import open_source

    open_source(path)
    return path


def preference_inputs(cfg: Any) -> Any:
    """Check a preference trainer's input files (``--data``, ``--eval-data``, the annotator
    weight and group files) before anything loads, and read what the store knows about the
    annotators when ``--db`` is given (``feedback.quality.annotators_from_db``; the trainers do
    not open the store): train rm and train dpo."""
    from rewardloop.feedback.quality import annotators_from_db

    for path in (cfg.data, cfg.eval_data):
        if path is not None:
            existing_data(path)
    for path in (cfg.annotator_weights, cfg.annotator_groups):
        if path is not None:
            input_file(path)
    if cfg.db is None:
        return None
    return annotators_from_db(cfg.db, weights=cfg.weighting == "reliability",
                              flagged=cfg.exclude_flagged)


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


# Off a terminal rich assumes 80 columns and cuts what does not fit to "…"; a pipe or a file has
# no width, so tables there are as wide as their widest cells.
UNCUT_WIDTH = 10_000


def table_console() -> Any:
    """A rich Console for tables: the terminal's width on a terminal; elsewhere (a pipe, a
    file, CI) wide enough that every figure is printed in full."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=UNCUT_WIDTH)
