"""Races between two writers that PostgreSQL lets run at once (SQLite runs its writers one at a
time): each test holds one transaction open at the racy point and runs the other beside it
(audit s12, concurrency: F0-F3). On SQLite the same steps run one after the other."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from rewardloop.app.writer import GroupWriter, WriterUnavailable
from rewardloop.data import schema as S
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T

ROWS = [{"prompt": f"Q{i}?", "responses": [f"a{i}", f"b{i}", f"c{i}"]} for i in range(4)]


def _in_thread(fn):
    """Start ``fn`` on a thread; returns a function that joins it and gives its result."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed back to the test)
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def result():
        thread.join(timeout=30)
        assert not thread.is_alive(), "the second writer never finished"
        if "error" in out:
            raise out["error"]  # type: ignore[misc]
        return out.get("value")
    return result


def _concurrent(store) -> bool:
    return store.dialect == "postgresql"


def test_the_same_upload_twice_at_once_makes_each_comparison_once(store) -> None:
    """F0: both requests found the comparisons missing and both made them (1,707 tasks for
    1,200 comparisons); the second now waits for the first and skips what it made."""
    with store.write() as s:  # the prompts and answers exist already (an earlier round)
        T.create_tasks_from_candidates(s, ROWS, batch=T.get_or_create_batch(s, "r1"))
        T.get_or_create_batch(s, "r2")

    def upload() -> int:
        with store.write() as s:
            batch = s.scalar(select(S.Batch).where(S.Batch.name == "r2"))
            return len(T.create_tasks_from_candidates(s, ROWS, batch=batch))

    if not _concurrent(store):
        assert (upload(), upload()) == (12, 0)
        return
    with store.write() as s:
        batch = s.scalar(select(S.Batch).where(S.Batch.name == "r2"))
        assert len(T.create_tasks_from_candidates(s, ROWS, batch=batch)) == 12
        second = _in_thread(upload)
        time.sleep(0.5)  # the second is inside create_tasks_from_candidates now
    assert second() == 0
    with store.read() as s:
        made = s.scalar(select(func.count()).select_from(S.ComparisonTask)
                        .join(S.Batch).where(S.Batch.name == "r2"))
    assert made == 12


def test_a_task_with_room_locked_by_another_writer_is_waited_for(store) -> None:
    """F2: a submit or renewal holding the only open task's row made the claim skip it and say
    nothing is left; it now waits for that row."""
    with store.write() as s:
        (task,) = T.create_tasks_from_candidates(s, ROWS[:1], kind="ranking", overlap=5)
        for name in ("ann", "bob"):
            s.add(S.Annotator(name=name))
    task_id = task.id

    def lease_for_bob() -> int | None:
        with store.write() as s:
            bob = s.scalar(select(S.Annotator).where(S.Annotator.name == "bob"))
            lease = Q.next_task(s, bob)
            return lease.task_id if lease is not None else None

    if not _concurrent(store):
        assert lease_for_bob() == task_id
        return
    with store.write() as s:
        s.execute(select(S.ComparisonTask.id).where(S.ComparisonTask.id == task_id)
                  .with_for_update())  # as a submit's or a renewal's lock holds it
        second = _in_thread(lease_for_bob)
        time.sleep(0.5)
    assert second() == task_id


def test_one_read_sees_one_state_of_the_store(store) -> None:
    """F3: the admin page's counts came from statements that each saw a newer state."""
    with store.write() as s:
        s.add(S.Annotator(name="ann"))
    with store.read() as s:
        before = s.scalar(select(func.count()).select_from(S.Annotator))
        with store.write() as w:  # another request commits in between
            w.add(S.Annotator(name="bob"))
        after = s.scalar(select(func.count()).select_from(S.Annotator))
    assert before == after == 1
    with store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.Annotator)) == 2


class _Deadlock(Exception):
    sqlstate = "40P01"


@pytest.mark.parametrize("isolated", [False, True])
def test_a_write_the_database_gave_up_on_is_a_503_not_a_500(sqlite_store, isolated) -> None:
    """F1: PostgreSQL breaking a deadlock between two workers' groups reached the request as a
    500 with a traceback; it is WriterUnavailable now (503 + Retry-After: try again), while
    the other operations of the group are written."""
    writer = GroupWriter(sqlite_store)
    calls = {"n": 0}

    def deadlocked(s) -> None:
        calls["n"] += 1
        if isolated or calls["n"] == 1:  # once in the group, or in its isolated re-run too
            raise OperationalError("SELECT ... FOR UPDATE", {}, _Deadlock("deadlock detected"))

    def fine(s) -> str:
        s.add(S.Annotator(name="ann"))
        return "ok"

    try:
        futures = [writer.submit(deadlocked), writer.submit(fine)]
        with pytest.raises(WriterUnavailable, match="busy") if isolated else nullcontext():
            futures[0].result(timeout=10)
        assert futures[1].result(timeout=10) == "ok"
    finally:
        writer.close()
    with sqlite_store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.Annotator)) == 1
