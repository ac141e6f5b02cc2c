"""The group-commit writer: many operations per transaction, a failing one rolled back alone."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, select

from rewardloop.app.writer import GroupWriter
from rewardloop.data import schema as S
from rewardloop.data.store import Store


def _add(name: str, fail: bool = False):
    def op(session):
        session.add(S.Annotator(name=name))
        session.flush()  # written before failing: must not survive
        if fail:
            raise ValueError(f"refused {name}")
        return name

    return op


def test_group_is_committed_once_and_a_failing_op_is_rolled_back_alone(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    writer = GroupWriter(store)
    commits: list[int] = []
    rollbacks: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    event.listen(store.engine, "rollback", lambda _conn: rollbacks.append(1))
    gate, started = threading.Event(), threading.Event()

    def hold(_session):  # keeps the writer busy while the next group queues up
        started.set()
        gate.wait(10)

    first = writer.submit(hold)
    started.wait(10)
    futures = [writer.submit(_add("a")), writer.submit(_add("bad", fail=True)),
               writer.submit(_add("b"))]
    gate.set()
    first.result(10)
    assert futures[0].result(10) == "a" and futures[2].result(10) == "b"
    with pytest.raises(ValueError, match="refused bad"):
        futures[1].result(10)
    writer.close()
    # One commit for the holding operation, one for the group of three; the group's first
    # attempt (no savepoints) was rolled back once when "bad" raised.
    assert (len(commits), len(rollbacks)) == (2, 1)
    with store.read() as s:
        assert sorted(s.scalars(select(S.Annotator.name))) == ["a", "b"]
    store.dispose()


def test_run_returns_after_commit_and_raises_the_ops_error(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    writer = GroupWriter(store)
    assert writer.run(_add("x")) == "x"
    with store.read() as s:  # visible to a fresh reader: committed
        assert s.scalar(select(S.Annotator.name)) == "x"
    with pytest.raises(ValueError):
        writer.run(_add("y", fail=True))
    writer.close()
    with store.read() as s:
        assert list(s.scalars(select(S.Annotator.name))) == ["x"]
    store.dispose()


def test_refused_api_requests_do_not_make_the_group_run_again(server, monkeypatch) -> None:
    """A bad token or a refused judgment is answered without rolling back and re-running the
    group commit it shared with other requests (the writer's slow path)."""
    from rewardloop.app.writer import GroupWriter as W

    isolated: list[int] = []
    original = W._attempt

    def spy(self, ops, isolate):
        if isolate:
            isolated.append(len(ops))
        return original(self, ops, isolate)

    monkeypatch.setattr(W, "_attempt", spy)
    bad = server.client()
    assert bad.get("/api/tasks/next", headers={"Authorization": "Bearer nope"}).status_code == 401
    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    ids = [r["id"] for r in lease["responses"]]
    body = {"task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]], "idempotency_key": "k"}
    assert ann.post("/api/judgments", json=body).status_code == 201
    again = {**body, "idempotency_key": "k2"}
    assert ann.post("/api/judgments", json=again).status_code == 409  # already judged
    assert ann.get("/api/tasks/next", params={"batch": "missing"}).status_code == 404
    assert ann.post("/api/tasks/999/skip").status_code == 404  # not leased to ann
    page, _ = server.login("bob")
    assert page.get("/annotate", params={"batch": "missing"}).status_code == 404
    assert isolated == []
