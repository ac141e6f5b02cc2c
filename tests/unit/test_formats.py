"""File formats: every reader, writer and the detector; strict errors with file, line, field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rewardloop.data import formats as F
from rewardloop.data.formats import (
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    UnpairedRecord,
)
from rewardloop.errors import DataError, UserError

USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}
RUDE = {"role": "assistant", "content": "go away"}


def write_rows(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_one(tmp_path: Path, row: Any, fmt: str | None = None) -> tuple[str, list[F.Record]]:
    return F.read_records(write_rows(tmp_path / "in.jsonl", [row]), fmt)


# -- reading each format -----------------------------------------------------------------------

READ_CASES = [
    ("prompts", {"prompt": "Say hi", "id": 7, "meta": {"topic": "greeting"}},
     [PromptRecord("Say hi", "7", {"topic": "greeting"})]),
    ("prompts", {"messages": [USER]}, [PromptRecord([USER])]),
    ("candidates", {"prompt": "p", "responses": ["a", "b"], "models": ["m1", None]},
     [CandidatesRecord("p", ["a", "b"], ["m1", None])]),
    ("trl", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2, "annotator": "ann"},
     [PairRecord("p", "a", "b", 2.0, "ann")]),
    # UltraFeedback-binarized: a string prompt, answers that repeat it as chat.
    ("trl", {"prompt": "hi", "chosen": [USER, BOT], "rejected": [USER, RUDE]},
     [PairRecord("hi", [USER, BOT], [USER, RUDE])]),
    # TRL's implicit-prompt form: the shared leading messages are the prompt.
    ("trl", {"chosen": [USER, BOT], "rejected": [USER, RUDE]},
     [PairRecord([USER], [BOT], [RUDE])]),
    ("ranking", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[2], [0, 1]]},
     [RankingRecord("p", ["a", "b", "c"], [[2], [0, 1]])]),
    ("kto", {"prompt": "p", "completion": "a", "label": False, "annotator": "x"},
     [UnpairedRecord("p", "a", False, "x")]),
    ("sft", {"prompt": "p", "completion": "a"}, [SFTRecord(prompt="p", completion="a")]),
    ("sft", {"messages": [USER, BOT]}, [SFTRecord(messages=[USER, BOT])]),
    ("sft", {"text": "once upon a time"}, [SFTRecord(text="once upon a time")]),
]


@pytest.mark.parametrize(("fmt", "row", "expected"), READ_CASES)
def test_read_and_detect_each_format(tmp_path: Path, fmt: str, row: dict, expected: list) -> None:
    assert read_one(tmp_path, row) == (fmt, expected)
    assert F.detect_format(tmp_path / "in.jsonl") == fmt


def test_hh_multi_turn_split_into_shared_turns_and_final_answers(tmp_path: Path) -> None:
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
    row = {"chosen": head + " fine, thanks", "rejected": head + " why do you care"}
    fmt, records = read_one(tmp_path, row)
    assert fmt == "hh"
    assert records == [PairRecord(head, " fine, thanks", " why do you care")]
    assert F.hh_transcripts(records[0]) == (row["chosen"], row["rejected"])


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "rejected", "before the final assistant answer"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x\n\nHuman: more?", "rejected": "\n\nHuman: a"
      "\n\nAssistant: y"}, "chosen", "ends with a human turn"),
    ({"chosen": "no turns at all", "rejected": "\n\nHuman: a\n\nAssistant: y"},
     "chosen", "Assistant"),
])
def test_hh_refuses_rows_that_do_not_split(tmp_path: Path, row: dict, field: str,
                                           message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        read_one(tmp_path, row, "hh")
    assert err.value.field == field and err.value.line == 1


def test_ultrafeedback_pairs_prefer_higher_rating_and_skip_ties(tmp_path: Path) -> None:
    row = {"instruction": "q", "completions": [
        {"response": "a", "overall_score": 8, "model": "m1"},
        {"text": "b", "rating": 5.5},
        {"response": "c", "score": 8},
        {"response": "d", "fine-grained_score": 9.25},
    ]}
    fmt, records = read_one(tmp_path, row)
    assert fmt == "ultrafeedback"
    got = {(r.chosen, r.rejected): r.margin for r in records}
    # a-c tie (8 = 8): no pair; every other pair prefers the higher rating by the difference.
    assert got == {("a", "b"): 2.5, ("d", "a"): 1.25, ("c", "b"): 2.5, ("d", "b"): 3.75,
                   ("d", "c"): 1.25}
    assert all(r.prompt == "q" for r in records)


def test_rows_that_give_no_record_are_counted(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """Interop audit s15 L2: an UltraFeedback row whose answers are all rated alike vanished
    without a word (identical pairs are counted on import; these were not)."""
    import json
    import logging

    path = tmp_path / "uf.jsonl"
    rows = [{"instruction": "q", "completions": [{"response": "a", "overall_score": 8},
                                                 {"response": "b", "overall_score": 5}]},
            {"instruction": "r", "completions": [{"response": "a", "overall_score": 7},
                                                 {"response": "b", "overall_score": 7}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="rewardloop.data.formats"):
        fmt, records = F.read_records(path)
    assert fmt == "ultrafeedback" and len(records) == 1
    assert "1 ultrafeedback rows gave no record" in caplog.text


def test_ultrafeedback_needs_a_numeric_rating(tmp_path: Path) -> None:
    row = {"prompt": "q", "completions": [{"response": "a", "overall_score": "N/A"}]}
    with pytest.raises(DataError, match="finite number") as err:
        read_one(tmp_path, row)
    assert err.value.field == "completions[0].overall_score"


# -- malformed input ---------------------------------------------------------------------------


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "in.jsonl", [{"prompt": "a"}, "", '{"prompt": "b"', ""])
    with pytest.raises(DataError, match=r"in\.jsonl:line 3: not valid JSON") as err:
        F.read_records(path)
    assert err.value.line == 3


@pytest.mark.parametrize(("row", "fmt", "field", "message"), [
    ({"prompt": "p", "chosen": "a"}, "trl", "rejected", "is missing"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "trl", "prompt", "got a number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "trl", "margin",
     "finite number"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": True}, "trl", "margin", "boolean"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "kto", "label", "true or false"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [[0], [0]]}, "ranking", "ranking",
     "twice"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[0], [1]]}, "ranking", "ranking",
     "each once"),
    ({"prompt": "p", "responses": ["a", "a"], "ranking": [[0], [1]]}, "ranking", "responses[1]",
     "repeats responses\\[0\\]"),
    ({"prompt": "p", "responses": ["a"], "ranking": [[0]]}, "ranking", "responses",
     "at least 2"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "trl",
     "prompt[0].role", "must be one of"),
    ({"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"}, "trl",
     "prompt[0].content", "must be a string"),
    ({"prompt": "p", "chosen": [USER], "rejected": [BOT]}, "trl", "chosen[0].role",
     "assistant"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "id": "x" * 256}, "trl", "id",
     "at most 255"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "x" * 121}, "trl", "annotator",
     "at most 120"),
    ({"prompt": "nul\u0000here"}, "prompts", "prompt", "NUL"),
    ({"prompt": "p", "meta": {"k": "\ud800"}}, "prompts", "meta.k", "surrogate"),
    ({"prompt": "p", "meta": [1]}, "prompts", "meta", "must be an object"),
    ({"prompt": "p", "responses": ["a"], "models": ["m", "n"]}, "candidates", "models",
     "one per response"),
    ({"messages": [USER, BOT], "text": "t"}, "sft", "text", "exactly one"),
])
def test_field_errors_name_line_and_field(tmp_path: Path, row: dict, fmt: str, field: str,
                                          message: str) -> None:
    path = write_rows(tmp_path / "in.jsonl", ["", "  ", row])  # blank lines still count
    with pytest.raises(DataError, match=message) as err:
        F.read_records(path, fmt)
    assert (err.value.line, err.value.field) == (3, field)
    assert f"in.jsonl:line 3 field '{field}'" in str(err.value)


@pytest.mark.parametrize(("content", "message"), [
    ("", "empty"), ("\n  \n\n", "empty"), ("[1, 2]\n", "JSON object"),
    ('{"prompt": NaN}\n', "NaN is not a JSON number"), (b"\xff\xfe{}\n", "not UTF-8"),
    ('{"weird": 1}\n', "cannot tell the format"),
])
def test_unreadable_files(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        F.read_records(path)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        F.read_records(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="unknown format 'csv'"):
        read_one(tmp_path, {"prompt": "p"}, "csv")


def test_blank_lines_bom_and_a_one_megabyte_line(tmp_path: Path) -> None:
    long = "x" * 1_000_000
    path = tmp_path / "in.jsonl"
    path.write_text("\ufeff" + json.dumps({"prompt": "a"}) + "\n\n   \n"
                    + json.dumps({"prompt": long}) + "\n\n", encoding="utf-8")
    fmt, records = F.read_records(path)
    assert fmt == "prompts" and [r.prompt for r in records] == ["a", long]


# -- writing -----------------------------------------------------------------------------------

WRITE_CASES = [
    ("prompts", [PromptRecord("p", "1", {"k": [1, 2.5, None]}), PromptRecord([USER])]),
    ("candidates", [CandidatesRecord("p", ["a", "b"], ["m", None], "c1")]),
    ("trl", [PairRecord("p", "a", "b", 0.5, "ann", "i", tie=True),
             PairRecord([USER], [BOT], [RUDE])]),
    ("ranking", [RankingRecord("p", ["a", [BOT], "c"], [[1, 2], [0]], "ann", "r")]),
    ("hh", [PairRecord("\n\nHuman: hi\n\nAssistant:", " a", " b", 1.0, "ann")]),
    ("kto", [UnpairedRecord([USER], [BOT], True, "ann", "k")]),
    ("sft", [SFTRecord(prompt="p", completion="a"), SFTRecord(messages=[USER, BOT]),
             SFTRecord(text="t", id="3")]),
]


@pytest.mark.parametrize(("fmt", "records"), WRITE_CASES)
def test_write_reads_back_equal(tmp_path: Path, fmt: str, records: list) -> None:
    path = tmp_path / "out.jsonl"
    assert F.write_records(path, fmt, records) == len(records)
    assert F.read_records(path) == (fmt, records)
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_hh_writer_renders_other_prompts_as_transcripts(tmp_path: Path) -> None:
    pair = PairRecord([USER, BOT, USER], "yes", [RUDE])
    chosen, rejected = F.hh_transcripts(pair)
    assert chosen == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: hi\n\nAssistant: yes"
    assert rejected.endswith("\n\nAssistant: go away")


def test_hh_writer_renders_every_turn_of_an_answer() -> None:
    """Answers that differ only in their last turn keep their earlier turns (they read back
    as a longer shared prompt); answers that differ earlier cannot be HH (audit finding 2)."""
    more = {"role": "user", "content": "More?"}
    shared = PairRecord("Hi", [BOT, more, {"role": "assistant", "content": "B2"}],
                        [BOT, more, {"role": "assistant", "content": "A2"}])
    assert F.hh_transcripts(shared) == (
        "\n\nHuman: Hi\n\nAssistant: hello\n\nHuman: More?\n\nAssistant: B2",
        "\n\nHuman: Hi\n\nAssistant: hello\n\nHuman: More?\n\nAssistant: A2")
    arena = PairRecord("Hi", [{"role": "assistant", "content": "B1"}, more,
                              {"role": "assistant", "content": "B2"}],
                       [{"role": "assistant", "content": "A1"}, more,
                        {"role": "assistant", "content": "A2"}])
    assert F.hh_unwritable(arena) is not None and "differ before their last turn" in (
        F.hh_unwritable(arena) or "")
    with pytest.raises(ValueError, match="differ before their last turn"):
        F.hh_transcripts(arena)


def test_hh_writer_refuses_system_messages_and_multi_turn_answers(tmp_path: Path) -> None:
    system = PairRecord([{"role": "system", "content": "be kind"}, USER], "yes", "no")
    assert "system, developer or tool" in (F.hh_unwritable(system) or "")
    with pytest.raises(UserError, match="cannot write as hh: .*system, developer or tool"):
        F.write_records(tmp_path / "hh.jsonl", "hh", [system])
    assert not list(tmp_path.iterdir())


def test_hh_answer_that_starts_with_a_space_keeps_it() -> None:
    """trl -> hh -> trl keeps a completion-style answer (audit finding 13)."""
    chosen, rejected = F.hh_transcripts(PairRecord("The sky is", " blue.", "green"))
    assert chosen == "\n\nHuman: The sky is\n\nAssistant: blue."
    assert rejected == "\n\nHuman: The sky is\n\nAssistant: green"


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    bad = [PairRecord("\n\nHuman: q\n\nAssistant:", " a\n\nHuman: sneaky", " b")]
    with pytest.raises(UserError, match="turn marker"):
        F.write_records(path, "hh", bad)
    with pytest.raises(TypeError, match="PairRecord"):
        F.write_records(path, "trl", [PromptRecord("p")])
    with pytest.raises(UserError, match="unknown format 'ultrafeedback'"):
        F.write_records(path, "ultrafeedback", [])
    assert path.read_text() == "old\n" and list(tmp_path.iterdir()) == [path]


# -- accessors ---------------------------------------------------------------------------------


def test_chat_aware_accessors() -> None:
    assert F.as_messages("q") == [{"role": "user", "content": "q"}]
    assert F.prompt_text("q") == "q"
    assert F.prompt_text([USER, BOT]) == "user: hi\n\nassistant: hello"
    assert F.response_text(" a") == " a" and F.response_text([USER, BOT]) == "hello"
    assert F.completion_messages("hi", [USER, BOT]) == [BOT]
    assert F.completion_messages([USER], [BOT]) == [BOT]
    assert F.completion_messages("other", [USER, BOT]) == [USER, BOT]
    assert F.completion_messages("q", "a") == [{"role": "assistant", "content": "a"}]
    assert F.is_chat([USER]) and not F.is_chat("q")
    assert SFTRecord(messages=[USER, BOT]).prompt_completion() == ([USER], [BOT])
    assert SFTRecord(text="t").prompt_completion() == ("", "t")
    assert SFTRecord(prompt="p", completion="c").prompt_completion() == ("p", "c")


def test_ultrafeedback_pairs_carry_the_rows_annotator_and_id(tmp_path: Path) -> None:
    row = {"prompt": "q", "annotator": "ann-1", "id": "r7", "completions": [
        {"response": "a", "rating": 2}, {"response": "b", "rating": 1}]}
    _, records = read_one(tmp_path, row)
    assert [(r.annotator, r.id) for r in records] == [("ann-1", "r7")]


def test_read_as_types_the_records_and_refuses_the_wrong_class(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "id": "1"}) + "\n")
    assert F.read_as(path, "prompts", PromptRecord) == [PromptRecord("hi", "1")]
    with pytest.raises(TypeError, match="PromptRecord, not PairRecord"):
        F.read_as(path, "prompts", PairRecord)
