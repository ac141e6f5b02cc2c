"""Row-level fixes of the data audit: format detection over several rows, clear errors for
values that used to raise tracebacks, SFT rows with a prompt copy, nulls for optional booleans,
and every field of a judgment surviving trl/ranking files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardloop.data import formats as F
from rewardloop.data.formats import PairRecord, PromptRecord, RankingRecord, SFTRecord
from rewardloop.errors import DataError, UserError

USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- detection (finding 4) --------------------------------------------------------------------


def test_a_pair_row_without_rejected_is_still_a_pair(tmp_path: Path) -> None:
    """Used to be detected as prompts and imported with every judgment dropped (exit 0)."""
    path = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p0", "chosen": "a"},
                                            {"prompt": "p1", "chosen": "a", "rejected": "b"}])
    assert F.detect_format(path) == "trl"
    with pytest.raises(DataError, match="pairs.jsonl:line 1 field 'rejected': is missing"):
        F.read_records(path)


def test_rows_of_different_formats_are_refused(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "mixed.jsonl", [{"prompt": "p0"}, {"prompt": "p1"},
                                            {"prompt": "p2", "completion": "c", "label": True}])
    with pytest.raises(DataError, match="mixed.jsonl:line 3: looks like kto .* but line 1 "
                                        "like prompts; .* pass --format"):
        F.detect_format(path)
    # Told the format, the reader takes the rows as that format.
    assert len(F.read_records(path, "prompts")[1]) == 3


def test_detection_reads_only_the_first_rows(tmp_path: Path) -> None:
    rows: list[Any] = [{"prompt": f"p{i}"} for i in range(F.DETECT_ROWS)]
    assert F.detect_format(jsonl(tmp_path / "p.jsonl", [*rows, "not an object"])) == "prompts"


# -- tracebacks that are now errors (finding 5) ----------------------------------------------


def test_pku_ids_written_as_floats(tmp_path: Path) -> None:
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 1.0,
           "safer_response_id": 0.0}
    _, records = F.read_records(jsonl(tmp_path / "pku.jsonl", [row]))
    assert records == [PairRecord("p", "b", "a", dimension="better")]
    with pytest.raises(DataError, match="field 'better_response_id': must be 0 or 1, got 0.5"):
        F.read_records(jsonl(tmp_path / "bad.jsonl", [{**row, "better_response_id": 0.5}]))


@pytest.mark.parametrize(("value", "message"), [
    (dt.datetime(2023, 1, 1), "field 'meta.when': is datetime .* which JSON cannot hold"),
    (b"raw", "field 'meta.when': is bytes"),
    (float("nan"), "field 'meta.when': is nan; JSON has no NaN or Infinity"),
])
def test_meta_values_json_cannot_hold(tmp_path: Path, value: Any, message: str) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "meta": {"when": value}}]), path)
    with pytest.raises(DataError, match=f"p.parquet:row 1 {message}"):
        F.read_records(path)


def test_extra_message_keys_json_cannot_hold(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(
        [{"messages": [{"role": "user", "content": "hi", "ts": dt.datetime(2023, 1, 1)}]}]), path)
    with pytest.raises(DataError, match="field 'messages\\[0\\].ts': is datetime"):
        F.read_records(path)


# -- SFT rows with a prompt copy (finding 9), nulls (16), implicit prompts (15) -------------


def test_sft_rows_with_a_copy_of_the_prompt(tmp_path: Path) -> None:
    """HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages."""
    row = {"prompt": "hi", "prompt_id": "x", "messages": [USER, BOT]}
    assert F.read_records(jsonl(tmp_path / "u.jsonl", [row])) == (
        "sft", [SFTRecord(messages=[USER, BOT])])
    other = jsonl(tmp_path / "o.jsonl", [{**row, "prompt": "something else"}])
    with pytest.raises(DataError, match="may only repeat the first user turn"):
        F.read_records(other, "sft")


@pytest.mark.parametrize("key", ["tie", "both_bad"])
def test_null_optional_booleans_are_absent(tmp_path: Path, key: str) -> None:
    path = jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b",
                                         key: None}])
    assert F.read_records(path)[1] == [PairRecord("p", "a", "b")]


def test_implicit_prompt_rows_say_what_they_are(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "i.jsonl", [{"chosen": "The sky is blue.",
                                         "rejected": "The sky is green."}])
    with pytest.raises(DataError, match="not an HH transcript \\(TRL implicit-prompt rows"):
        F.read_records(path)
    with pytest.raises(DataError, match="TRL implicit-prompt rows, which are not supported"):
        F.read_records(path, "trl")


def test_stepwise_rows_say_what_they_are(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completions": ["step 1", "step 2"],
                                         "labels": [True, False]}])
    with pytest.raises(DataError, match="stepwise-supervision rows, .*, are not supported"):
        F.read_records(path)


# -- everything a judgment holds reads and writes (findings 7, 8) ----------------------------

HOW = {"strength": "strong", "rationale": "cites a source", "time_ms": 5200,
       "guideline_version": "v2"}


def test_trl_rows_carry_how_the_judgment_was_given(tmp_path: Path) -> None:
    pair = PairRecord("p", "a", "b", 1.0, "ann", "i", tie=True, models=["m1", "m2"],
                      dimension="better", both_bad=True, **HOW)
    path = tmp_path / "out.jsonl"
    F.write_records(path, "trl", [pair])
    row = json.loads(path.read_text())
    assert row["strength"] == "strong" and row["rationale"] == "cites a source"
    assert F.read_records(path) == ("trl", [pair])


def test_ranking_rows_carry_everything(tmp_path: Path) -> None:
    record = RankingRecord("p", ["a", "b", "c"], [[2], [0, 1]], "ann", "r", models=["x", None, "z"],
                           margin=0.5, dimension="safer", both_bad=True, shown_order=[1, 2, 0],
                           **HOW)
    for name in ("out.jsonl", "out.parquet"):
        F.write_records(tmp_path / name, "ranking", [record])
        assert F.read_records(tmp_path / name) == ("ranking", [record])
    # What older files hold still reads the same.
    plain = jsonl(tmp_path / "old.jsonl", [{"prompt": "p", "responses": ["a", "b"],
                                            "ranking": [[1], [0]], "annotator": "ann"}])
    assert F.read_records(plain)[1] == [RankingRecord("p", ["a", "b"], [[1], [0]], "ann")]


@pytest.mark.parametrize(("extra", "message"), [
    ({"strength": "huge"}, "field 'strength': must be one of \\['slight', 'clear', 'strong'\\]"),
    ({"time_ms": -1}, "field 'time_ms': must be a whole number >= 0"),
    ({"shown_order": [0, 0]}, "field 'shown_order': must list the indices 0..1"),
    ({"models": ["x"]}, "field 'models': must be a list of 2 model names"),
])
def test_bad_judgment_fields(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    path = jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b"],
                                         "ranking": [[1], [0]], **extra}])
    with pytest.raises(DataError, match=f"line 1 {message}"):
        F.read_records(path)


def test_prompts_rows_unchanged(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "meta": {"k": [1, 2.5, None, True]}}])
    assert F.read_records(path)[1] == [PromptRecord("p", None, {"k": [1, 2.5, None, True]})]
    with pytest.raises(UserError):
        F.read_records(tmp_path / "missing.jsonl")


def test_ultrafeedback_binarized_equal_scores_are_ties(tmp_path: Path) -> None:
    chat = [{"role": "user", "content": "q"}]

    def ufb(good: str, bad: str, score_chosen: float, score_rejected: float, **more: Any
            ) -> dict[str, Any]:
        chosen = [*chat, {"role": "assistant", "content": good}]
        return {"prompt": "q", "prompt_id": "p1", "messages": chosen, "chosen": chosen,
                "rejected": [*chat, {"role": "assistant", "content": bad}],
                "score_chosen": score_chosen, "score_rejected": score_rejected, **more}

    rows = [ufb("good", "bad", 8.5, 3.0), ufb("x", "y", 6, 6), ufb("a", "b", 9, 2, margin=1.0),
            ufb("c", "d", 2, 9)]
    pairs = F.read_records(jsonl(tmp_path / "ufb.jsonl", rows))[1]
    # equal ratings: a tie; ratings give no margin (score writes its scores under these names)
    assert [(p.margin, p.tie) for p in pairs] == [(None, False), (None, True), (1.0, False),
                                                  (None, False)]


def test_a_file_scored_by_rewardloop_score_reads_back_as_plain_trl(tmp_path: Path) -> None:
    """`score` writes its reward model's scores as score_chosen/score_rejected: not ratings."""
    rows = [{"prompt": "q1", "chosen": "a", "rejected": "b", "score_chosen": 0.7,
             "score_rejected": 0.1},
            {"prompt": "q2", "chosen": "c", "rejected": "d", "score_chosen": -0.2,
             "score_rejected": 0.4, "score_chosen_std": 0.1, "score_rejected_std": 0.2}]
    fmt, pairs = F.read_records(jsonl(tmp_path / "scored.jsonl", rows))
    assert fmt == "trl" and [(p.margin, p.tie) for p in pairs] == [(None, False), (None, False)]
