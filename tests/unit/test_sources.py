"""Every input kind reads to the same records as JSONL, and bad rows in each name file, row
and field: Parquet, Arrow (file and stream format), datasets.save_to_disk directories (one
dataset and a DatasetDict, written by the real `datasets` package) and Hub-style folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardloop.data import formats as F
from rewardloop.data import sources
from rewardloop.data.formats import PairRecord
from rewardloop.errors import DataError, UserError

CHAT = [{"role": "user", "content": "hi"}]
ROWS = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5, "annotator": "ann"},
    {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "hello", "name": "bot"}],
     "rejected": [{"role": "assistant", "content": "go away"}], "id": "r2"},
]
EXPECTED = [
    PairRecord("2+2?", "4", "5", margin=1.5, annotator="ann"),
    PairRecord(CHAT, [{"role": "assistant", "content": "hello", "name": "bot"}],
               [{"role": "assistant", "content": "go away"}], id="r2"),
]
# Arrow gives one type per column: a text prompt and a chat prompt cannot share one, so the
# columnar inputs use rows of one kind each.
TEXT_ROWS = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
TEXT_EXPECTED = [PairRecord(f"q{i}", f"good {i}", f"bad {i}") for i in range(5)]


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    """All rows' keys as columns (``Table.from_pylist`` keeps only the first row's keys)."""
    return pa.Table.from_struct_array(pa.array(rows))


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int = 2) -> Path:
    pq.write_table(table_of(rows), path, row_group_size=row_group_size)
    return path


def arrow_file(path: Path, rows: list[dict[str, Any]]) -> Path:
    table = table_of(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return path


def arrow_stream(path: Path, rows: list[dict[str, Any]]) -> Path:
    table = table_of(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return path


def saved(path: Path, rows: list[dict[str, Any]]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def hub_folder(path: Path, rows: list[dict[str, Any]]) -> Path:
    (path / "data").mkdir(parents=True)
    parquet(path / "data" / "train-00000-of-00002.parquet", rows[:3])
    parquet(path / "data" / "train-00001-of-00002.parquet", rows[3:])
    return path


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {
    "x.parquet": parquet, "x.arrow": arrow_file, "stream.arrow": arrow_stream,
    "saved": saved, "hub": hub_folder, "x.jsonl": jsonl,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_input_kind_reads_the_same_records(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path / name, TEXT_ROWS)
    assert F.detect_format(path) == "trl"
    assert F.read_records(path) == ("trl", TEXT_EXPECTED)


def test_nulls_in_columns_are_absent_fields(tmp_path: Path) -> None:
    # Arrow fills the keys one row lacks with null: they must not become values.
    assert F.read_records(parquet(tmp_path / "x.parquet", ROWS[1:] + ROWS[1:]))[1] == [
        EXPECTED[1], EXPECTED[1]]
    assert F.read_records(parquet(tmp_path / "y.parquet", ROWS[:1]))[1] == EXPECTED[:1]


def test_datasetdict_and_hub_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train, test = TEXT_ROWS[:3], TEXT_ROWS[3:]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(
        str(tmp_path / "dd"))
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    parquet(hub / "data" / "train-00000-of-00001.parquet", train)
    jsonl(hub / "data" / "test.jsonl", test)
    for folder in (tmp_path / "dd", hub):
        assert F.read_records(folder, split="train")[1] == TEXT_EXPECTED[:3]
        assert F.read_records(f"{folder}:test")[1] == TEXT_EXPECTED[3:]
        with pytest.raises(UserError, match="holds the splits test, train; choose one"):
            F.read_records(folder)
        with pytest.raises(UserError, match="no split 'dev' \\(it has test, train\\)"):
            F.read_records(folder, split="dev")


def test_split_hints_hold_for_commands_without_split(tmp_path: Path) -> None:
    """Only `data import` has --split; `--data`, `--prompts` and the rest take DIR:NAME, so the
    hints name that form first and --split only as data import's."""
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    for split in ("train", "test"):
        jsonl(hub / "data" / f"{split}.jsonl", TEXT_ROWS)
    with pytest.raises(UserError) as err:
        F.read_records(hub)
    assert str(err.value).endswith(f"choose one with {hub}:NAME (data import: or --split NAME)")
    F.write_dataset(tmp_path / "saved", "trl", [PairRecord("p", "a", "b")])
    with pytest.raises(UserError, match="a saved dataset with one split; name no split "
                                        "\\(got 'train'\\)"):
        F.read_records(f"{tmp_path / 'saved'}:train")


def test_split_directories_of_a_hub_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    parquet(tmp_path / "train" / "part-0.parquet", TEXT_ROWS)
    assert F.read_records(tmp_path)[1] == TEXT_EXPECTED
    # The Hub's Parquet conversion: CONFIG/SPLIT/NNNN.parquet.
    converted = tmp_path / "converted" / "default"
    for split, rows in (("train", TEXT_ROWS[:2]), ("test", TEXT_ROWS[2:])):
        (converted / split).mkdir(parents=True)
        parquet(converted / split / "0000.parquet", rows)
    assert F.read_records(f"{tmp_path / 'converted'}:test")[1] == TEXT_EXPECTED[2:]


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p, "a directory with no Parquet, Arrow or JSONL files"),
    (lambda p: p / "missing.parquet", "missing.parquet: no such file or directory"),
])
def test_inputs_that_are_not_there(tmp_path: Path, make: Callable[[Path], Path],
                                   message: str) -> None:
    with pytest.raises(UserError, match=message):
        F.read_records(make(tmp_path))


def test_split_on_a_single_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--split applies to dataset folders"):
        F.read_records(jsonl(tmp_path / "x.jsonl", ROWS), split="train")


@pytest.mark.parametrize("name", ["x.parquet", "x.arrow", "stream.arrow", "saved", "hub"])
def test_a_bad_row_names_file_row_and_field(tmp_path: Path, name: str) -> None:
    rows = [dict(r) for r in TEXT_ROWS]
    rows[3] = {"prompt": "q3", "chosen": "good", "rejected": None}
    path = WRITERS[name](tmp_path / name, rows)
    with pytest.raises(DataError) as caught:
        F.read_records(path)
    # Row 4 overall; in the two-file hub folder it is row 1 of the second file.
    where = ("train-00001-of-00002.parquet:row 1" if name == "hub" else ":row 4")
    assert where in str(caught.value) and "field 'rejected': is missing" in str(caught.value)


def test_a_corrupt_columnar_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable parquet file"):
        F.read_records(path)


def test_columnar_rows_stream_by_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parquet file is read one record batch at a time, never as one table."""
    path = parquet(tmp_path / "x.parquet", TEXT_ROWS * 40, row_group_size=16)
    monkeypatch.setattr(sources, "_BATCH_ROWS", 16)
    seen = []
    real = sources._batches

    def spy(p: Path):  # the size of every batch the reader asks for
        for batch in real(p):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(sources, "_batches", spy)
    _, records = F.iter_records(path, "trl")
    first = next(records)
    assert first == TEXT_EXPECTED[0] and seen == [16]  # one batch read for the first record
    assert sum(1 for _ in records) == 199 and max(seen) == 16 and len(seen) == 13


def test_written_parquet_arrow_and_dataset_read_back(tmp_path: Path) -> None:
    for name in ("out.parquet", "out.arrow", "out.jsonl"):
        assert F.write_records(tmp_path / name, "trl", EXPECTED[1:]) == 1
        assert F.read_records(tmp_path / name)[1] == EXPECTED[1:]
    assert F.write_dataset(tmp_path / "ds", "trl", TEXT_EXPECTED) == 5
    assert F.read_records(tmp_path / "ds")[1] == TEXT_EXPECTED
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert loaded.num_rows == 5 and loaded[0] == {"prompt": "q0", "chosen": "good 0",
                                                   "rejected": "bad 0"}


def test_a_column_mixing_text_and_chat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="column 'prompt' mixes kinds of values"):
        F.write_records(tmp_path / "out.parquet", "trl", EXPECTED)
    assert not list(tmp_path.iterdir())  # no temp file left behind


# -- the published layouts of Hub folders (audit finding 1) ---------------------------------


def pair_row(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": "a", "rejected": "b"}


def prompts_of(spec: str | Path, split: str | None = None) -> list[Any]:
    return [r.prompt for r in F.read_records(spec, split=split)[1]]


def test_split_names_with_underscores_are_whole_splits(tmp_path: Path) -> None:
    """UltraFeedback-binarized: data/train_prefs-…, train_sft-…, test_prefs-… are 3 splits,
    not one 'train' holding prefs and SFT rows together."""
    (tmp_path / "data").mkdir()
    for split in ("train_prefs", "train_sft", "test_prefs"):
        parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet", [pair_row(split)])
    assert prompts_of(tmp_path, "train_prefs") == ["train_prefs"]
    assert prompts_of(f"{tmp_path}:test_prefs") == ["test_prefs"]
    with pytest.raises(UserError, match="no split 'train' \\(it has test_prefs, train_prefs, "
                                        "train_sft\\)"):
        F.read_records(tmp_path, split="train")


def test_numbered_shards_of_a_split_word_are_that_split(tmp_path: Path) -> None:
    """train_0, train.1, test-2: split words with a shard number, as datasets reads them."""
    (tmp_path / "data").mkdir()
    for name in ("train_0", "train.1", "test-2"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(json.dumps(pair_row(name)) + "\n")
    assert sorted(prompts_of(tmp_path, "train")) == ["train.1", "train_0"]
    assert prompts_of(tmp_path, "test") == ["test-2"]


def test_a_json_file_of_rows_is_data_and_a_folders_notes_are_not(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(pair_row("q")) + "\n")
    (tmp_path / "stats.json").write_text('{\n  "rows": 1\n}\n')  # notes, pretty-printed
    assert prompts_of(tmp_path) == ["q"]
    rows = tmp_path / "rows"  # JSON Lines under a name that says no split: read as before
    (rows / "train").mkdir(parents=True)
    (rows / "train" / "part-0.json").write_text(json.dumps(pair_row("r")) + "\n")
    assert prompts_of(rows, "train") == ["r"]


def test_split_names_with_underscores_in_a_saved_datasetdict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([pair_row("p")]),
                          "test_prefs": datasets.Dataset.from_list([pair_row("t")])}
                         ).save_to_disk(str(tmp_path / "dd"))
    assert prompts_of(f"{tmp_path / 'dd'}:train_prefs") == ["p"]


def hh_row(text: str) -> dict[str, Any]:
    return {"chosen": f"\n\nHuman: {text}\n\nAssistant: x",
            "rejected": f"\n\nHuman: {text}\n\nAssistant: y"}


def test_subset_directories_hold_splits_named_by_their_files(tmp_path: Path) -> None:
    """HH-RLHF: {subset}/{split}.jsonl.gz. A split is read from every subset (as
    datasets.load_dataset does) and never mixed with another split."""
    import gzip

    for subset in ("harmless-base", "helpful-base"):
        (tmp_path / subset).mkdir()
        for split in ("train", "test"):
            with gzip.open(tmp_path / subset / f"{split}.jsonl.gz", "wt") as fh:
                fh.write(json.dumps(hh_row(f"{subset} {split}")) + "\n")
    assert prompts_of(tmp_path, "train") == ["\n\nHuman: harmless-base train\n\nAssistant:",
                                             "\n\nHuman: helpful-base train\n\nAssistant:"]
    assert prompts_of(tmp_path / "harmless-base", "test") == [
        "\n\nHuman: harmless-base test\n\nAssistant:"]
    with pytest.raises(UserError, match="'harmless-base' is a subset, not a split .*"
                                        "harmless-base:NAME"):
        F.read_records(tmp_path, split="harmless-base")


def test_parquet_shards_below_a_subset_directory(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / "cfg" / "data").mkdir(parents=True, exist_ok=True)
        parquet(tmp_path / "cfg" / "data" / f"{split}-00000-of-00001.parquet", [pair_row(split)])
    assert prompts_of(f"{tmp_path}:train") == ["train"]


def test_shp_json_lines_files_per_subreddit(tmp_path: Path) -> None:
    """SHP: {subreddit}/{split}.json, JSON Lines despite the name; folder metadata is no data."""
    row = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "score_A": 2, "score_B": 1,
           "labels": 1}
    for subreddit in ("askacademia", "askbaking"):
        (tmp_path / subreddit).mkdir()
        for split in ("train", "validation", "test"):
            jsonl(tmp_path / subreddit / f"{split}.json", [{**row, "history": f"{subreddit} "
                                                                             f"{split}"}])
    (tmp_path / "dataset_info.json").write_text('{"description": "not a row"}')
    assert F.detect_format(tmp_path, "train") == "shp"
    assert prompts_of(tmp_path, "train") == ["askacademia train", "askbaking train"]


def test_a_json_array_file_is_told_apart(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps([pair_row("q")]))
    with pytest.raises(DataError, match="a JSON array file\\? rewardloop reads JSON Lines"):
        F.read_records(path)


def test_a_damaged_gzip_file(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="x.jsonl.gz: cannot be read"):
        F.read_records(path, "trl")
