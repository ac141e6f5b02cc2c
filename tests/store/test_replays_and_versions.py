"""feedback.queue: a judgment sent twice at once is one judgment answered twice; a judgment
records the guideline version its lease was shown with."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from rewardloop.data import schema as S
from rewardloop.data.store import Store
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T


def _one_task(store: Store, overlap: int = 2) -> tuple[int, int]:
    """(task id, annotator id): one pairwise task in batch ``b`` (guidelines v1) and ``ann``."""
    with store.write() as s:
        batch = T.get_or_create_batch(s, "b", guidelines="one", guideline_version="v1")
        p = T.get_or_create_prompt(s, "p")
        task = T.create_task(s, p, [T.get_or_create_response(s, p, t) for t in "xy"],
                             overlap=overlap, batch=batch)
        ann = S.Annotator(name="ann")
        s.add(ann)
        s.flush()
        return task.id, ann.id


def _lease(store: Store, aid: int, **kw) -> Q.Lease:
    with store.write() as s:
        lease = Q.next_task(s, aid, **kw)
    assert lease is not None
    return lease


def _set_guidelines(store: Store, text: str, version: str) -> None:
    with store.write() as s:
        T.get_or_create_batch(s, "b", guidelines=text, guideline_version=version)


def test_a_key_missed_by_a_stale_lookup_is_replayed_not_refused(store, monkeypatch) -> None:
    """The second of two same-key requests can miss the key (another worker's transaction had
    not committed yet) and then find the task judged: it answers the stored judgment."""
    tid, aid = _one_task(store)
    ranking = [[i] for i in _lease(store, aid).shown_order]
    with store.write() as s:
        first, created = Q.submit_judgment(s, aid, tid, ranking, idempotency_key="k")
    assert created
    real, misses = Q._by_key, [1]

    def stale_once(*args):  # the first lookup of a request misses, as in a stale snapshot
        return None if misses and misses.pop() else real(*args)

    monkeypatch.setattr(Q, "_by_key", stale_once)
    with store.write() as s:
        again, created = Q.submit_judgment(s, aid, tid, ranking, idempotency_key="k")
    assert not created and again == first
    misses.append(1)
    with store.write() as s, pytest.raises(T.TaskError, match="already judged") as err:
        Q.submit_judgment(s, aid, tid, ranking, idempotency_key="other")  # a new key: refused
    assert err.value.status == 409
    with store.read() as s:
        assert s.scalar(select(func.count(S.Judgment.id))) == 1


@pytest.mark.postgres
def test_two_workers_same_key_at_once_on_postgresql(db_url: str) -> None:
    """Two stores (two server workers): the second request arrives while the first holds the
    task row in its open transaction; once the first commits, the second replays it."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite runs one writer at a time: the race cannot happen there")
    w1, w2 = Store(db_url), Store(db_url, migrate=False)
    try:
        tid, aid = _one_task(w1)
        ranking = [[i] for i in _lease(w1, aid).shown_order]
        in_first, out = threading.Event(), {}

        def second() -> None:
            in_first.wait()
            try:
                with w2.write() as s:
                    out["second"] = Q.submit_judgment(s, aid, tid, ranking,
                                                      idempotency_key="k")
            except T.TaskError as exc:
                out["second"] = exc

        thread = threading.Thread(target=second)
        thread.start()
        with w1.write() as s:
            out["first"] = Q.submit_judgment(s, aid, tid, ranking, idempotency_key="k")
            in_first.set()
            thread.join(timeout=1.0)  # blocked on the task's row lock until this commits
            assert thread.is_alive()
        thread.join(timeout=30)
        assert out["first"][1] is True
        assert out["second"] == (out["first"][0], False)
        with w1.read() as s:
            assert s.scalar(select(func.count(S.Judgment.id))) == 1
    finally:
        w1.dispose()
        w2.dispose()


def test_the_judgment_records_the_version_shown_with_the_lease(store) -> None:
    tid, aid = _one_task(store)
    lease = _lease(store, aid)
    with store.read() as s:
        assert lease.guideline_version == "v1" == Q.task_view(s, lease)["guideline_version"]
    _set_guidelines(store, "two", "v2")  # changed while the lease is open, before the submit
    with store.write() as s:
        got, _ = Q.submit_judgment(s, aid, tid, [[i] for i in lease.shown_order],
                                   idempotency_key="k")
    assert got.guideline_version == "v1"
    with store.read() as s:
        assert s.scalar(select(S.Judgment.guideline_version)) == "v1"


def test_a_lease_shown_again_or_renewed_takes_the_new_version(store) -> None:
    """Showing the task again (a reload, or the annotator's own expired lease renewed) shows the
    current guidelines, so that is the version recorded."""
    tid, aid = _one_task(store)
    first = _lease(store, aid)
    _set_guidelines(store, "two", "v2")
    again = _lease(store, aid)
    assert again.id == first.id and again.guideline_version == "v2"
    with store.write() as s:
        s.get(S.Assignment, first.id).expires_at = S.utcnow()  # ran out
    _set_guidelines(store, "three", "v3")
    renewed = _lease(store, aid)
    assert renewed.id == first.id and renewed.guideline_version == "v3"
    with store.write() as s:
        got, _ = Q.submit_judgment(s, aid, tid, [[i] for i in renewed.shown_order],
                                   idempotency_key="k")
    assert got.guideline_version == "v3"
