"""POST /api/admin/tasks makes each comparison once and bounds its work; the export says what
it left out."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from rewardloop.app import api
from rewardloop.data import schema as S
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T


def _tasks(server) -> int:
    with server.store.read() as s:
        return s.scalar(select(func.count(S.ComparisonTask.id)))


def test_the_same_upload_twice_makes_its_tasks_once(server) -> None:
    admin = server.client("admin")
    body = {"rows": [{"prompt": "p", "responses": ["a", "b", "c"]}], "batch": "r1"}
    first = admin.post("/api/admin/tasks", json=body)
    assert first.status_code == 201 and first.json()["created"] == 3
    assert first.json()["skipped_task_ids"] == []
    before = _tasks(server)
    again = admin.post("/api/admin/tasks", json=body)  # a retry after a timeout
    assert again.status_code == 201
    assert again.json()["created"] == 0 and again.json()["task_ids"] == []
    assert again.json()["skipped_task_ids"] == first.json()["task_ids"]
    assert _tasks(server) == before
    other = admin.post("/api/admin/tasks", json={**body, "batch": "r2"})  # a new round
    assert other.json()["created"] == 3


def test_repeated_and_reversed_rows_make_one_task(sqlite_store) -> None:
    rows = [{"prompt": "p", "responses": ["a", "b"]}, {"prompt": "p", "responses": ["a", "b"]},
            {"prompt": "p", "responses": ["b", "a"]}]
    for batch_name in ("b", None):
        with sqlite_store.write() as s:
            batch = T.get_or_create_batch(s, batch_name) if batch_name else None
            skipped: list[int] = []
            made = T.create_tasks_from_candidates(s, rows, batch=batch, skipped=skipped)
            assert len(made) == 1 and skipped == [made[0].id] * 2
    with sqlite_store.write() as s:  # the ranking of the same answers is another comparison
        made = T.create_tasks_from_candidates(s, rows, kind="ranking",
                                              batch=T.get_or_create_batch(s, "b"))
        assert len(made) == 1
    with sqlite_store.write() as s:  # and one annotator judges the pair once
        ann = S.Annotator(name="ann")
        s.add(ann)
        s.flush()
        seen = []
        while (lease := Q.next_task(s, ann, batch=T.get_or_create_batch(s, "b"))) is not None:
            seen.append(lease.task_id)
            Q.submit_judgment(s, ann, lease.task_id, [[i] for i in lease.shown_order],
                              idempotency_key=str(lease.task_id))
        assert len(seen) == 2  # the pair and the ranking, each once


def test_an_upload_that_makes_too_many_tasks_is_refused(server) -> None:
    admin = server.client("admin")
    wide = {"prompt": "p", "responses": [f"a{i}" for i in range(33)]}
    r = admin.post("/api/admin/tasks", json={"rows": [wide], "batch": "w"})
    assert r.status_code == 422
    assert "pairing=all makes 528 pairs" in r.json()["detail"]
    assert "rows:line 1" in r.json()["detail"]
    r = admin.post("/api/admin/tasks", json={"rows": [wide], "batch": "w", "pairing": "adjacent"})
    assert r.status_code == 201 and r.json()["created"] == 32
    rows = [{"prompt": f"p{i}", "responses": [f"a{j}" for j in range(32)]} for i in range(21)]
    before = _tasks(server)
    r = admin.post("/api/admin/tasks", json={"rows": rows, "batch": "big"})
    assert r.status_code == 413
    assert "10416 tasks, more than 10000 per request" in r.json()["detail"]
    assert _tasks(server) == before


def test_a_large_upload_is_written_in_chunks_and_checked_first(server, monkeypatch) -> None:
    """Each chunk is its own write (others' writes go in between); gold rows and error lines
    keep their place in the whole upload; a bad row refuses the upload before any write."""
    monkeypatch.setattr(api, "CHUNK_TASKS", 2)
    writes = []
    real = server.app.state.db.run
    monkeypatch.setattr(server.app.state.db, "run", lambda fn, *a: writes.append(1) or real(fn, *a))
    admin = server.client("admin")
    rows = [{"prompt": f"q{i}", "responses": ["x", "y"]} for i in range(5)]
    before = _tasks(server)
    bad = [*rows, {"prompt": "q", "responses": ["x", "x"]}]
    r = admin.post("/api/admin/tasks", json={"rows": bad, "batch": "c"})
    assert r.status_code == 422 and "rows:line 6" in r.json()["detail"]
    assert writes == [] and _tasks(server) == before
    r = admin.post("/api/admin/tasks", json={"rows": rows, "batch": "c",
                                             "gold": {"3": [[1], [0]]}})
    assert r.status_code == 201 and r.json()["created"] == 5
    assert len(writes) == 3
    with server.store.read() as s:
        tasks = [s.get(S.ComparisonTask, t) for t in r.json()["task_ids"]]
        assert [t.is_gold for t in tasks] == [False, False, False, True, False]
        prompt = s.scalar(select(S.Prompt.text).where(S.Prompt.id == tasks[3].prompt_id))
        assert prompt == "q3"


@pytest.mark.parametrize(("fmt", "ties"), [("trl", 1), ("ranking", 0)])
def test_the_export_says_how_many_tied_pairs_it_left_out(server, fmt, ties) -> None:
    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    tie = [[x["id"] for x in lease["responses"]]]
    r = ann.post("/api/judgments", json={"task_id": lease["task_id"], "ranking": tie,
                                         "idempotency_key": "k"})
    assert r.status_code == 201
    r = server.client("admin").get(f"/api/admin/export?format={fmt}")
    assert r.status_code == 200
    assert r.headers["X-Rewardloop-Skipped-Ties"] == str(ties)
    assert r.headers["X-Rewardloop-Skipped"] == str(ties)
    assert len(r.text.splitlines()) == 1 - ties


@pytest.mark.parametrize(("bad", "field"), [
    ({"prompt": "p9", "responses": ["a\x00", "b"]}, "responses[0]"),
    ({"prompt": "p9", "responses": ["a", "b"], "models": ["m" * 300, None]}, "models[0]"),
    ({"prompt": "p9", "responses": ["a", "b"], "id": "i" * 300}, "id"),
])
def test_a_row_the_database_would_refuse_is_found_before_any_chunk_is_written(
        server, monkeypatch, bad: dict, field: str) -> None:
    """Uploads are written in chunks: a bad fifth row must not leave four rows' tasks."""
    monkeypatch.setattr(api, "CHUNK_TASKS", 1)
    rows = [{"prompt": f"p{i}", "responses": ["a", "b"]} for i in range(4)] + [bad]
    before = _tasks(server)
    r = server.client("admin").post("/api/admin/tasks", json={"rows": rows, "batch": "c"})
    assert r.status_code == 422, r.text
    assert "line 5" in r.text and field in r.text
    assert _tasks(server) == before
