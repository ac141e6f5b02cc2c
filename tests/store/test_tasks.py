"""feedback.tasks: creating tasks, leasing them under overlap, recording judgments."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
from sqlalchemy import func, select

from rewardloop.data import schema as S
from rewardloop.errors import DataError
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T


def _annotators(store, names):
    with store.write() as s:
        objs = [S.Annotator(name=n) for n in names]
        s.add_all(objs)
    return objs


def _make_tasks(store, n, overlap=1, k=2, kind="pairwise", batch="b"):
    with store.write() as s:
        b = T.get_or_create_batch(s, batch, guidelines="Prefer helpful answers.")
        ids = []
        for i in range(n):
            p = T.get_or_create_prompt(s, f"prompt {i}")
            rs = [T.get_or_create_response(s, p, f"answer {i}.{j}") for j in range(k)]
            ids.append(T.create_task(s, p, rs, kind=kind, overlap=overlap, batch=b).id)
    return ids


def test_dedup_prompt_response_batch(store) -> None:
    with store.write() as s:
        p1 = T.get_or_create_prompt(s, "hi")
        p2 = T.get_or_create_prompt(s, "hi")
        chat = T.get_or_create_prompt(s, messages=[{"role": "user", "content": "hi"}])
        r1 = T.get_or_create_response(s, p1, "a", model="m")
        r2 = T.get_or_create_response(s, p1, "a")
        r3 = T.get_or_create_response(s, chat, "a")
        b1 = T.get_or_create_batch(s, "x", guidelines="g1")
        b2 = T.get_or_create_batch(s, "x")
        assert p1.id == p2.id != chat.id
        assert r1.id == r2.id != r3.id
        assert b1.id == b2.id and b1.guideline_version == S.content_hash("g1")[:12]
    with pytest.raises(DataError, match="exactly one"):
        with store.write() as s:
            T.get_or_create_prompt(s, "x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(DataError, match="role"):
        with store.write() as s:
            T.get_or_create_prompt(s, messages=[{"content": "x"}])


def test_create_task_validates(store) -> None:
    with store.write() as s:
        p = T.get_or_create_prompt(s, "p")
        other = T.get_or_create_prompt(s, "other")
        a, b, c = (T.get_or_create_response(s, p, t) for t in "abc")
        x = T.get_or_create_response(s, other, "x")
        with pytest.raises(T.TaskError, match="exactly 2"):
            T.create_task(s, p, [a, b, c])
        with pytest.raises(T.TaskError, match="at least 2"):
            T.create_task(s, p, [a], kind="ranking")
        with pytest.raises(T.TaskError, match="prompt"):
            T.create_task(s, p, [a, x])
        with pytest.raises(T.TaskError, match="overlap"):
            T.create_task(s, p, [a, b], overlap=0)
        with pytest.raises(T.TaskError, match="gold ranking"):
            T.create_task(s, p, [a, b], gold_ranking=[[a.id], [c.id]])
        task = T.create_task(s, p, [a, b, c], kind="ranking", gold_ranking=[[c.id], [a.id, b.id]])
        assert task.is_gold and [i.response_id for i in task.items] == [a.id, b.id, c.id]
        assert s.scalar(select(func.count()).select_from(S.AuditEvent)) == 1


def test_lease_order_shuffle_and_reuse(store) -> None:
    ids = _make_tasks(store, 3, k=3, kind="ranking")
    with store.write() as s:
        t = s.get(S.ComparisonTask, ids[2])
        t.priority = 5.0
        item_ids = sorted(i.response_id for i in t.items)
    (ann,) = _annotators(store, ["ann"])
    with store.write() as s:
        lease = Q.next_task(s, ann, rng=random.Random(0))
        assert lease.task_id == ids[2]  # highest priority first
        assert sorted(lease.shown_order) == item_ids
        view = Q.task_view(s, lease)
        assert [r["id"] for r in view["responses"]] == lease.shown_order
        assert view["prompt"] == "prompt 2" and view["kind"] == "ranking"
        assert view["guideline_version"]
    with store.write() as s:
        again = Q.next_task(s, ann)
        assert again.id == lease.id  # an unexpired lease is handed back, not a new task
    with store.write() as s:
        j, created = Q.submit_judgment(s, ann, lease.task_id, [lease.shown_order],
                                       idempotency_key="k")
        assert created and j.shown_order == lease.shown_order and j.guideline_version
    with store.write() as s:
        assert Q.next_task(s, ann).task_id == ids[0]  # then the oldest


def test_overlap_and_expired_leases(store) -> None:
    (tid,) = _make_tasks(store, 1, overlap=2)
    a, b, c = _annotators(store, ["a", "b", "c"])
    with store.write() as s:
        la = Q.next_task(s, a)
        lb = Q.next_task(s, b, lease_s=-1)  # already expired: frees its slot
        assert la.task_id == lb.task_id == tid
    with store.write() as s:
        lc = Q.next_task(s, c)
        assert lc is not None and lc.task_id == tid
    with store.write() as s:
        assert Q.next_task(s, b) is None  # a and c hold both slots
        with pytest.raises(T.TaskError, match="all the judgments") as err:
            Q.submit_judgment(s, b, tid, lb.shown_order, idempotency_key="kb")
        assert err.value.status == 409
    for ann, lease in ((a, la), (c, lc)):
        with store.write() as s:
            Q.submit_judgment(s, ann, tid, [[lease.shown_order[0]], [lease.shown_order[1]]],
                              idempotency_key=f"k{ann.name}")
    with store.read() as s:
        task = s.get(S.ComparisonTask, tid)
        assert task.done and task.n_judgments == 2
        assert T.batch_progress(s)["annotators"] == {"a": 1, "c": 1}


def _drain(store, annotator) -> list[int]:
    """Every task the queue hands ``annotator``, judged one after another, in order."""
    got = []
    while True:
        with store.write() as s:
            lease = Q.next_task(s, annotator)
            if lease is None:
                return got
            Q.submit_judgment(s, annotator, lease.task_id, [[i] for i in lease.shown_order],
                              idempotency_key=f"{annotator.name}-{lease.task_id}")
            got.append(lease.task_id)


def test_audience_tasks_go_only_to_their_group(store) -> None:
    """A task aimed at a group (``audience``) is handed to that group's annotators only, before
    lower-priority tasks for everyone; annotators of other groups, or of none, never see it."""
    with store.write() as s:
        s.add_all([S.Annotator(name="minor", groups=["minority"]),
                   S.Annotator(name="major", groups=["majority"]),
                   S.Annotator(name="both", groups=["majority", "minority"]),
                   S.Annotator(name="nobody")])
        p = T.get_or_create_prompt(s, "p")
        rs = [T.get_or_create_response(s, p, t) for t in "abcdef"]
        aimed = T.create_task(s, p, rs[:2], overlap=2, priority=2.0, audience="minority").id
        common = T.create_task(s, p, rs[2:4], overlap=4, priority=1.0).id
        other = T.create_task(s, p, rs[4:], overlap=4, priority=3.0, audience="elsewhere").id
        by_name = {a.name: a for a in s.scalars(select(S.Annotator))}
        with pytest.raises(T.TaskError, match="audience") as err:
            T.create_task(s, p, rs[:2], audience="")
        assert err.value.status == 422
        with pytest.raises(T.TaskError, match="audience"):
            T.create_task(s, p, rs[:2], audience="g" * (S.AUDIENCE_MAX + 1))
    assert _drain(store, by_name["major"]) == [common]
    assert _drain(store, by_name["nobody"]) == [common]
    assert _drain(store, by_name["minor"]) == [aimed, common]
    assert _drain(store, by_name["both"]) == [aimed, common]
    with store.read() as s:
        assert s.get(S.ComparisonTask, aimed).done
        assert s.get(S.ComparisonTask, other).n_judgments == 0
        created = [e.payload for e in s.scalars(select(S.AuditEvent).where(
            S.AuditEvent.action == "task.create"))]
        assert [e["audience"] for e in created] == ["minority", None, "elsewhere"]


def test_submit_errors_and_replay(store) -> None:
    (tid,) = _make_tasks(store, 1, overlap=2)
    a, b = _annotators(store, ["a", "b"])
    with store.write() as s:
        # No lease: 403 before the task is even looked up (an unknown task alike), so the
        # caller learns neither that it exists nor its response ids from a ranking error.
        for task_id in (999, tid):
            with pytest.raises(T.TaskError, match="not leased") as err:
                Q.submit_judgment(s, a, task_id, [[1], [2]], idempotency_key="x")
            assert err.value.status == 403
        with pytest.raises(T.TaskError, match="does not exist") as err:
            Q.submit_judgment(s, a, 999, [[1], [2]], idempotency_key="x", require_lease=False)
        assert err.value.status == 404
        lease = Q.next_task(s, a)
    r1, r2 = lease.shown_order
    with store.write() as s:
        with pytest.raises(T.TaskError, match="ranking") as err:
            Q.submit_judgment(s, a, tid, [[r1], [r1]], idempotency_key="x")
        assert err.value.status == 422
        with pytest.raises(T.TaskError, match="strength"):
            Q.submit_judgment(s, a, tid, [[r1], [r2]], idempotency_key="x", strength="huge")
    with store.write() as s:
        j, created = Q.submit_judgment(s, a, tid, [[r1], [r2]], idempotency_key="x",
                                       strength="clear", time_ms=1200)
        assert created
    with store.write() as s:
        j2, created = Q.submit_judgment(s, a, tid, [r1, r2], idempotency_key="x",
                                        strength="clear", time_ms=1200)
        assert not created and j2.id == j.id
        with pytest.raises(T.TaskError, match="different judgment"):
            Q.submit_judgment(s, a, tid, [[r2], [r1]], idempotency_key="x")
        for other in ({"strength": "strong", "time_ms": 1200},
                      {"strength": "clear", "time_ms": 1200, "rationale": "why"},
                      {"strength": "clear"}, {"strength": "clear", "time_ms": 1200,
                                              "source": "simulated"},
                      {"strength": "clear", "time_ms": 1200, "margin": 0.5}):
            with pytest.raises(T.TaskError, match="different judgment") as err:
                Q.submit_judgment(s, a, tid, [[r1], [r2]], idempotency_key="x", **other)
            assert err.value.status == 409
        with pytest.raises(T.TaskError, match="already judged"):
            Q.submit_judgment(s, a, tid, [[r1], [r2]], idempotency_key="y")
    with store.write() as s:  # without a lease (imports, simulators): allowed when asked;
        # a's key "x" is a's alone, so b may use it too
        _, created = Q.submit_judgment(s, b, tid, [[r1, r2]], idempotency_key="x",
                                       require_lease=False, source="simulated")
        assert created
    with store.read() as s:
        assert s.get(S.ComparisonTask, tid).done
        actions = s.scalars(select(S.AuditEvent.action)).all()
        assert actions.count("judgment.create") == 2


def test_candidates_pairing_gold_and_errors(store) -> None:
    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "models": ["m1", "m2", "m3"]},
            {"prompt": [{"role": "user", "content": "q"}], "responses": ["x", "y"]}]
    with store.write() as s:
        b = T.get_or_create_batch(s, "cand")
        made = T.create_tasks_from_candidates(s, rows, kind="pairwise", overlap=2, batch=b,
                                              gold={0: [[2], [0, 1]]})
        assert len(made) == 3 + 1
        gold = [t for t in made if t.is_gold]
        assert len(gold) == 3
        resp = {r.text: r.id for r in s.scalars(select(S.Response))}
        assert gold[1].gold_ranking == [[resp["c"]], [resp["a"]]]  # pair (a, c)
        adj = T.create_tasks_from_candidates(s, rows[:1], kind="pairwise", batch=b,
                                             pairing="adjacent")
        assert len(adj) == 2
        rank = T.create_tasks_from_candidates(s, rows, kind="ranking", batch=b)
        assert [len(t.items) for t in rank] == [3, 2]
        assert s.scalar(select(S.Response.model).where(S.Response.text == "b")) == "m2"
    bad = [({"prompt": 3, "responses": ["a", "b"]}, "field 'prompt'"),
           ({"prompt": "p", "responses": ["a"]}, "field 'responses'"),
           ({"prompt": "p", "responses": ["a", "b"], "models": ["m"]}, "field 'models'")]
    for row, where in bad:
        with pytest.raises(DataError, match=f"f.jsonl:line 7 {where}"):
            with store.write() as s:
                T.create_tasks_from_candidates(s, [row], path="f.jsonl", line_numbers=[7])


def test_candidates_are_looked_up_in_chunks_and_a_race_falls_back(store, monkeypatch) -> None:
    """Prompts and answers are found or made a chunk of rows at a time (one at a time, with a
    query and a savepoint each, a row cost 15 ms: audit s14, scale 2). When another writer made
    one of them between the lookup and the insert, the chunk goes one row at a time and takes
    that writer's row: no duplicate, no error."""
    monkeypatch.setattr(T, "PREFETCH_ROWS", 2)
    rows = [{"prompt": f"p{i % 3}", "id": f"r{i}", "responses": [f"a{i % 2}", f"b{i}"]}
            for i in range(5)]  # p0, p1 given twice: made once, the first row's id kept
    with store.write() as s:
        b = T.get_or_create_batch(s, "chunks")
        made = T.create_tasks_from_candidates(s, rows, batch=b)
        assert len(made) == 5
        prompts = {p.text: p.external_id for p in s.scalars(select(S.Prompt))}
        assert prompts == {"p0": "r0", "p1": "r1", "p2": "r2"}
        assert s.scalar(select(func.count()).select_from(S.Response)) == 4 + 4 + 2
        skipped: list[int] = []
        assert T.create_tasks_from_candidates(s, rows, batch=b, skipped=skipped) == []
        assert sorted(skipped) == sorted(t.id for t in made)
    real = T._found_or_made

    def racing(session, model, wanted, query, key_of, make):
        # The other writer's row is not seen by the lookup, so the insert collides with it.
        return real(session, model, wanted, lambda keys: query([]), key_of, make)

    monkeypatch.setattr(T, "_found_or_made", racing)
    with store.write() as s:
        b = T.get_or_create_batch(s, "race")
        made = T.create_tasks_from_candidates(s, rows[:2] + [
            {"prompt": "p9", "responses": ["a0", "new"]}], batch=b)
        assert len(made) == 3
        assert s.scalar(select(func.count()).select_from(S.Prompt)) == 4
        assert s.scalar(select(func.count()).select_from(S.Response).where(
            S.Response.text == "a0")) == 4  # p0's, p1's, p2's and the new p9's


@pytest.mark.slow
def test_concurrent_annotators_exact_counts(store) -> None:
    overlap, n_tasks, n_workers = 2, 30, 6
    ids = _make_tasks(store, n_tasks, overlap=overlap)
    anns = _annotators(store, [f"w{i}" for i in range(n_workers)])
    errors: list[BaseException] = []
    done_by: dict[str, list[int]] = {}

    def work(ann) -> None:
        mine = done_by.setdefault(ann.name, [])
        try:
            for _ in range(n_tasks + 5):
                with store.write() as s:
                    lease = Q.next_task(s, ann)
                    if lease is None:
                        return
                    order = lease.shown_order
                    task_id = lease.task_id
                with store.write() as s:
                    Q.submit_judgment(s, ann, task_id, [[order[0]], [order[1]]],
                                      idempotency_key=uuid.uuid4().hex)
                mine.append(task_id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a,)) for a in anns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(len(v) for v in done_by.values()) == n_tasks * overlap
    for v in done_by.values():
        assert len(v) == len(set(v))  # nobody judged a task twice
    with store.read() as s:
        counts = dict(s.execute(select(S.Judgment.task_id, func.count())
                                .group_by(S.Judgment.task_id)).all())
        assert counts == dict.fromkeys(ids, overlap)
        assert all(t.done and t.n_judgments == overlap for t in s.scalars(select(S.ComparisonTask)))


def test_gold_tasks_are_spread_between_the_others(store, tmp_path) -> None:
    """Audit s12 concurrency F5: gold tasks made after all the others were handed out last
    (work goes oldest first), so half the annotators never met one."""
    import json

    from typer.testing import CliRunner

    from rewardloop.cli import app

    cands, gold = tmp_path / "c.jsonl", tmp_path / "g.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]})
                             + "\n" for i in range(9)))
    gold.write_text("".join(json.dumps({"prompt": f"g{i}", "responses": ["good", "bad"],
                                        "ranking": [[0], [1]]}) + "\n" for i in range(2)))
    result = CliRunner().invoke(app, ["tasks", "create", str(cands), "--gold", str(gold),
                                      "--db", store.url])
    assert result.exit_code == 0, result.output
    with store.read() as s:
        order = [t.is_gold for t in s.scalars(select(S.ComparisonTask)
                                              .order_by(S.ComparisonTask.id))]
    assert order == [False] * 3 + [True] + [False] * 3 + [True] + [False] * 3


def test_a_task_judged_or_skipped_is_refused_before_its_ranking_is_read(store) -> None:
    """Audit s12 concurrency F4: a bad ranking for a task the caller had judged or skipped was
    a 422 that listed the task's response ids, not the 409/403 of anyone else."""
    with store.write() as s:
        ann = S.Annotator(name="ann")
        s.add(ann)
        rows = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(2)]
        T.create_tasks_from_candidates(s, rows, overlap=2)
    with store.write() as s:
        first = Q.next_task(s, ann.id)
        Q.submit_judgment(s, ann.id, first.task_id, [[first.shown_order[0]],
                                                     [first.shown_order[1]]],
                          idempotency_key="k1")
        second = Q.next_task(s, ann.id)
        Q.skip_task(s, ann.id, second.task_id)
    for task_id, status in ((first.task_id, 409), (second.task_id, 403)):
        with pytest.raises(T.TaskError) as caught, store.write() as s:
            Q.submit_judgment(s, ann.id, task_id, [[1], [2]], idempotency_key=f"x{task_id}")
        assert caught.value.status == status and "ranking" not in str(caught.value)
