"""Parquet, Arrow and dataset folders through the store: import (all or nothing, even past the
first chunk), published shapes stored with their models, ties and dimensions, and a Parquet ->
store -> Parquet round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select

from rewardloop.data import schema as S
from rewardloop.data import transfer as T
from rewardloop.data.formats import PairRecord, RankingRecord, read_records
from rewardloop.data.load import load_pairs
from rewardloop.data.store import Store
from rewardloop.errors import DataError, UserError

HH = "\n\nHuman: question {i}\n\nAssistant:"


def parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 64) -> Path:
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path,
                   row_group_size=row_group_size)
    return path


def hh_rows(n: int) -> list[dict[str, Any]]:
    return [{"chosen": HH.format(i=i) + f" good {i}", "rejected": HH.format(i=i) + f" bad {i}"}
            for i in range(n)]


def count(store: Store, model: Any) -> int:
    with store.read() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def test_parquet_store_parquet_round_trip(store: Store, tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}", "annotator": "ann",
             "margin": float(i)} for i in range(1200)]  # more than two import chunks
    src = parquet(tmp_path / "in.parquet", rows)
    report = T.import_file(store, src)
    assert (report.format, report.records, report.imported, report.duplicates) == (
        "trl", 1200, 1200, 0)
    assert report.created == {"prompts": 1200, "responses": 2400, "tasks": 1200,
                              "judgments": 1200, "annotators": 1}
    again = T.import_file(store, src)
    assert (again.imported, again.duplicates) == (0, 1200)
    out = tmp_path / "out.parquet"
    assert T.export(store, "trl", out).rows == 1200
    assert pq.read_table(out).to_pylist() == rows
    assert read_records(out) == read_records(src)


def test_a_bad_row_in_a_later_chunk_imports_nothing(store: Store, tmp_path: Path) -> None:
    rows = hh_rows(1100)
    rows[1049] = {"chosen": HH.format(i=1) + " x", "rejected": "no turns at all"}
    path = parquet(tmp_path / "hh.parquet", rows)
    with pytest.raises(DataError, match="hh.parquet:row 1050 field 'rejected': has no "):
        T.import_file(store, path)
    for model in (S.Prompt, S.Response, S.ComparisonTask, S.Judgment, S.AuditEvent):
        assert count(store, model) == 0


def test_repeats_within_and_across_chunks_are_skipped(store: Store, tmp_path: Path) -> None:
    rows = hh_rows(700)
    rows += rows[:3] + rows[600:603]  # repeats of the first chunk and of the same (second) one
    report = T.import_file(store, parquet(tmp_path / "hh.parquet", rows))
    assert (report.imported, report.duplicates) == (700, 6)
    assert count(store, S.Judgment) == 700 and count(store, S.Response) == 1400


def test_arena_models_ties_and_both_bad_are_stored(store: Store, tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "hi"}]

    def battle(winner: str, qid: str) -> dict[str, Any]:
        return {"question_id": qid, "model_a": "m-a", "model_b": "m-b", "winner": winner,
                "judge": "voter", "conversation_a": [*conv, {"role": "assistant",
                                                              "content": f"A {qid}"}],
                "conversation_b": [*conv, {"role": "assistant", "content": f"B {qid}"}]}

    path = parquet(tmp_path / "arena.parquet", [battle("model_b", "1"), battle("tie", "2"),
                                                battle("tie (bothbad)", "3")])
    assert T.import_file(store, path).imported == 3
    with store.read() as s:
        models = dict(s.execute(select(S.Response.text, S.Response.model)).all())
        metas = [j.meta for j in s.scalars(select(S.Judgment).order_by(S.Judgment.id))]
    assert models == {"A 1": "m-a", "B 1": "m-b", "A 2": "m-a", "B 2": "m-b", "A 3": "m-a",
                      "B 3": "m-b"}
    assert metas == [{}, {}, {"both_bad": True}]
    pairs = load_pairs(store)
    assert [(p.chosen[-1]["content"], p.tie, p.both_bad, p.models) for p in pairs] == [
        ("B 1", False, False, ["m-b", "m-a"]), ("A 2", True, False, ["m-a", "m-b"]),
        ("A 3", True, True, ["m-a", "m-b"])]
    assert T.import_file(store, path).duplicates == 3


def test_saferlhf_dimensions_are_stored_apart_and_exported_by_choice(store: Store,
                                                                       tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i}", "response_0": f"r0 {i}", "response_1": f"r1 {i}",
             "better_response_id": 1, "safer_response_id": 1 - i % 2} for i in range(4)]
    path = parquet(tmp_path / "pku.parquet", rows)
    assert T.import_file(store, path).imported == 4
    # The same pairs on the other dimension are new judgments, not duplicates.
    assert T.import_file(store, path, "saferlhf-safer").imported == 4
    with pytest.raises(UserError, match="several dimensions \\(better, safer\\); choose one"):
        T.export(store, "trl", tmp_path / "x.jsonl")
    T.export(store, "trl", tmp_path / "safer.parquet", dimension="safer")
    safer = read_records(tmp_path / "safer.parquet")[1]
    assert [(r.chosen, r.dimension) for r in safer] == [
        ("r1 0", "safer"), ("r0 1", "safer"), ("r1 2", "safer"), ("r0 3", "safer")]
    with pytest.raises(UserError, match="--dimension helpful: no judgments on it"):
        T.export(store, "ranking", tmp_path / "x.jsonl", dimension="helpful")


def test_oasst_rankings_import_as_ranking_tasks(store: Store, tmp_path: Path) -> None:
    def msg(mid: str, parent: str | None, role: str, text: str,
            rank: float | None = None) -> dict[str, Any]:
        return {"message_id": mid, "parent_id": parent, "role": role, "text": text,
                "rank": rank, "message_tree_id": "t"}

    path = parquet(tmp_path / "oasst.parquet", [
        msg("r", None, "prompter", "q"), msg("a", "r", "assistant", "x", 1.0),
        msg("b", "r", "assistant", "y", 0.0), msg("c", "r", "assistant", "z", 2.0)])
    assert T.import_file(store, path).imported == 1
    T.export(store, "ranking", tmp_path / "out.jsonl")
    assert read_records(tmp_path / "out.jsonl")[1] == [
        RankingRecord([{"role": "user", "content": "q"}], ["y", "x", "z"], [[0], [1], [2]],
                      id="r")]


def test_hub_folder_split_and_hf_dataset_export(store: Store, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    parquet(hub / "data" / "train-00000-of-00001.parquet", hh_rows(5))
    parquet(hub / "data" / "test-00000-of-00001.parquet", hh_rows(8)[5:])
    assert T.import_file(store, hub, split="train").imported == 5
    report = T.export(store, "hh", tmp_path / "ds", hf_dataset=True)
    assert report.rows == 5
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded.to_list() == hh_rows(5)
    # An earlier export is replaced; a directory of other files is not touched.
    assert T.export(store, "hh", tmp_path / "ds", hf_dataset=True).rows == 5
    with pytest.raises(UserError, match="holds other files"):
        T.export(store, "hh", hub, hf_dataset=True)


def test_pair_record_fields_survive_jsonl(tmp_path: Path) -> None:
    from rewardloop.data.formats import write_records

    pair = PairRecord("p", "a", "b", tie=True, both_bad=True, models=["x", None],
                      dimension="safer")
    write_records(tmp_path / "x.jsonl", "trl", [pair])
    assert read_records(tmp_path / "x.jsonl")[1] == [pair]
