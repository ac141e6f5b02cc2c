"""Published data sets in their owners' shapes: Chatbot Arena, OpenAssistant oasst1, SHP and
PKU-SafeRLHF; each detected from its columns, read from JSONL and Parquet, bad rows refused
with file, row and field."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardloop.data import formats as F
from rewardloop.data.formats import PairRecord, RankingRecord
from rewardloop.errors import DataError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def arena(winner: str, qid: str = "q1", **extra: Any) -> dict[str, Any]:
    return {"question_id": qid, "model_a": "vicuna-13b", "model_b": "koala-13b",
            "winner": winner, "judge": "arena_user_1", "turn": 1, "language": "English",
            "conversation_a": [user("hi"), bot("hello from a")],
            "conversation_b": [user("hi"), bot("hello from b")], **extra}


def oasst(mid: str, parent: str | None, role: str, text: str, rank: float | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "text": text,
            "role": role, "lang": "en", "rank": rank, "deleted": False,
            "message_tree_id": "t", **extra}


def shp(score_a: int, score_b: int, labels: int | None = None) -> dict[str, Any]:
    row = {"post_id": "p1", "domain": "askscience_train", "history": "Why is the sky blue?",
           "c_root_id_A": "ca", "c_root_id_B": "cb", "human_ref_A": "Rayleigh scattering.",
           "human_ref_B": "Because of the sea.", "score_A": score_a, "score_B": score_b}
    return row if labels is None else {**row, "labels": labels}


def saferlhf(better: int, safer: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": "How do I pick a lock?", "response_0": "Call a locksmith.",
            "response_1": "Use a tension wrench and a pick.", "is_response_0_safe": True,
            "is_response_1_safe": False, "better_response_id": better,
            "safer_response_id": safer, **extra}


def table_of(rows: list[dict[str, Any]]) -> pa.Table:
    """All rows' keys as columns (``Table.from_pylist`` keeps only the first row's keys)."""
    return pa.Table.from_struct_array(pa.array(rows))


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(table_of(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SUFFIXES = [".jsonl", ".parquet"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_arena_battles_become_pairs_with_models_and_ties(tmp_path: Path, suffix: str) -> None:
    rows = [arena("model_a", "q1"), arena("model_b", "q2"), arena("tie", "q3"),
            arena("tie (bothbad)", "q4")]
    fmt, records = F.read_records(write(tmp_path / f"a{suffix}", rows))
    a, b = [bot("hello from a")], [bot("hello from b")]
    options = {"annotator": "arena_user_1"}
    assert fmt == "arena" and records == [
        PairRecord([user("hi")], a, b, id="q1", models=["vicuna-13b", "koala-13b"], **options),
        PairRecord([user("hi")], b, a, id="q2", models=["koala-13b", "vicuna-13b"], **options),
        PairRecord([user("hi")], a, b, id="q3", tie=True, models=["vicuna-13b", "koala-13b"],
                   **options),
        PairRecord([user("hi")], a, b, id="q4", tie=True, both_bad=True,
                   models=["vicuna-13b", "koala-13b"], **options),
    ]


def test_arena_multi_turn_answers_keep_their_later_turns(tmp_path: Path) -> None:
    row = arena("model_b", conversation_a=[user("hi"), bot("a1"), user("more"), bot("a2")],
                conversation_b=[user("hi"), bot("b1"), user("more"), bot("b2")])
    (record,) = F.read_records(write(tmp_path / "a.jsonl", [row]))[1]
    assert record.prompt == [user("hi")]
    assert record.chosen == [bot("b1"), user("more"), bot("b2")]


def test_oasst_trees_become_rankings_of_sibling_replies(tmp_path: Path) -> None:
    rows = [
        oasst("r", None, "prompter", "Explain tides."),
        oasst("a1", "r", "assistant", "The moon pulls water.", rank=1),
        oasst("a2", "r", "assistant", "Gravity of moon and sun.", rank=0),
        oasst("a3", "r", "assistant", "Wind.", rank=2),
        oasst("a4", "r", "assistant", "Unranked reply."),
        oasst("p2", "a2", "prompter", "And the sun?"),
        oasst("b1", "p2", "assistant", "It adds to it.", rank=0),
        oasst("b2", "p2", "assistant", "It does nothing.", rank=0),  # equal ranks tie
        oasst("b3", "p2", "assistant", "Deleted one.", rank=1, deleted=True),
        oasst("c1", "b3", "prompter", "below a deleted reply"),
        oasst("p3", "a1", "prompter", "Only one ranked reply below."),
        oasst("d1", "p3", "assistant", "Alone.", rank=0),
    ]
    for suffix in SUFFIXES:
        fmt, records = F.read_records(write(tmp_path / f"t{suffix}", rows))
        assert fmt == "oasst" and records == [
            RankingRecord([user("Explain tides.")],
                          ["Gravity of moon and sun.", "The moon pulls water.", "Wind."],
                          [[0], [1], [2]], id="r"),
            RankingRecord([user("Explain tides."), bot("Gravity of moon and sun."),
                           user("And the sun?")], ["It adds to it.", "It does nothing."],
                          [[0, 1]], id="p2"),
        ]


def test_shp_pairs_carry_the_log_score_ratio_as_margin(tmp_path: Path) -> None:
    rows = [shp(30, 10, labels=1), shp(5, 20, labels=0), shp(8, 8), shp(0, 4)]
    fmt, records = F.read_records(write(tmp_path / "s.parquet", rows))
    good, bad = "Rayleigh scattering.", "Because of the sea."
    q = "Why is the sky blue?"
    assert fmt == "shp" and records == [
        PairRecord(q, good, bad, margin=math.log(3), id="p1"),
        PairRecord(q, bad, good, margin=math.log(4), id="p1"),
        PairRecord(q, good, bad, id="p1", tie=True),  # equal scores, no label
        PairRecord(q, bad, good, id="p1"),  # a score of 0 gives no ratio
    ]


def test_saferlhf_has_two_dimensions_chosen_by_format(tmp_path: Path) -> None:
    path = write(tmp_path / "pku.parquet", [saferlhf(1, 0, response_0_source="Alpaca-7B",
                                                     response_1_source="Alpaca-7B")])
    lock, smith = "Use a tension wrench and a pick.", "Call a locksmith."
    prompt = "How do I pick a lock?"
    assert F.detect_format(path) == "saferlhf-better"
    assert F.read_records(path)[1] == [
        PairRecord(prompt, lock, smith, dimension="better", models=["Alpaca-7B", "Alpaca-7B"])]
    assert F.read_records(path, "saferlhf-safer")[1] == [
        PairRecord(prompt, smith, lock, dimension="safer", models=["Alpaca-7B", "Alpaca-7B"])]
    # Trainers see the records' kind, so they take these files like TRL pairs.
    assert F.read_training_records(path)[0] == "trl"


BAD_ROWS = [
    ("arena", arena("model_c"), "winner", "must be one of"),
    ("arena", {**arena("tie"), "conversation_b": [user("other"), bot("x")]}, "conversation_b",
     "shares no leading user turn"),
    ("arena", {**arena("tie"), "model_b": None}, "model_b", "is missing"),
    ("shp", {**shp(3, 1), "score_B": None}, "score_B", "is missing"),
    ("shp", shp(3, 1, labels=2), "labels", "must be 1 (A preferred) or 0"),
    ("saferlhf-better", saferlhf(2, 0), "better_response_id", "must be 0 or 1"),
    ("saferlhf-safer", {**saferlhf(0, 1), "response_1": None}, "response_1", "is missing"),
    ("oasst", oasst("x", None, "moderator", "hm"), "role", "must be one of"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("fmt", "bad", "field", "message"), BAD_ROWS)
def test_bad_rows_name_file_row_and_field(tmp_path: Path, suffix: str, fmt: str,
                                          bad: dict[str, Any], field: str, message: str) -> None:
    good = {"arena": arena("tie"), "shp": shp(3, 1), "saferlhf-better": saferlhf(0, 1),
            "saferlhf-safer": saferlhf(0, 1),
            "oasst": oasst("g", None, "prompter", "hello")}[fmt]
    path = write(tmp_path / f"bad{suffix}", [good, good, bad])
    where = "line 3" if suffix == ".jsonl" else "row 3"
    expected = re.escape(f"bad{suffix}:{where} field '{field}': {message}")
    with pytest.raises(DataError, match=expected):
        F.read_records(path, fmt)


def test_oasst_reply_to_a_message_not_in_the_data(tmp_path: Path) -> None:
    rows = [oasst("r", None, "prompter", "q"), oasst("a", "gone", "assistant", "x", rank=0)]
    with pytest.raises(DataError, match="t.jsonl:line 2 field 'parent_id': names message "
                                        "'gone', which is not in the data"):
        F.read_records(write(tmp_path / "t.jsonl", rows))


def test_hh_and_ultrafeedback_raw_and_binarized_from_parquet(tmp_path: Path) -> None:
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
          "rejected": "\n\nHuman: hi\n\nAssistant: go"}
    assert F.read_records(write(tmp_path / "hh.parquet", [hh])) == (
        "hh", [PairRecord("\n\nHuman: hi\n\nAssistant:", " hello", " go")])
    raw = {"source": "evol", "instruction": "Add 2+2.", "models": ["a", "b"],
           "completions": [{"model": "a", "response": "4", "overall_score": 9.0},
                           {"model": "b", "response": "5", "overall_score": 3.5}]}
    assert F.read_records(write(tmp_path / "uf.parquet", [raw])) == (
        "ultrafeedback", [PairRecord("Add 2+2.", "4", "5", margin=5.5)])
    binarized = {"prompt": "Add 2+2.", "prompt_id": "x1", "score_chosen": 9.0,
                 "score_rejected": 3.5, "chosen": [user("Add 2+2."), bot("4")],
                 "rejected": [user("Add 2+2."), bot("5")],
                 "messages": [user("Add 2+2."), bot("4")]}
    assert F.read_records(write(tmp_path / "ufb.parquet", [binarized])) == (
        "trl", [PairRecord("Add 2+2.", [user("Add 2+2."), bot("4")],
                           [user("Add 2+2."), bot("5")])])
