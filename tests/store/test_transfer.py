"""Import/export between files and the store (SQLite and PostgreSQL): what lands in which
table, duplicates, all-or-nothing, batches, ties, stats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from rewardloop.data import schema as S
from rewardloop.data import transfer as T
from rewardloop.data.formats import PairRecord, read_records
from rewardloop.data.load import load_pairs
from rewardloop.data.store import Store
from rewardloop.errors import DataError, UserError

HH_HEAD = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def count(store: Store, model: Any) -> int:
    with store.read() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def test_pairwise_rows_become_task_and_judgment(store: Store, tmp_path: Path) -> None:
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5, "annotator": "ann",
         "id": "row-1"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "22", "annotator": "ann"},
    ])
    report = T.import_file(store, path, batch="round-1")
    assert (report.format, report.imported, report.duplicates) == ("trl", 2, 0)
    assert report.created == {"prompts": 1, "responses": 3, "tasks": 2, "judgments": 2,
                              "annotators": 1, "batches": 1}
    with store.read() as s:
        j = s.scalars(select(S.Judgment).order_by(S.Judgment.id)).first()
        items = [i.response.text for i in j.task.items]
        assert items == ["4", "5"] and j.task.kind == "pairwise" and j.task.overlap == 1
        assert j.task.done and j.task.n_judgments == 1 and j.task.batch.name == "round-1"
        assert j.ranking == [[j.task.items[0].response_id], [j.task.items[1].response_id]]
        assert (j.margin, j.source, j.external_id) == (1.5, "import", "row-1")
        assert (j.annotator.name, j.annotator.kind) == ("ann", "import")
        # The database logs each imported judgment too (trigger of migration 0003).
        actions = s.scalars(select(S.AuditEvent.action).order_by(S.AuditEvent.id)).all()
        assert sorted(actions) == ["data.import", "judgment.create", "judgment.create"]


def test_reimport_and_repeats_are_counted_and_skipped(store: Store, tmp_path: Path) -> None:
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = jsonl(tmp_path / "p.jsonl", [row, {**row, "id": "same content"},
                                       {"prompt": "p", "chosen": "b", "rejected": "a"},
                                       {"prompt": "p", "chosen": "a", "rejected": "a"}])
    first = T.import_file(store, path)
    assert (first.imported, first.duplicates) == (2, 1)
    assert first.skipped == {T.SKIP_IDENTICAL: 1}
    again = T.import_file(store, path)
    assert (again.imported, again.duplicates, sum(again.created.values())) == (0, 3, 0)
    assert count(store, S.Judgment) == 2 and count(store, S.Response) == 2


def test_a_bad_fifth_line_imports_nothing(store: Store, tmp_path: Path) -> None:
    good = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b", "annotator": "x"}
            for i in range(4)]
    path = jsonl(tmp_path / "p.jsonl", [*good, {"prompt": "p", "chosen": "a"}, *good])
    with pytest.raises(DataError, match="line 5 field 'rejected'"):
        T.import_file(store, path)
    for model in (S.Prompt, S.Response, S.ComparisonTask, S.Judgment, S.Annotator, S.Batch):
        assert count(store, model) == 0


def test_ranking_with_ties_round_trips_and_trl_export_skips_ties(store: Store,
                                                                  tmp_path: Path) -> None:
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [[1], [0, 2]],
             "annotator": "ann", "id": "r1"},
            {"prompt": "q", "responses": ["x", "y"], "ranking": [[0, 1]]}]
    T.import_file(store, jsonl(tmp_path / "r.jsonl", rows))
    with store.read() as s:
        assert sorted(s.scalars(select(S.ComparisonTask.kind))) == ["pairwise", "ranking"]
    T.export(store, "ranking", tmp_path / "out.jsonl")
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows
    report = T.export(store, "trl", tmp_path / "pairs.jsonl")
    assert report.rows == 2 and report.skipped == {T.SKIP_TIES: 2}
    _, pairs = read_records(tmp_path / "pairs.jsonl", "trl")
    assert pairs == [PairRecord("p", "b", "a", None, "ann", "r1"),
                     PairRecord("p", "b", "c", None, "ann", "r1")]
    assert sum(p.tie for p in load_pairs(store)) == 2


def test_hh_import_export_is_exact(store: Store, tmp_path: Path) -> None:
    rows = [{"chosen": HH_HEAD + " fine", "rejected": HH_HEAD + " go away"},
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b",
             "annotator": "ann"}]
    assert T.import_file(store, jsonl(tmp_path / "hh.jsonl", rows)).imported == 2
    with store.read() as s:
        assert s.scalars(select(S.Prompt.text).order_by(S.Prompt.id)).first() == HH_HEAD
    T.export(store, "hh", tmp_path / "out.jsonl")
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == rows


def test_ultrafeedback_pairs_with_margins(store: Store, tmp_path: Path) -> None:
    row = {"prompt": "q", "completions": [{"response": "a", "overall_score": 9},
                                          {"response": "b", "overall_score": 6},
                                          {"response": "c", "overall_score": 9}]}
    report = T.import_file(store, jsonl(tmp_path / "uf.jsonl", [row]))
    assert (report.format, report.records, report.imported) == ("ultrafeedback", 2, 2)
    assert [(p.chosen, p.rejected, p.margin) for p in load_pairs(store)] == [
        ("a", "b", 3.0), ("c", "b", 3.0)]


def test_chat_rows_keep_their_messages(store: Store, tmp_path: Path) -> None:
    user, bot = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    rows = [{"prompt": "hi", "chosen": [user, bot],
             "rejected": [user, {"role": "assistant", "content": "no"}]}]
    T.import_file(store, jsonl(tmp_path / "c.jsonl", rows))
    with store.read() as s:
        texts = s.scalars(select(S.Response.text).order_by(S.Response.id)).all()
    assert texts == ["hello", "no"]
    T.export(store, "trl", tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "out.jsonl").read_text()) == rows[0]


def test_kto_prompts_and_candidates(store: Store, tmp_path: Path) -> None:
    kto = [{"prompt": "p", "completion": "good", "label": True, "annotator": "ann"},
           {"prompt": "p", "completion": "bad", "label": False}]
    assert T.import_file(store, jsonl(tmp_path / "k.jsonl", kto)).created["ratings"] == 2
    T.export(store, "kto", tmp_path / "k_out.jsonl")
    assert [json.loads(x) for x in (tmp_path / "k_out.jsonl").read_text().splitlines()] == kto

    prompts = [{"prompt": "new", "meta": {"topic": "t"}, "id": "n1"}, {"prompt": "p"}]
    report = T.import_file(store, jsonl(tmp_path / "pr.jsonl", prompts))
    assert (report.imported, report.duplicates) == (1, 1)  # "p" came with the KTO rows
    cands = [{"prompt": "new", "responses": ["r1", "r2"], "models": ["m", None]}]
    assert T.import_file(store, jsonl(tmp_path / "c.jsonl", cands)).created["responses"] == 2
    T.export(store, "candidates", tmp_path / "c_out.jsonl")
    out = [json.loads(x) for x in (tmp_path / "c_out.jsonl").read_text().splitlines()]
    assert out == [{"prompt": "p", "responses": ["good", "bad"]},
                   {"prompt": "new", "responses": ["r1", "r2"], "models": ["m", None],
                    "id": "n1"}]


def test_batches_existing_annotators_and_refusals(store: Store, tmp_path: Path) -> None:
    with store.write() as s:
        s.add(S.Annotator(name="alice", kind="human"))
    pair = {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "alice"}
    T.import_file(store, jsonl(tmp_path / "a.jsonl", [pair]), batch="one")
    T.import_file(store, jsonl(tmp_path / "b.jsonl", [{**pair, "prompt": "q"}]), batch="two")
    with store.read() as s:
        assert s.scalars(select(S.Annotator.kind)).all() == ["human"]
    report = T.export(store, "trl", tmp_path / "two.jsonl", batch="two")
    assert report.rows == 1 and "\"q\"" in (tmp_path / "two.jsonl").read_text()
    with pytest.raises(UserError, match="no batch named 'three'"):
        T.export(store, "trl", tmp_path / "x.jsonl", batch="three")
    with pytest.raises(UserError, match="does not apply to kto"):
        T.export(store, "kto", tmp_path / "x.jsonl", batch="one")
    with pytest.raises(UserError, match="a prompts file has none"):
        T.import_file(store, jsonl(tmp_path / "p.jsonl", [{"prompt": "z"}]), batch="one")
    with pytest.raises(UserError, match="train sft"):
        T.import_file(store, jsonl(tmp_path / "s.jsonl", [{"text": "t"}]))
    with pytest.raises(UserError, match="unknown format 'ultrafeedback'"):
        T.export(store, "ultrafeedback", tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


def test_stats(store: Store, tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "one two", "rejected": "three", "annotator": "ann"},
            {"prompt": "p", "chosen": "one two", "rejected": "three", "tie": True},
            {"prompt": "q", "chosen": "four five six", "rejected": "seven", "annotator": "ann"}]
    T.import_file(store, jsonl(tmp_path / "p.jsonl", rows))
    T.import_file(store, jsonl(tmp_path / "k.jsonl",
                               [{"prompt": "q", "completion": "x", "label": True}]))
    result = T.stats(store)
    assert result["counts"] == {"prompts": 2, "responses": 5, "batches": 0, "tasks": 3,
                                "judgments": 3, "ratings": 1, "annotators": 1}
    assert result["annotators"] == {"(unknown)": {"judgments": 1, "ratings": 1},
                                    "ann": {"judgments": 2, "ratings": 0}}
    assert result["tie_rate"] == pytest.approx(1 / 3)
    assert result["judgments_by_source"] == {"import": 3}
    lengths = result["response_length"]  # "one two", "three", "four five six", "seven", "x"
    assert lengths["n"] == 5 and lengths["chars_median"] == 5
    assert lengths["words_mean"] == pytest.approx((2 + 1 + 3 + 1 + 1) / 5)
    assert T.stats(Store(f"sqlite:///{tmp_path / 'empty.db'}"))["tie_rate"] is None


def test_a_later_file_fills_what_an_earlier_one_left_unknown(store: Store, tmp_path: Path
                                                             ) -> None:
    """Judgments first (no prompt id, no models), then the prompts file and the candidates:
    the id, meta and models are taken, not counted as duplicates and dropped; known ones stay."""
    T.import_file(store, jsonl(tmp_path / "pairs.jsonl",
                               [{"prompt": "q1", "chosen": "a", "rejected": "b"}]))
    report = T.import_file(store, jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "q1", "id": "item-7", "meta": {"topic": "billing"}}]), fmt="prompts")
    assert report.created["prompt ids or meta filled"] == 1
    report = T.import_file(store, jsonl(tmp_path / "cands.jsonl", [
        {"prompt": "q1", "responses": ["a", "b"], "models": ["sft", "rlhf"]}]),
        fmt="candidates")
    assert report.created["response models filled"] == 2
    again = T.import_file(store, jsonl(tmp_path / "prompts2.jsonl", [
        {"prompt": "q1", "id": "other", "meta": {"topic": "x"}}]), fmt="prompts")
    assert again.created["prompt ids or meta filled"] == 0
    with store.read() as s:
        prompt = s.scalar(select(S.Prompt).where(S.Prompt.text == "q1"))
        assert (prompt.external_id, prompt.meta) == ("item-7", {"topic": "billing"})
        models = sorted(r.model for r in s.scalars(select(S.Response)))
        assert models == ["rlhf", "sft"]


def test_an_export_imported_back_doubles_nothing(store: Store, tmp_path: Path) -> None:
    """Judgments made through the queue (the server's path: the client's keys, source human)
    are found by what they say when their export comes back: the same annotator's ranking of
    the same answers is a duplicate, whoever wrote the file. Another annotator's judgment, or
    another ranking, of the same answers is new."""
    from rewardloop.feedback import queue as Q
    from rewardloop.feedback import tasks as TK

    with store.write() as s:
        bob, amy = S.Annotator(name="bob"), S.Annotator(name="amy")
        s.add_all([bob, amy])
        p, q, r = (TK.get_or_create_prompt(s, text) for text in "pqr")
        a, b = (TK.get_or_create_response(s, p, t) for t in "ab")
        x, y = (TK.get_or_create_response(s, q, t) for t in "xy")
        u, v, w = (TK.get_or_create_response(s, r, t) for t in "uvw")
        pair = TK.create_task(s, p, [a, b], overlap=2)
        tied = TK.create_task(s, q, [x, y])
        ranked = TK.create_task(s, r, [u, v, w], kind="ranking")
        for ann, task, ranking in ((bob, pair, [[a.id], [b.id]]), (amy, pair, [[b.id], [a.id]]),
                                   (bob, tied, [[y.id, x.id]]),
                                   (bob, ranked, [[w.id], [v.id, u.id]])):
            Q.submit_judgment(s, ann, task.id, ranking, idempotency_key=f"client-{task.id}",
                              require_lease=False)
    report = T.import_file(store, T.export(store, "ranking", tmp_path / "r.jsonl").path)
    assert (report.imported, report.duplicates) == (0, 4)
    report = T.import_file(store, T.export(store, "trl", tmp_path / "t.jsonl", ties=True).path)
    # The ranking's three pairs are not what bob said of the three answers as a whole: they
    # become pairwise tasks of their own (docs/data.md).
    assert (report.imported, report.duplicates) == (3, 3)
    assert count(store, S.Judgment) == 4 + 3 and count(store, S.ComparisonTask) == 3 + 3
    others = jsonl(tmp_path / "others.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "amy"},  # amy said b > a
        {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "carl"},
        {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "bob", "tie": True},
        {"prompt": "p", "chosen": "a", "rejected": "b", "annotator": "bob",
         "dimension": "safer"},
        {"prompt": "q", "chosen": "x", "rejected": "y", "tie": True},  # bob's, but unnamed
        {"prompt": "q", "chosen": "x", "rejected": "y", "annotator": "bob", "tie": True},
    ])
    report = T.import_file(store, others)
    assert (report.imported, report.duplicates) == (5, 1)
    again = T.import_file(store, others)
    assert (again.imported, again.duplicates) == (0, 6)
    assert count(store, S.Judgment) == 7 + 5


def test_a_jsonl_export_streams_the_store(tmp_path: Path, monkeypatch) -> None:
    """Exports are written as the store is read, a chunk at a time: the peak memory of a ten
    times larger trl or ranking export stays level (it held every record in a list before)."""
    import tracemalloc

    from rewardloop.data import load

    monkeypatch.setattr(load, "_CHUNK", 20)
    peaks: dict[tuple[str, int], int] = {}
    for n in (40, 400):
        store = Store(f"sqlite:///{tmp_path}/s{n}.db")
        T.import_file(store, jsonl(tmp_path / f"p{n}.jsonl", [
            {"prompt": f"q{i} " + "p" * 3000, "chosen": f"a{i} " + "c" * 3000,
             "rejected": f"b{i} " + "r" * 3000} for i in range(n)]))
        for fmt in ("trl", "ranking"):
            tracemalloc.start()
            try:
                assert T.export(store, fmt, tmp_path / f"{fmt}{n}.jsonl").rows == n
                peaks[fmt, n] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        store.dispose()
    for fmt in ("trl", "ranking"):  # 400 records of 9 kB: 3.6 MB more if they were held
        assert peaks[fmt, 400] < peaks[fmt, 40] + 1_000_000, peaks


def test_trl_rows_all_carry_a_margin_when_any_judgment_has_one(store: Store,
                                                               tmp_path: Path) -> None:
    """Interop audit s15 M2: a trl export where only some judgments had a margin left the rest
    null, and TRL's RewardTrainer (which reads a margin column when there is one) failed on
    them; a tied pair also kept its ranking's margin, which TRL applies as a preference. Now
    every row gets a number (0 for none, and for ties); a store without margins writes none."""
    T.import_file(store, jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a?", "chosen": "x", "rejected": "y", "margin": 0.5},
        {"prompt": "b?", "chosen": "x", "rejected": "y"}]))
    T.import_file(store, jsonl(tmp_path / "r.jsonl", [
        {"prompt": "c?", "responses": ["p", "q", "r"], "ranking": [[0, 1], [2]],
         "margin": 1.5}]))
    report = T.export(store, "trl", tmp_path / "out.jsonl", ties=True)
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    got = sorted((r["prompt"], r.get("tie", False), r["margin"]) for r in rows)
    assert got == [("a?", False, 0.5), ("b?", False, 0.0), ("c?", False, 1.5),
                   ("c?", False, 1.5), ("c?", True, 0.0)]
    assert report.zero_margins == 2
    plain = Store(f"sqlite:///{tmp_path}/plain.db")
    T.import_file(plain, jsonl(tmp_path / "q.jsonl", [
        {"prompt": "b?", "chosen": "x", "rejected": "y"}]))
    T.export(plain, "trl", tmp_path / "plain.jsonl")
    assert "margin" not in json.loads((tmp_path / "plain.jsonl").read_text())
    plain.dispose()
