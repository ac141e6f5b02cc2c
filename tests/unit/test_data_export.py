"""Exports keep what the store holds (audit findings 2, 6, 7, 8): every field of a judgment in
``ranking`` (and ``trl``), ties on request, HH only for pairs HH can hold, and never over the
database being read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data import schema as S
from rewardloop.data import transfer as T
from rewardloop.data.formats import PairRecord, RankingRecord, read_records
from rewardloop.data.records import HH_NOT_HUMAN, HH_TURNS
from rewardloop.data.store import Store


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def arena(winner: str, a: str = "A", b: str = "B") -> dict[str, Any]:
    return {"model_a": "ma", "model_b": "mb", "winner": winner, "judge": "j",
            "conversation_a": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": a}],
            "conversation_b": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": b}]}


def test_human_judgment_fields_leave_the_store(sqlite_store: Store, tmp_path: Path) -> None:
    """A judgment given on the server (strength, rationale, time, shown order, guidelines)
    comes out in ranking and trl, and a ranking export imports back to the same judgment."""
    T.import_file(sqlite_store, jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Explain X", "responses": ["Good", "Bad"], "ranking": [[0], [1]],
         "annotator": "alice"}]))
    with sqlite_store.write() as s:
        items = s.scalars(select(S.TaskItem).order_by(S.TaskItem.position)).all()
        s.execute(update(S.Judgment).values(
            strength="strong", rationale="cites a source", time_ms=5200, guideline_version="v2",
            shown_order=[items[1].response_id, items[0].response_id]))
    T.export(sqlite_store, "ranking", tmp_path / "ranking.jsonl")
    (row,) = lines(tmp_path / "ranking.jsonl")
    assert row == {"prompt": "Explain X", "responses": ["Good", "Bad"], "ranking": [[0], [1]],
                   "annotator": "alice", "strength": "strong", "rationale": "cites a source",
                   "time_ms": 5200, "guideline_version": "v2", "shown_order": [1, 0]}
    T.export(sqlite_store, "trl", tmp_path / "trl.jsonl")
    assert lines(tmp_path / "trl.jsonl")[0]["strength"] == "strong"
    again = Store(f"sqlite:///{tmp_path / 'again.db'}")
    try:
        T.import_file(again, tmp_path / "ranking.jsonl")
        T.export(again, "ranking", tmp_path / "ranking2.jsonl")
    finally:
        again.dispose()
    assert lines(tmp_path / "ranking2.jsonl") == [row]
    # Importing it into the first store again finds the judgment already there.
    assert T.import_file(sqlite_store, tmp_path / "ranking.jsonl").duplicates == 1


def test_ties_both_bad_and_models_survive(sqlite_store: Store, tmp_path: Path) -> None:
    T.import_file(sqlite_store, jsonl(tmp_path / "a.jsonl", [
        arena("model_b"), arena("tie", "C", "D"), arena("tie (bothbad)", "E", "F")]))
    T.export(sqlite_store, "ranking", tmp_path / "ranking.jsonl")
    rows = lines(tmp_path / "ranking.jsonl")
    assert [r["ranking"] for r in rows] == [[[0], [1]], [[0, 1]], [[0, 1]]]
    assert [r.get("both_bad") for r in rows] == [None, None, True]
    assert rows[0]["models"] == ["mb", "ma"]
    report = T.export(sqlite_store, "trl", tmp_path / "trl.jsonl")
    assert report.rows == 1 and report.skipped == {T.SKIP_TIES: 2}
    report = T.export(sqlite_store, "trl", tmp_path / "ties.jsonl", ties=True)
    assert report.rows == 3 and not report.skipped
    _, pairs = read_records(tmp_path / "ties.jsonl")
    assert [(p.tie, p.both_bad, p.models) for p in pairs] == [
        (False, False, ["mb", "ma"]), (True, False, ["ma", "mb"]), (True, True, ["ma", "mb"])]


def test_dimension_stays_with_ranking_exports(sqlite_store: Store, tmp_path: Path) -> None:
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1,
           "safer_response_id": 0}
    path = jsonl(tmp_path / "pku.jsonl", [row])
    T.import_file(sqlite_store, path, "saferlhf-better")
    T.import_file(sqlite_store, path, "saferlhf-safer")
    T.export(sqlite_store, "ranking", tmp_path / "safer.jsonl", dimension="safer")
    (record,) = read_records(tmp_path / "safer.jsonl")[1]
    assert isinstance(record, RankingRecord) and record.dimension == "safer"
    assert T.import_file(sqlite_store, tmp_path / "safer.jsonl").duplicates == 1


def test_hh_export_leaves_out_and_counts_what_hh_cannot_hold(sqlite_store: Store,
                                                             tmp_path: Path) -> None:
    more = {"role": "user", "content": "More?"}
    multi = arena("model_b")
    multi["conversation_a"] += [more, {"role": "assistant", "content": "A2"}]
    multi["conversation_b"] += [more, {"role": "assistant", "content": "B2"}]
    system = {"prompt": [{"role": "system", "content": "Be terse."},
                         {"role": "user", "content": "Hi"}],
              "chosen": [{"role": "assistant", "content": "x"}],
              "rejected": [{"role": "assistant", "content": "y"}]}
    T.import_file(sqlite_store, jsonl(tmp_path / "a.jsonl", [multi]))
    T.import_file(sqlite_store, jsonl(tmp_path / "s.jsonl", [system]))
    T.import_file(sqlite_store, jsonl(tmp_path / "t.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"}]))
    report = T.export(sqlite_store, "hh", tmp_path / "hh.jsonl")
    assert report.rows == 1 and report.skipped == {HH_TURNS: 1, HH_NOT_HUMAN: 1}
    assert read_records(tmp_path / "hh.jsonl")[1] == [
        PairRecord("\n\nHuman: Q\n\nAssistant:", " good", " bad")]


# -- the command line --------------------------------------------------------------------------


def test_export_never_writes_over_the_database(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    runner = CliRunner()
    assert runner.invoke(app, ["data", "import", "p.jsonl", "--db", "sqlite:///store.db"]
                         ).exit_code == 0
    before = (tmp_path / "store.db").read_bytes()
    for target in ("store.db", str(tmp_path / "store.db")):
        result = runner.invoke(app, ["data", "export", "--format", "trl", "-o", target,
                                     "--db", "sqlite:///store.db"])
        assert result.exit_code == 2 and "would overwrite" in result.output
    assert (tmp_path / "store.db").read_bytes() == before
    result = runner.invoke(app, ["data", "stats", "--db", "sqlite:///store.db", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["counts"]["judgments"] == 1


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("these are my notes, not a database\n" * 10)
    result = CliRunner().invoke(app, ["data", "stats", "--db",
                                      f"sqlite:///{tmp_path / 'notes.db'}"])
    assert result.exit_code == 2 and "file is not a database" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_ties_flag_is_for_trl_only(sqlite_store: Store, tmp_path: Path) -> None:
    from rewardloop.errors import UserError

    with pytest.raises(UserError, match="--ties applies to trl exports"):
        T.export(sqlite_store, "ranking", tmp_path / "r.jsonl", ties=True)


@pytest.mark.parametrize("name", ["out.parquet", "out.arrow", "ds"])
def test_columnar_exports_are_fsynced_before_the_rename(tmp_path: Path, name: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit finding 14: the data file was renamed into place without an fsync."""
    import os

    from rewardloop.data import columnar
    from rewardloop.data.formats import write_dataset, write_records

    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = columnar._fsync_file, os.replace, Path.rename
    monkeypatch.setattr(columnar, "_fsync_file",
                        lambda p: (events.append(("fsync", str(p))), real_fsync(p))[1])
    monkeypatch.setattr(columnar.os, "replace",
                        lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    monkeypatch.setattr(Path, "rename",
                        lambda a, b: (events.append(("rename", str(a))), real_rename(a, b))[1])
    records = [PairRecord("p", "a", "b")]
    if name == "ds":
        write_dataset(tmp_path / name, "trl", records)
    else:
        write_records(tmp_path / name, "trl", records)
    renamed = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    synced = [p for kind, p in events[:renamed] if kind == "fsync"]
    assert synced and all(p.startswith(events[renamed][1]) for p in synced)
    assert read_records(tmp_path / name)[1] == records
