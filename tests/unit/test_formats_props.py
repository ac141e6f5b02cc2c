"""Property tests: every written file reads back equal; import then export gives the rows back."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewardloop.data import formats as F
from rewardloop.data import transfer as T
from rewardloop.data.formats import (
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    SFTRecord,
    UnpairedRecord,
)
from rewardloop.data.records import HH_ASSISTANT, HH_HUMAN
from rewardloop.data.schema import Base
from rewardloop.data.store import Store

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
# Each store example is a few transactions on a fresh SQLite file: fewer, to stay fast.
STORE_SETTINGS = settings(SETTINGS, max_examples=25)

# Any text a database can store: no NUL, no lone surrogates.
text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
               max_size=30)
small = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=12)
maybe_id = st.none() | small
annotator = st.none() | st.sampled_from(["ann", "bob", "zoë"])


def message(role: Any) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"role": role, "content": text})


chat = st.lists(message(st.sampled_from(F.CHAT_ROLES)), min_size=1, max_size=3)
answer_chat = st.builds(lambda head, last: head + [last],
                        st.lists(message(st.sampled_from(F.CHAT_ROLES)), max_size=2),
                        message(st.just("assistant")))
prompt = text | chat
answer = text | answer_chat
margin = st.none() | st.floats(allow_nan=False, allow_infinity=False)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | small, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(small, inner, max_size=3),
    max_leaves=8)


def distinct(values: st.SearchStrategy[Any], min_size: int) -> st.SearchStrategy[list[Any]]:
    return st.lists(values, min_size=min_size, max_size=4,
                    unique_by=lambda v: json.dumps(v, sort_keys=True))


@st.composite
def rankings(draw: st.DrawFn, annotators: st.SearchStrategy[str | None] = annotator
             ) -> RankingRecord:
    responses = draw(distinct(answer, 2))
    order = draw(st.permutations(range(len(responses))))
    cuts = sorted(draw(st.sets(st.integers(1, len(order) - 1), max_size=len(order) - 1)))
    bounds = [0, *cuts, len(order)]
    groups = [list(order[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return RankingRecord(draw(prompt), responses, groups, draw(annotators), draw(maybe_id))


hh_answer = text.filter(lambda t: HH_HUMAN not in t and HH_ASSISTANT not in t)
hh_prompt = st.builds(lambda turns: "".join(f"{HH_HUMAN} {t}" for t in turns) + HH_ASSISTANT,
                      st.lists(text, min_size=1, max_size=2))
pairs = st.builds(PairRecord, prompt, answer, answer, margin, annotator, maybe_id, st.booleans())
records_by_format: dict[str, st.SearchStrategy[Any]] = {
    "prompts": st.builds(PromptRecord, prompt, maybe_id, st.dictionaries(small, json_value,
                                                                         max_size=3)),
    "candidates": st.lists(text, min_size=1, max_size=3).flatmap(lambda rs: st.builds(
        CandidatesRecord, prompt, st.just(rs),
        st.none() | st.lists(st.none() | small, min_size=len(rs), max_size=len(rs)), maybe_id)),
    "trl": pairs,
    "ranking": rankings(),
    "hh": st.builds(PairRecord, hh_prompt, hh_answer, hh_answer, margin, annotator, maybe_id,
                    st.booleans()),
    "kto": st.builds(UnpairedRecord, prompt, answer, st.booleans(), annotator, maybe_id),
    "sft": st.one_of(st.builds(SFTRecord, prompt=prompt, completion=answer, id=maybe_id),
                     st.builds(SFTRecord, messages=answer_chat, id=maybe_id),
                     st.builds(SFTRecord, text=text, id=maybe_id)),
}


@SETTINGS
@given(st.data())
def test_every_written_format_reads_back_equal(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(F.WRITABLE))
    records = data.draw(st.lists(records_by_format[fmt], min_size=1, max_size=4))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        F.write_records(path, fmt, records)
        assert F.read_records(path, fmt) == (fmt, records)


# -- import then export ------------------------------------------------------------------------


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _empty(store: Store) -> None:
    """Every table emptied but the audit log, which the database keeps append-only."""
    with store.write() as s:
        for table in reversed(Base.metadata.sorted_tables):
            if table.name != "audit_log":
                s.execute(table.delete())


def _round_trip(store: Store, fmt: str, records: list[Any]) -> list[Any]:
    _empty(store)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        F.write_records(src, fmt, records)
        T.import_file(store, src, fmt)
        T.export(store, fmt, out)
        return F.read_records(out, fmt)[1]


def _first_of_each(records: list[Any], key: Any) -> list[Any]:
    seen: set[Any] = set()
    kept = []
    for r in records:
        if key(r) not in seen:
            seen.add(key(r))
            kept.append(r)
    return kept


strict_pairs = st.builds(PairRecord, prompt, answer, answer, margin, annotator, maybe_id).filter(
    lambda p: _canon(p.chosen) != _canon(p.rejected))


@STORE_SETTINGS
@given(st.lists(strict_pairs, min_size=1, max_size=5))
def test_trl_import_export_round_trip(sqlite_store: Store, records: list[PairRecord]) -> None:
    expected = _first_of_each(records, lambda r: (
        _canon(r.prompt), _canon(r.chosen), _canon(r.rejected), r.annotator))
    if any(r.margin is not None for r in expected):
        # Once any pair has a margin every trl row carries one (TRL's RewardTrainer needs a
        # number in each): none reads back as 0, which every trainer takes the same way.
        expected = [replace(r, margin=0.0) if r.margin is None else r for r in expected]
    assert _round_trip(sqlite_store, "trl", records) == expected


@STORE_SETTINGS
@given(st.lists(rankings(), min_size=1, max_size=4))
def test_ranking_import_export_round_trip(sqlite_store: Store,
                                          records: list[RankingRecord]) -> None:
    expected = _first_of_each(records, lambda r: (_canon(r.prompt), r.annotator, tuple(
        tuple(sorted(_canon(r.responses[i]) for i in group)) for group in r.ranking)))
    assert _round_trip(sqlite_store, "ranking", records) == expected


@STORE_SETTINGS
@given(st.lists(records_by_format["kto"], min_size=1, max_size=5))
def test_kto_import_export_round_trip(sqlite_store: Store, records: list[UnpairedRecord]) -> None:
    expected = _first_of_each(records, lambda r: (
        _canon(r.prompt), _canon(r.completion), r.label, r.annotator))
    assert _round_trip(sqlite_store, "kto", records) == expected


@STORE_SETTINGS
@given(st.lists(records_by_format["prompts"], min_size=1, max_size=5))
def test_prompts_import_export_round_trip(sqlite_store: Store,
                                          records: list[PromptRecord]) -> None:
    expected = _first_of_each(records, lambda r: _canon(r.prompt))
    assert _round_trip(sqlite_store, "prompts", records) == expected
