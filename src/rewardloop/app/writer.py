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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from rewardloop.data.store import Store

log = logging.getLogger(__name__)
R = TypeVar("R")


class GroupWriter:
    """Runs ``fn(session)`` callables on one thread, committing them in groups."""

    def __init__(self, store: Store, max_batch: int = 128) -> None:
        self.store, self.max_batch = store, max_batch
        self._queue: queue.SimpleQueue[tuple[Callable[[Session], Any], Future[Any]] | None] = \
            queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="rewardloop-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[Session], R]) -> Future[R]:
        """Queue ``fn``; the future resolves to its result once committed (or to its error)."""
        future: Future[R] = Future()
        self._queue.put((fn, future))
        return future

    def run(self, fn: Callable[[Session], R], timeout: float = 60.0) -> R:
        """Run ``fn`` in a write transaction; returns its result once committed (or raises)."""
        return self.submit(fn).result(timeout=timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _take(self) -> tuple[list[tuple[Callable[[Session], Any], Future[Any]]], bool]:
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
            if ops:
                self._commit(ops)

    def _attempt(self, ops: list[tuple[Callable[[Session], Any], Future[Any]]],
                 isolate: bool) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with self.store.write() as session:
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

    def _commit(self, ops: list[tuple[Callable[[Session], Any], Future[Any]]]) -> None:
        try:
            try:
                outcomes = self._attempt(ops, isolate=False)
            except Exception:
                # An operation failed, and what it wrote before failing cannot be told apart
                # from the others' writes: roll the group back and run it again with each
                # operation in its own SAVEPOINT. Errors are rare (a replayed or refused
                # judgment), so the common case pays for no savepoints at all.
                outcomes = self._attempt(ops, isolate=True)
        except Exception as exc:
            log.exception("group commit of %d operations failed", len(ops))
            for _, future in ops:
                future.set_exception(exc)
            return
        for (_, future), (ok, value) in zip(ops, outcomes, strict=True):
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
