"""Group commit: one writer thread runs the server's write operations, many per transaction.

A durable commit costs an fsync (SQLite ``synchronous=FULL``; PostgreSQL likewise), several
milliseconds on ordinary disks, so one transaction per request caps a server at a few hundred
writes per second however fast the code is. Here each request hands its operation to the writer
and waits; the writer takes every operation queued (up to ``max_batch``), runs them one after
another in one transaction, commits once, and only then answers them all. If one raises, the
group is rolled back and run again with each operation in its own SAVEPOINT, so the failing one
is rolled back alone and its error goes back to its request. An acknowledged write is therefore
committed, and the operations run strictly one after another, so ``feedback.queue`` sees no
concurrency. Operations may run twice, so they must not act outside the session.

Several server workers (``serve --workers N``) each have a writer. SQLite runs one write
transaction at a time anyway; on PostgreSQL each group first waits for its turn (a
transaction-scoped advisory lock, ``take_turn``), so the workers' groups do not run at once
either. Two groups that lock the same rows in different orders used to deadlock, and
PostgreSQL broke the tie only after its ``deadlock_timeout`` (1 s) by failing one of them.
Writers outside the server (``tasks create``, the loop) do not take turns: a long upload must
not stall the server.

The thread must outlive anything an operation or its caller does: an operation whose caller
gave up (its future cancelled, e.g. after a write timeout) is skipped, and an error anywhere in
a round fails that round's requests and the thread carries on. If it stops anyway, ``alive``
says so (``/healthz`` reports it) and new writes are refused at once instead of waiting forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rewardloop.data.store import Store

log = logging.getLogger(__name__)
R = TypeVar("R")
Op = tuple[Callable[[Session], Any], Future[Any]]


class WriterUnavailable(RuntimeError):
    """A write was not done: the writer is stopped, or it did not get to it in time."""


TRANSIENT_SQLSTATES = {"40P01": "deadlock", "40001": "serialization failure",
                       "55P03": "lock not available"}
"""PostgreSQL errors that say nothing about the request: the same write may succeed at once."""


def transient(exc: BaseException) -> str | None:
    """What made the database refuse ``exc``'s write for the moment, or None when it is an
    answer to the request itself (a refused judgment, a broken constraint)."""
    # The driver's own error (the queue's prepared statements run on the driver connection),
    # or SQLAlchemy's wrapper around it.
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate",
                                                         None)
    return TRANSIENT_SQLSTATES.get(sqlstate) if isinstance(sqlstate, str) else None


TURN_TIMEOUT_S = 10
"""How long a group waits for the other server workers' groups on PostgreSQL before its requests
are answered 503 (lock not available: try again)."""


def take_turn(session: Session) -> None:
    """On PostgreSQL, wait until no other server worker's group commit is running: a lock held
    until this transaction ends, keyed by the schema (stores sharing one database in schemas of
    their own do not wait for each other), waited for at most ``TURN_TIMEOUT_S``."""
    if session.get_bind().dialect.name != "postgresql":
        return
    key = func.hashtextextended(func.concat("rewardloop-writer:", func.current_schema()), 0)
    before = session.scalar(select(func.current_setting("lock_timeout")))
    session.execute(select(func.set_config("lock_timeout", f"{TURN_TIMEOUT_S}s", True)))
    try:
        session.execute(select(func.pg_advisory_xact_lock(key)))
    except Exception as exc:
        if transient(exc):  # not the group's fault: no run again op by op (another wait)
            raise WriterUnavailable(f"the other server workers' writes held the database for "
                                    f"over {TURN_TIMEOUT_S} s; try again") from exc
        raise
    session.execute(select(func.set_config("lock_timeout", before, True)))


def _busy(exc: BaseException) -> BaseException:
    """``exc``, or the 503 it stands for when the database only refused for the moment."""
    why = transient(exc)
    return WriterUnavailable(f"the database was busy ({why}); try again") if why else exc


class GroupWriter:
    """Runs ``fn(session)`` callables on one thread, committing them in groups."""

    def __init__(self, store: Store, max_batch: int = 128) -> None:
        self.store, self.max_batch = store, max_batch
        self._queue: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="rewardloop-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the writer thread is running (False after ``close`` or if it died)."""
        return self._thread.is_alive() and not self._closed

    def submit(self, fn: Callable[[Session], R]) -> Future[R]:
        """Queue ``fn``; the future resolves to its result once committed (or to its error).
        Cancelling the future before the writer starts ``fn`` means ``fn`` never runs."""
        if not self.alive:
            raise WriterUnavailable("the database writer is stopped")
        future: Future[R] = Future()
        self._queue.put((fn, future))
        return future

    def run(self, fn: Callable[[Session], R], timeout: float = 30.0) -> R:
        """Run ``fn`` in a write transaction; returns its result once committed (or raises).

        WriterUnavailable if it has not started within ``timeout`` seconds (it then never
        runs, so the caller may safely report failure); once started it is waited for."""
        future = self.submit(fn)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            if future.cancel():
                raise WriterUnavailable(f"the database did not take the write within "
                                        f"{timeout:g} s") from None
            return future.result()

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self) -> tuple[list[Op], bool]:
        first = self._queue.get()
        if first is None:
            return [], True
        ops = [first]
        while len(ops) < self.max_batch:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if op is None:
                return ops, True
            ops.append(op)
        return ops, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            ops, stop = self._take()
            # Claim each future; a cancelled one's caller has gone, so its op is skipped.
            ops = [op for op in ops if op[1].set_running_or_notify_cancel()]
            if not ops:
                continue
            try:
                self._commit(ops)
            except BaseException as exc:  # noqa: BLE001 (the thread must survive anything)
                log.exception("writer round of %d operations failed", len(ops))
                for _, future in ops:
                    if not future.done():
                        future.set_exception(exc)

    def _attempt(self, ops: list[Op], isolate: bool) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self.store.write() as session:
            take_turn(session)
            for fn, _ in ops:
                if not isolate:  # any error escapes and rolls the whole group back
                    outcomes.append((True, fn(session)))
                    continue
                try:
                    with session.begin_nested():
                        outcomes.append((True, fn(session)))
                except Exception as exc:  # goes back to the request that sent it
                    outcomes.append((False, exc))
        return outcomes

    def _commit(self, ops: list[Op]) -> None:
        try:
            try:
                outcomes = self._attempt(ops, isolate=False)
            except WriterUnavailable as exc:  # no turn: every request of the group gets 503
                for _, future in ops:
                    future.set_exception(exc)
                return
            except Exception:
                # An operation failed, and what it wrote before failing cannot be told apart
                # from the others' writes: roll the group back and run it again with each
                # operation in its own SAVEPOINT. Errors are rare (a replayed or refused
                # judgment), so the common case pays for no savepoints at all.
                outcomes = self._attempt(ops, isolate=True)
            # The database gave up on an operation, not the request (PostgreSQL broke a
            # deadlock between two workers' groups): the client is told to try again (503).
            outcomes = [(ok, value if ok else _busy(value)) for ok, value in outcomes]
        except Exception as exc:
            log.exception("group commit of %d operations failed", len(ops))
            for _, future in ops:
                future.set_exception(_busy(exc))
            return
        for (_, future), (ok, value) in zip(ops, outcomes, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
