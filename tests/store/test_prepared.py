"""data.prepared: Core statements run on the driver read and write what the ORM does."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import bindparam, func, insert, select

from rewardloop.data import schema as S
from rewardloop.data.prepared import Driver, Prepared
from rewardloop.data.store import Store

A = S.Assignment.__table__


def _task(session) -> int:
    p = S.Prompt(text="p", content_hash=S.content_hash("p"))
    t = S.ComparisonTask(prompt=p, kind="pairwise", overlap=1)
    session.add_all([t, S.Annotator(name="ann")])
    session.flush()
    return t.id


def test_round_trip_matches_the_orm(store: Store) -> None:
    new = Prepared(insert(A).values({c: bindparam(c) for c in (
        "task_id", "annotator_id", "shown_order", "leased_at", "expires_at", "completed")})
        .returning(A.c.id))
    read = Prepared(select(A.c.id, A.c.shown_order, A.c.expires_at, A.c.completed)
                    .where(A.c.task_id == bindparam("tid")).order_by(A.c.id))
    count = Prepared(select(func.count(A.c.id)).where(A.c.completed == bindparam("done")))
    when = dt.datetime(2026, 11, 27, 8, 30, 15, 123456, tzinfo=dt.UTC)
    with store.write() as s:
        tid = _task(s)  # pending ORM rows are flushed before the statement runs
        ann = s.scalar(select(S.Annotator.id))
        db = Driver(s)
        (row,) = new.run(db, {"task_id": tid, "annotator_id": ann, "shown_order": [3, 1],
                              "leased_at": when, "expires_at": when, "completed": True})
        assert isinstance(row.id, int)
        assert count.scalars(db, {"done": True}) == [1]
    with store.read() as s:
        orm = s.get(S.Assignment, row.id)
        assert orm.shown_order == [3, 1] and orm.completed is True
        assert orm.expires_at.replace(tzinfo=dt.UTC) == when
        got = read.first(Driver(s), {"tid": tid})
        assert got.id == row.id and got.shown_order == [3, 1] and got.completed is True
        assert got.expires_at.replace(tzinfo=dt.UTC) == when
        assert read.first(Driver(s), {"tid": tid + 1}) is None


def test_expanding_parameters_are_refused(store: Store) -> None:
    stmt = Prepared(select(A.c.id).where(A.c.id.in_(bindparam("ids", expanding=True))))
    with store.read() as s, pytest.raises(TypeError, match="expanding"):
        stmt.run(Driver(s), {"ids": [1]})
