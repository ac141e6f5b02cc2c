"""Parquet, Arrow and dataset folders through the real command line: `data import` (detected
format, --split, exit 2 and nothing imported on a bad row), `data export` to Parquet and to a
directory `datasets.load_from_disk` loads, and trainers and `generate` reading them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.synthetic import corpus_texts, preference_rows, prompt_rows, sft_rows
from rewardloop.tiny import build_tiny

ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]


def parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path, row_group_size=2)
    return path


def hub(path: Path, train: list[dict[str, Any]], test: list[dict[str, Any]]) -> Path:
    (path / "data").mkdir(parents=True)
    parquet(path / "data" / "train-00000-of-00001.parquet", train)
    parquet(path / "data" / "test-00000-of-00001.parquet", test)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, corpus_texts(200), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=128)


def counts(runner: CliRunner, db: str) -> dict[str, int]:
    return json.loads(runner.invoke(app, ["data", "stats", "--db", db, "--json"]).output)[
        "counts"]


def test_import_a_hub_split_and_export_parquet_and_hf_dataset(tmp_path: Path) -> None:
    runner, db = CliRunner(), f"sqlite:///{tmp_path / 'cli.db'}"
    folder = hub(tmp_path / "hub", ROWS[:4], ROWS[4:])
    res = runner.invoke(app, ["data", "import", str(folder), "--db", db])
    assert res.exit_code == 2 and "holds the splits test, train" in res.stderr
    res = runner.invoke(app, ["data", "import", str(folder), "--split", "train", "--db", db])
    assert res.exit_code == 0, res.output
    assert "detected format: trl" in res.output and "imported 4:" in res.output
    res = runner.invoke(app, ["data", "import", f"{folder}:test", "--db", db])
    assert res.exit_code == 0 and "imported 2:" in res.output

    out = tmp_path / "out.parquet"
    res = runner.invoke(app, ["data", "export", "--format", "trl", "-o", str(out), "--db", db])
    assert res.exit_code == 0 and f"wrote 6 trl rows to {out}" in res.output
    assert pq.read_table(out).to_pylist() == ROWS

    datasets = pytest.importorskip("datasets")
    res = runner.invoke(app, ["data", "export", "--format", "ranking", "--to-hf-dataset",
                              str(tmp_path / "ds"), "--db", db])
    assert res.exit_code == 0, res.output
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded[0] == {"prompt": "q0", "responses": ["good 0", "bad 0"],
                         "ranking": [[0], [1]]}
    res = runner.invoke(app, ["data", "export", "--format", "trl", "--db", db])
    assert res.exit_code == 2 and "exactly one of -o FILE and --to-hf-dataset" in res.stderr


def test_a_bad_parquet_row_is_exit_2_and_imports_nothing(tmp_path: Path) -> None:
    runner, db = CliRunner(), f"sqlite:///{tmp_path / 'cli.db'}"
    bad = parquet(tmp_path / "bad.parquet", [*ROWS, {"prompt": "p", "chosen": "x"}])
    res = runner.invoke(app, ["data", "import", str(bad), "--db", db])
    assert res.exit_code == 2
    assert "bad.parquet:row 7 field 'rejected': is missing" in res.stderr
    assert set(counts(runner, db).values()) == {0}


def test_trainers_read_parquet_folders_and_saved_datasets(tiny_dir: Path,
                                                          tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    runner = CliRunner()
    common = ["--model", str(tiny_dir), "--max-steps", "1", "--max-length", "48", "--device",
              "cpu", "--batch-size", "2"]
    prefs = hub(tmp_path / "prefs", preference_rows(4, seed=1), preference_rows(2, seed=2))
    res = runner.invoke(app, ["train", "rm", *common, "--data", f"{prefs}:train",
                              "--eval-data", f"{prefs}:test", "--out", str(tmp_path / "rm")])
    assert res.exit_code == 0, res.output
    arena = parquet(tmp_path / "arena.parquet", [
        {"model_a": "x", "model_b": "y", "winner": "model_a",
         "conversation_a": [{"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["chosen"]}],
         "conversation_b": [{"role": "user", "content": r["prompt"]},
                            {"role": "assistant", "content": r["rejected"]}]}
        for r in preference_rows(4, seed=3)])
    res = runner.invoke(app, ["train", "dpo", *common, "--data", str(arena),
                              "--out", str(tmp_path / "dpo")])
    assert res.exit_code == 0, res.output
    datasets.Dataset.from_list(sft_rows(4)).save_to_disk(str(tmp_path / "sft_ds"))
    res = runner.invoke(app, ["train", "sft", *common, "--data", str(tmp_path / "sft_ds"),
                              "--out", str(tmp_path / "sft")])
    assert res.exit_code == 0, res.output
    for run in ("rm", "dpo", "sft"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["steps"] == 1
    res = runner.invoke(app, ["train", "dpo", *common, "--data", f"{prefs}:dev",
                              "--out", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no split 'dev'" in res.output


def test_generate_reads_prompts_from_parquet(tiny_dir: Path, tmp_path: Path) -> None:
    prompts = parquet(tmp_path / "prompts.parquet", prompt_rows(2))
    res = CliRunner().invoke(app, [
        "generate", "--policy", str(tiny_dir), "--prompts", str(prompts), "-n", "2",
        "--max-new-tokens", "4", "--out", str(tmp_path / "cands.jsonl")])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "cands.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(json.loads(lines[0])["responses"]) == 2
