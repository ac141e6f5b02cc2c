"""Group commit: one writer thread runs the server's write operations, many per transaction.

A durable commit costs an fsync (SQLite ``synchronous=FULL``; PostgreSQL likewise), several
milliseconds on ordinary disks, so one transaction per request caps a server at a few hundred
writes per second however fast the code is. Here each request hands its operation to the writer
and waits; the writer takes every operation queued (up to ``max_batch``), runs each in its own
SAVEPOINT (a failing one is rolled back alone and its error goes back to its request), commits
once, and only then answers them all. An acknowledged write is therefore committed, and the
operations still run strictly one after another, so ``feedback.tasks`` sees no concurrency.
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

    def run(self, fn: Callable[[Session], R], timeout: float = 60.0) -> R:
        """Run ``fn`` in a write transaction; returns its result once committed (or raises)."""
        future: Future[R] = Future()
        self._queue.put((fn, future))
        return future.result(timeout=timeout)

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

    def _commit(self, ops: list[tuple[Callable[[Session], Any], Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self.store.write() as session:
                for fn, _ in ops:
                    try:
                        with session.begin_nested():
                            outcomes.append((True, fn(session)))
                    except Exception as exc:  # goes back to the request that sent it
                        outcomes.append((False, exc))
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
