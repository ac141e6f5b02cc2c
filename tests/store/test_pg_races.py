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
from rewardloop.data.prepared import Driver
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


def test_the_server_does_not_wait_behind_a_long_upload_into_the_batch(store) -> None:
    """Review of F0's fix: the server's writer thread waited for a `tasks create` filling the
    same batch, and every request queued behind it with it; the server's upload is refused
    (503, try again) instead."""
    with store.write() as s:
        T.get_or_create_batch(s, "r1")

    def server_upload() -> int:
        with store.write() as s:
            batch = s.scalar(select(S.Batch).where(S.Batch.name == "r1"))
            return len(T.create_tasks_from_candidates(s, ROWS[2:], batch=batch,
                                                      wait_for_batch=False))

    if not _concurrent(store):
        assert server_upload() == 6
        return
    with store.write() as s:  # the long `tasks create`
        batch = s.scalar(select(S.Batch).where(S.Batch.name == "r1"))
        T.create_tasks_from_candidates(s, ROWS[:2], batch=batch)
        with pytest.raises(T.TaskError, match="another upload") as refused:
            server_upload()
        assert refused.value.status == 503
    assert server_upload() == 6


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
        time.sleep(0.1)  # the other worker's group commits within the claim's wait
    assert second() == task_id
    # Held past the wait (CLAIM_WAIT_MS): "nothing left" after the wait, not a hang or an
    # error, and the claim's transaction goes on (its lock timeout put back).
    with store.write() as s:
        s.execute(select(S.ComparisonTask.id).where(S.ComparisonTask.id == task_id)
                  .with_for_update())
        with store.write() as w:
            ann = w.scalar(select(S.Annotator).where(S.Annotator.name == "ann"))
            started = time.monotonic()
            assert Q.next_task(w, ann) is None
            assert Q.CLAIM_WAIT_MS / 1000 <= time.monotonic() - started < 5
            assert w.scalar(select(func.current_setting("lock_timeout"))) == "0"


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


LOCK = "SELECT id FROM tasks WHERE id = %s FOR UPDATE"


def _two_tasks(store) -> tuple[int, int]:
    """Two tasks' ids, for two writers to lock in opposite orders (PostgreSQL only)."""
    if not _concurrent(store):
        pytest.skip("SQLite runs one writer at a time: no deadlock")
    with store.write() as s:
        T.create_tasks_from_candidates(s, ROWS[:2], kind="ranking")
    with store.read() as s:
        first, second = s.scalars(select(S.ComparisonTask.id).order_by(S.ComparisonTask.id))
    return first, second


def test_a_real_deadlock_between_two_workers_is_a_503(store) -> None:
    """F1 as it happens: the queue's row locks are taken on the driver connection, so
    PostgreSQL's deadlock error arrives unwrapped; the group's op and its re-run both lose."""
    first, second = _two_tasks(store)

    def other_worker(ready: threading.Event, go: threading.Event) -> None:
        with store.write() as s:
            raw = Driver(s).raw
            raw.execute(LOCK, (second,))
            ready.set()
            go.wait(10)
            time.sleep(0.2)
            raw.execute(LOCK, (first,))

    def op(s) -> str:  # locks first then second; the other worker the other way round
        ready, go = threading.Event(), threading.Event()
        threading.Thread(target=other_worker, args=(ready, go)).start()
        ready.wait(10)
        raw = Driver(s).raw
        raw.execute(LOCK, (first,))
        go.set()
        raw.execute(LOCK, (second,))
        return "written"

    writer = GroupWriter(store)
    try:
        outcome = writer.submit(op)
        try:
            got: object = outcome.result(timeout=60)
        except Exception as exc:  # noqa: BLE001 (what the request would get)
            got = exc
    finally:
        writer.close()
    assert got == "written" or isinstance(got, WriterUnavailable), repr(got)


def test_two_workers_groups_take_turns_instead_of_deadlocking(store) -> None:
    """Two server workers' writers whose groups lock the same two tasks in opposite orders: on
    PostgreSQL the second group waits for the first to commit (``writer.take_turn``) instead
    of deadlocking (which cost a second at ``deadlock_timeout`` and a 503)."""
    first, second = _two_tasks(store)
    a_locked, b_locked = threading.Event(), threading.Event()
    errors: list[str] = []

    def locking(ids: tuple[int, int], mine: threading.Event, theirs: threading.Event,
                wait_first: bool):
        def op(s) -> str:
            raw = Driver(s).raw
            if wait_first:  # (bounded: this group may have got the turn first)
                theirs.wait(2)
            raw.execute(LOCK, (ids[0],))
            mine.set()
            if not wait_first:
                theirs.wait(2)  # the other group cannot start before this one commits
            try:
                raw.execute(LOCK, (ids[1],))
            except Exception as exc:
                errors.append(type(exc).__name__)
                raise
            return "written"
        return op

    writers = [GroupWriter(store), GroupWriter(store)]
    try:
        a = writers[0].submit(locking((first, second), a_locked, b_locked, False))
        b = writers[1].submit(locking((second, first), b_locked, a_locked, True))
        assert a.result(timeout=60) == "written" and b.result(timeout=60) == "written"
    finally:
        for w in writers:
            w.close()
    assert errors == []


def test_a_group_that_gets_no_turn_is_a_503_after_one_wait(store, monkeypatch) -> None:
    """Another worker's group holding the turn past TURN_TIMEOUT_S: the group's requests get
    503 after one wait, not after a second one in the op-by-op re-run (review s13 M3)."""
    if not _concurrent(store):
        pytest.skip("SQLite runs one writer at a time: no turns to take")
    from rewardloop.app import writer as W

    monkeypatch.setattr(W, "TURN_TIMEOUT_S", 1)
    holding, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        with store.write() as s:
            W.take_turn(s)
            holding.set()
            release.wait(20)

    done = _in_thread(other_worker)
    holding.wait(10)
    writer = GroupWriter(store)
    try:
        t0 = time.monotonic()
        with pytest.raises(WriterUnavailable, match="try again"):
            writer.submit(lambda s: "written").result(timeout=30)
        waited = time.monotonic() - t0
    finally:
        release.set()
        done()
        writer.close()
    assert 0.9 <= waited < 1.9, waited
