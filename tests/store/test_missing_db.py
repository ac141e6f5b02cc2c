"""A command that reads the store refuses a SQLite path with no database behind it (exit 2,
nothing created), instead of reporting a new empty database as "nothing collected yet"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data.store import Store
from rewardloop.errors import UserError


@pytest.mark.parametrize("args", [
    ["data", "export", "--format", "trl", "-o", "{tmp}/e.jsonl"],
    ["data", "stats"],
    ["quality"],
    ["tasks", "progress"],
    ["users", "list"],
    ["users", "deactivate", "ann"],
    ["users", "token", "ann"],
    ["eval", "arena"],
])
def test_reading_a_database_that_is_not_there_is_exit_2(tmp_path: Path, args: list[str]) -> None:
    typo = tmp_path / "typo.db"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--db", f"sqlite:///{typo}"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"no database at {typo}" in result.output and "Traceback" not in result.output
    assert not typo.exists() and not (tmp_path / "e.jsonl").exists()


def test_commands_that_fill_a_database_still_create_it(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    Store(f"sqlite:///{db}").dispose()
    assert db.is_file()
    Store(f"sqlite:///{db}", existing=True).dispose()  # there now
    with pytest.raises(UserError, match="no database at"):
        Store(f"sqlite:///{tmp_path / 'other.db'}", existing=True)


def test_the_same_candidates_file_twice_makes_its_tasks_once(tmp_path: Path) -> None:
    """`tasks create` of a file the batch already holds skips its tasks (the annotators'
    work is not doubled) and says so; the gold rows likewise; a new batch makes them anew."""
    rows = [{"prompt": "p1", "responses": ["a", "b", "c"]},
            {"prompt": "p2", "responses": ["x", "y"]}]
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"prompt": "g", "responses": ["u", "v"], "ranking": [[0], [1]]}\n')
    db = ["--db", f"sqlite:///{tmp_path / 's.db'}"]
    first = CliRunner().invoke(app, ["tasks", "create", str(cands), "--gold", str(gold), *db])
    assert first.exit_code == 0 and "created 5 pairwise tasks (1 gold)" in first.output
    again = CliRunner().invoke(app, ["tasks", "create", str(cands), "--gold", str(gold), *db])
    assert again.exit_code == 0, again.output
    assert "created 0 pairwise tasks" in again.output and "skipped 5 comparisons" in again.output
    ranking = CliRunner().invoke(app, ["tasks", "create", str(cands), "--kind", "ranking", *db])
    assert "created 2 ranking tasks" in ranking.output  # another kind: other tasks
    other = CliRunner().invoke(app, ["tasks", "create", str(cands), "--batch", "round2", *db])
    assert "created 4 pairwise tasks" in other.output and "skipped" not in other.output
    progress = CliRunner().invoke(app, ["tasks", "progress", *db])
    assert progress.exit_code == 0
    from sqlalchemy import func, select

    from rewardloop.data.schema import ComparisonTask

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    with store.read() as session:
        assert session.scalar(select(func.count()).select_from(ComparisonTask)) == 5 + 2 + 4
    store.dispose()
