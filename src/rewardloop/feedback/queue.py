"""The work queue: leasing tasks to annotators and recording their judgments.

These functions are the annotation server's hot path (two calls per judgment), so they run
SQLAlchemy Core statements built once at import time on the session's connection: a dozen
indexed statements per judgment, no ORM unit of work. Like ``feedback.tasks`` they never commit;
run them inside ``Store.write()`` (or the server's group-commit writer), whose commit makes them
durable. Pending ORM changes of the session are flushed first, so a caller may create tasks and
lease them in one transaction.

Handing out work is safe under concurrency. On SQLite ``Store.write()`` opens the transaction
with ``BEGIN IMMEDIATE``, so writers run one at a time and the capacity check is exact. On
PostgreSQL the candidate task row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` and its
capacity recounted by a fresh statement once the lock is held, so two annotators never fill the
same last slot. A task's capacity is ``overlap``: judgments received plus unexpired leases held
by others never exceed it.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Select,
    bindparam,
    exists,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from rewardloop.data.schema import (
    SOURCES,
    STRENGTHS,
    Annotator,
    Assignment,
    AuditEvent,
    Batch,
    ComparisonTask,
    Judgment,
    Prompt,
    Response,
    TaskItem,
    utcnow,
    validate_ranking,
)
from rewardloop.feedback.tasks import TaskError

# On PostgreSQL a candidate can look open in a stale snapshot and turn out full once locked;
# we then try the next one. The race window is tiny, so a few tries always suffice.
_MAX_CLAIM_TRIES = 64
_SYSTEM_RNG = random.SystemRandom()

_A = Assignment.__table__
_T = ComparisonTask.__table__
_J = Judgment.__table__
_I = TaskItem.__table__
_B = Batch.__table__
_P = Prompt.__table__
_R = Response.__table__
_AUDIT = AuditEvent.__table__


@dataclass(frozen=True)
class Lease:
    """Task ``task_id`` is reserved for ``annotator_id`` until ``expires_at``; its responses
    are shown in ``shown_order`` (response ids)."""

    id: int
    task_id: int
    annotator_id: int
    shown_order: list[int]
    leased_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class Recorded:
    """A stored judgment, as ``submit_judgment`` returns it."""

    id: int
    task_id: int
    annotator_id: int | None
    ranking: list[list[int]]
    strength: str | None
    shown_order: list[int] | None
    guideline_version: str | None
    time_ms: int | None
    source: str


# -- statements (built once; SQLAlchemy caches their compiled form) ---------------------------


def _with_batch(query: Select[Any], by_batch: bool) -> Select[Any]:
    return query.where(_T.c.batch_id == bindparam("batch_id")) if by_batch else query


def _active_leases(task_id: Any) -> Select[Any]:
    """Count of unexpired, uncompleted leases on a task (a reserved slot each)."""
    return select(func.count(_A.c.id)).where(
        _A.c.task_id == task_id, _A.c.completed == false(), _A.c.expires_at > bindparam("now"))


def _current_lease(by_batch: bool) -> Select[Any]:
    query = (select(_A.c.id, _A.c.task_id, _A.c.shown_order, _A.c.leased_at, _A.c.expires_at)
             .join(_T, _T.c.id == _A.c.task_id)
             .where(_A.c.annotator_id == bindparam("aid"), _A.c.completed == false(),
                    _A.c.expires_at > bindparam("now"), _T.c.done == false())
             .order_by(_A.c.leased_at).limit(1))
    return _with_batch(query, by_batch)


def _open_task(by_batch: bool) -> Select[Any]:
    judged = exists().where(_J.c.task_id == _T.c.id, _J.c.annotator_id == bindparam("aid"))
    skipped = exists().where(_A.c.task_id == _T.c.id, _A.c.annotator_id == bindparam("aid"),
                             _A.c.completed == true())
    active = _active_leases(_T.c.id).scalar_subquery()
    query = (select(_T.c.id, _T.c.n_judgments, _T.c.overlap)
             .where(_T.c.done == false(), ~judged, ~skipped,
                    _T.c.n_judgments + active < _T.c.overlap)
             .order_by(_T.c.priority.desc(), _T.c.id).limit(1))
    return _with_batch(query, by_batch)


_CURRENT = {b: _current_lease(b) for b in (False, True)}
_OPEN = {b: _open_task(b) for b in (False, True)}
_OPEN_PG = {b: q.where(_T.c.id.not_in(bindparam("tried", expanding=True)))
            .with_for_update(skip_locked=True, of=_T) for b, q in _OPEN.items()}
_ACTIVE = _active_leases(bindparam("tid"))
_OWN_LEASE = select(_A.c.id, _A.c.shown_order, _A.c.completed, _A.c.expires_at).where(
    _A.c.task_id == bindparam("tid"), _A.c.annotator_id == bindparam("aid"))
_ITEMS = select(_I.c.response_id).where(_I.c.task_id == bindparam("tid")).order_by(_I.c.position)
_NEW_LEASE = insert(_A)
_RENEW = update(_A).where(_A.c.id == bindparam("lease_id")).values(
    leased_at=bindparam("now"), expires_at=bindparam("expires"))
_VIEW = (select(_T.c.kind, _P.c.text, _P.c.messages, _B.c.guideline_version)
         .join(_P, _P.c.id == _T.c.prompt_id).outerjoin(_B, _B.c.id == _T.c.batch_id)
         .where(_T.c.id == bindparam("tid")))
_TEXTS = (select(_R.c.id, _R.c.text).join(_I, _I.c.response_id == _R.c.id)
          .where(_I.c.task_id == bindparam("tid")))
_BY_KEY = select(_J.c.id, _J.c.task_id, _J.c.annotator_id, _J.c.ranking, _J.c.strength,
                 _J.c.shown_order, _J.c.guideline_version, _J.c.time_ms, _J.c.source).where(
    _J.c.idempotency_key == bindparam("key"))
_TASK = (select(_T.c.id, _T.c.done, _T.c.n_judgments, _T.c.overlap, _T.c.batch_id,
                _B.c.guideline_version)
         .outerjoin(_B, _B.c.id == _T.c.batch_id).where(_T.c.id == bindparam("tid")))
_TASK_PG = _TASK.with_for_update(of=_T)
_JUDGED = select(exists().where(_J.c.task_id == bindparam("tid"),
                                _J.c.annotator_id == bindparam("aid")))
_NEW_JUDGMENT = insert(_J)
_COUNT_JUDGMENT = update(_T).where(_T.c.id == bindparam("tid")).values(
    n_judgments=_T.c.n_judgments + 1, done=_T.c.n_judgments + 1 >= _T.c.overlap)
_CLOSE_LEASE = update(_A).where(_A.c.id == bindparam("lease_id")).values(
    completed=True, expires_at=bindparam("expires"))
_AUDIT_EVENT = insert(_AUDIT)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite gives back naive datetimes; everything is stored in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _conn(session: Session) -> Connection:
    session.flush()
    return session.connection()


def _id(obj: Any) -> int | None:
    return obj if obj is None or isinstance(obj, int) else obj.id


def _audit(conn: Connection, actor_id: int | None, action: str, payload: dict[str, Any]) -> None:
    conn.execute(_AUDIT_EVENT, {"at": utcnow(), "actor_id": actor_id, "action": action,
                                "payload": payload})


# -- handing out tasks ----------------------------------------------------------------------


def _claim(conn: Connection, params: dict[str, Any], by_batch: bool) -> Row[Any] | None:
    if conn.dialect.name != "postgresql":
        return conn.execute(_OPEN[by_batch], params).first()
    tried: list[int] = []
    for _ in range(_MAX_CLAIM_TRIES):
        task = conn.execute(_OPEN_PG[by_batch], {**params, "tried": tried}).first()
        if task is None:
            return None
        # We hold the row lock now, so this statement's snapshot sees every committed lease.
        held = conn.execute(_ACTIVE, {"tid": task.id, "now": params["now"]}).scalar_one()
        if task.n_judgments + held < task.overlap:
            return task
        tried.append(task.id)
    return None


def next_task(
    session: Session,
    annotator: Annotator | int,
    *,
    batch: Batch | int | None = None,
    lease_s: float = 600,
    rng: random.Random | None = None,
) -> Lease | None:
    """Lease the next task to ``annotator`` (or return the lease it already holds).

    Open tasks this annotator has not judged and that still have room under ``overlap`` come
    highest ``priority`` first, then oldest. The display order of the responses is shuffled
    per annotator and kept with the lease. None when nothing is left.
    """
    conn = _conn(session)
    aid, batch_id, by_batch = _id(annotator), _id(batch), batch is not None
    now = utcnow()
    params = {"aid": aid, "now": now, "batch_id": batch_id}
    row = conn.execute(_CURRENT[by_batch], params).first()
    if row is not None:
        return Lease(row.id, row.task_id, aid, row.shown_order, _aware(row.leased_at),
                     _aware(row.expires_at))
    task = _claim(conn, params, by_batch)
    if task is None:
        return None
    expires = now + dt.timedelta(seconds=lease_s)
    own = conn.execute(_OWN_LEASE, {"tid": task.id, "aid": aid}).first()
    if own is not None:  # this annotator's own lease ran out earlier: renew it, same order
        conn.execute(_RENEW, {"lease_id": own.id, "now": now, "expires": expires})
        return Lease(own.id, task.id, aid, own.shown_order, now, expires)
    order = list(conn.execute(_ITEMS, {"tid": task.id}).scalars())
    (rng or _SYSTEM_RNG).shuffle(order)
    lease_id = conn.execute(_NEW_LEASE, {
        "task_id": task.id, "annotator_id": aid, "shown_order": order, "leased_at": now,
        "expires_at": expires, "completed": False}).inserted_primary_key[0]
    return Lease(lease_id, task.id, aid, order, now, expires)


def skip_task(session: Session, annotator: Annotator | int, task_id: int) -> None:
    """Hand a leased task back unjudged: its slot frees at once and it is not offered to this
    annotator again."""
    conn, aid = _conn(session), _id(annotator)
    own = conn.execute(_OWN_LEASE, {"tid": task_id, "aid": aid}).first()
    if own is None or own.completed:
        raise TaskError(f"task {task_id!r} is not leased to you", status=404)
    conn.execute(_CLOSE_LEASE, {"lease_id": own.id, "expires": utcnow()})
    _audit(conn, aid, "task.skip", {"task_id": task_id})


def task_view(session: Session, lease: Lease) -> dict[str, Any]:
    """What an annotator is shown: the prompt and the responses in the leased display order."""
    conn = _conn(session)
    row = conn.execute(_VIEW, {"tid": lease.task_id}).one()
    texts = dict(conn.execute(_TEXTS, {"tid": lease.task_id}).all())
    return {
        "task_id": lease.task_id,
        "prompt": row.text if row.text is not None else row.messages,
        "responses": [{"id": rid, "text": texts[rid]} for rid in lease.shown_order],
        "kind": row.kind,
        "guideline_version": row.guideline_version,
    }


# -- recording judgments --------------------------------------------------------------------


def _normalise(ranking: Any) -> Any:
    if isinstance(ranking, list):
        return [g if isinstance(g, list) else [g] for g in ranking]
    return ranking


def _check_judgment_fields(idempotency_key: str, strength: str | None, source: str,
                           time_ms: int | None) -> None:
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 128:
        raise TaskError("idempotency_key must be a string of 1 to 128 characters", status=422)
    if strength is not None and strength not in STRENGTHS:
        raise TaskError(f"strength must be one of {list(STRENGTHS)}, got {strength!r}",
                        status=422)
    if source not in SOURCES:
        raise TaskError(f"source must be one of {list(SOURCES)}, got {source!r}", status=422)
    if time_ms is not None and (not isinstance(time_ms, int) or time_ms < 0):
        raise TaskError("time_ms must be a non-negative integer", status=422)


def _replay(prior: Row[Any], annotator_id: int | None, task_id: int, ranking: Any) -> Recorded:
    if prior.annotator_id != annotator_id:
        raise TaskError("this idempotency key was already used by another annotator; "
                        "use a fresh key for each judgment")
    if prior.task_id != task_id or prior.ranking != _normalise(ranking):
        raise TaskError("this idempotency key was already used for a different judgment; "
                        "use a fresh key for each judgment")
    return Recorded(**prior._asdict())


def _take_slot(conn: Connection, task: Row[Any], aid: int | None,
               require_lease: bool) -> Row[Any] | None:
    """The annotator's open lease on ``task``, after checking they may judge it now."""
    if conn.execute(_JUDGED, {"tid": task.id, "aid": aid}).scalar():
        raise TaskError(f"you have already judged task {task.id}")
    lease = conn.execute(_OWN_LEASE, {"tid": task.id, "aid": aid}).first()
    if lease is not None and lease.completed:
        lease = None
    if require_lease and lease is None:
        raise TaskError(f"task {task.id} is not leased to you; ask for the next task first",
                        status=403)
    now = utcnow()
    if lease is not None and _aware(lease.expires_at) > now:
        return lease  # the lease reserved a slot
    held = conn.execute(_ACTIVE, {"tid": task.id, "now": now}).scalar_one()
    if task.done or task.n_judgments + held >= task.overlap:
        raise TaskError(f"task {task.id} already has all the judgments it needs")
    return lease


def submit_judgment(
    session: Session,
    annotator: Annotator | int | None,
    task_id: int,
    ranking: list[list[int]],
    *,
    idempotency_key: str,
    strength: str | None = None,
    rationale: str | None = None,
    time_ms: int | None = None,
    shown_order: list[int] | None = None,
    guideline_version: str | None = None,
    source: str = "human",
    margin: float | None = None,
    require_lease: bool = True,
) -> tuple[Recorded, bool]:
    """Record ``annotator``'s ranking of task ``task_id`` (response ids, best group first).

    Returns ``(judgment, created)``. Replaying an ``idempotency_key`` returns the stored
    judgment with ``created=False``; the same key from another annotator or with other content
    is refused. Raises TaskError (``status`` 404/403/409/422) for an unknown task, a task not
    leased to this annotator (when ``require_lease``), one already judged by them, a full task
    or an invalid ranking.
    """
    _check_judgment_fields(idempotency_key, strength, source, time_ms)
    conn, aid = _conn(session), _id(annotator)
    prior = conn.execute(_BY_KEY, {"key": idempotency_key}).first()
    if prior is not None:
        return _replay(prior, aid, task_id, ranking), False
    task = None
    if isinstance(task_id, int):
        stmt = _TASK_PG if conn.dialect.name == "postgresql" else _TASK
        task = conn.execute(stmt, {"tid": task_id}).first()
    if task is None:
        raise TaskError(f"task {task_id!r} does not exist", status=404)
    item_ids = list(conn.execute(_ITEMS, {"tid": task.id}).scalars())
    try:
        groups = validate_ranking(ranking, item_ids)
    except ValueError as exc:
        raise TaskError(f"ranking: {exc}", status=422) from None
    lease = _take_slot(conn, task, aid, require_lease)
    if shown_order is None and lease is not None:
        shown_order = lease.shown_order
    if guideline_version is None:
        guideline_version = task.guideline_version
    values = {"task_id": task.id, "annotator_id": aid, "ranking": groups, "strength": strength,
              "margin": margin, "rationale": rationale, "shown_order": shown_order,
              "time_ms": time_ms, "guideline_version": guideline_version,
              "idempotency_key": idempotency_key, "source": source}
    judgment_id = conn.execute(_NEW_JUDGMENT, values).inserted_primary_key[0]
    conn.execute(_COUNT_JUDGMENT, {"tid": task.id})
    if lease is not None:
        conn.execute(_CLOSE_LEASE, {"lease_id": lease.id, "expires": lease.expires_at})
    # The judgment's audit row is written by the database (trigger of migration 0003).
    return Recorded(judgment_id, task.id, aid, groups, strength, shown_order, guideline_version,
                    time_ms, source), True

