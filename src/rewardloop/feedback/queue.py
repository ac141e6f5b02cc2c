"""The work queue: leasing tasks to annotators and recording their judgments.

These functions are the annotation server's hot path (two calls per judgment), so their SQL is
written once in SQLAlchemy Core and run as prepared statements on the session's own driver
connection (``data.prepared``): about a dozen indexed statements per judgment, no ORM unit of
work. Like ``feedback.tasks`` they never commit;
run them inside ``Store.write()`` (or the server's group-commit writer), whose commit makes them
durable. Pending ORM changes of the session are flushed first, so a caller may create tasks and
lease them in one transaction.

Handing out work is safe under concurrency. On SQLite ``Store.write()`` opens the transaction
with ``BEGIN IMMEDIATE``, so writers run one at a time and the capacity check is exact. On
PostgreSQL the candidate task row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` and its
capacity recounted by a fresh statement once the lock is held, so two annotators never fill the
same last slot; only when every open row is held by another transaction does the claim wait
for them rather than answer that nothing is left. A task's capacity is ``overlap``: judgments
received plus unexpired leases held by others never exceed it.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    Integer,
    Select,
    Table,
    any_,
    bindparam,
    exists,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from rewardloop.data.prepared import Driver, Prepared
from rewardloop.data.schema import (
    SOURCES,
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
from rewardloop.data.values import STRENGTHS
from rewardloop.feedback.tasks import TaskError

# On PostgreSQL a candidate can look open in a stale snapshot and turn out full once locked;
# we then try the next one. The race window is tiny, so a few tries always suffice.
_MAX_CLAIM_TRIES = 64
_SYSTEM_RNG = random.SystemRandom()

# Declared as Table: mypy sees `__table__` as a FromClause, which update() and insert() refuse.
_A = cast(Table, Assignment.__table__)
_T = cast(Table, ComparisonTask.__table__)
_J = cast(Table, Judgment.__table__)
_I = cast(Table, TaskItem.__table__)
_B = cast(Table, Batch.__table__)
_P = cast(Table, Prompt.__table__)
_R = cast(Table, Response.__table__)
_AUDIT = cast(Table, AuditEvent.__table__)
_AN = cast(Table, Annotator.__table__)


@dataclass(frozen=True)
class Lease:
    """Task ``task_id`` is reserved for ``annotator_id`` until ``expires_at``; its responses
    are shown in ``shown_order`` (response ids), under the batch's guidelines of
    ``guideline_version`` (kept with the lease: the judgment records it)."""

    id: int
    task_id: int
    annotator_id: int
    shown_order: list[int]
    leased_at: dt.datetime
    expires_at: dt.datetime
    guideline_version: str | None = None


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


# -- statements (compiled once per dialect, run on the driver: see ``data.prepared``) ---------


def _with_batch(query: Select[Any], by_batch: bool) -> Select[Any]:
    return query.where(_T.c.batch_id == bindparam("batch_id")) if by_batch else query


def _active_leases(task_id: Any) -> Select[Any]:
    """Count of unexpired, uncompleted leases on a task (a reserved slot each)."""
    return select(func.count(_A.c.id)).where(
        _A.c.task_id == task_id, _A.c.completed == false(), _A.c.expires_at > bindparam("now"))


def _batch_version(task_id: Any) -> Any:
    """The guideline version of the batch of task ``task_id`` (NULL without one)."""
    return (select(_B.c.guideline_version).join(_T, _T.c.batch_id == _B.c.id)
            .where(_T.c.id == task_id).scalar_subquery())


def _current_lease(by_batch: bool) -> Select[Any]:
    query = (select(_A.c.id, _A.c.task_id, _A.c.shown_order, _A.c.leased_at, _A.c.expires_at,
                    _A.c.guideline_version, _B.c.guideline_version.label("batch_version"))
             .join(_T, _T.c.id == _A.c.task_id).outerjoin(_B, _B.c.id == _T.c.batch_id)
             .where(_A.c.annotator_id == bindparam("aid"), _A.c.completed == false(),
                    _A.c.expires_at > bindparam("now"), _T.c.done == false())
             .order_by(_A.c.leased_at).limit(1))
    return _with_batch(query, by_batch)


def _own_groups(postgresql: bool) -> Select[Any]:
    """The annotator's group names, read from their row's JSON list inside the statement (one
    statement per claim, as before): ``json_array_elements_text`` on PostgreSQL, the
    table-valued ``json_each`` on SQLite."""
    if postgresql:
        return select(func.json_array_elements_text(_AN.c.groups)).where(
            _AN.c.id == bindparam("aid"))
    each = func.json_each(_AN.c.groups).table_valued("value")
    return select(each.c.value).select_from(_AN.join(each, true())).where(
        _AN.c.id == bindparam("aid"))


def _open_task(by_batch: bool, postgresql: bool = False) -> Select[Any]:
    """The first task with room that this annotator has neither judged nor skipped and that is
    for everyone or for one of the annotator's groups (its ``audience``), with the annotator's
    own expired lease on it if there is one (``own_id``)."""
    own = _A.alias("own")
    judged = exists().where(_J.c.task_id == _T.c.id, _J.c.annotator_id == bindparam("aid"))
    active = _active_leases(_T.c.id).scalar_subquery()
    for_them = _T.c.audience.is_(None) | _T.c.audience.in_(_own_groups(postgresql))
    query = (select(_T.c.id, _T.c.n_judgments, _T.c.overlap, own.c.id.label("own_id"),
                    own.c.shown_order)
             .outerjoin(own, (own.c.task_id == _T.c.id) & (own.c.annotator_id == bindparam("aid")))
             .where(_T.c.done == false(), ~judged, own.c.completed.is_not(true()), for_them,
                    _T.c.n_judgments + active < _T.c.overlap)
             .order_by(_T.c.priority.desc(), _T.c.id).limit(1))
    return _with_batch(query, by_batch)


def _insert(table: Any, *columns: str) -> Prepared:
    return Prepared(insert(table).values({c: bindparam(c) for c in columns})
                    .returning(table.c.id))


_CURRENT = {b: Prepared(_current_lease(b)) for b in (False, True)}
_OPEN = {b: Prepared(_open_task(b)) for b in (False, True)}
# PostgreSQL: skip rows other transactions hold, and the ones found full once locked.
_OPEN_PG = {(b, wait): Prepared(
    _open_task(b, postgresql=True)
    .where(~(_T.c.id == any_(bindparam("tried", type_=postgresql.ARRAY(Integer)))))
    .with_for_update(skip_locked=not wait, of=_T))
    for b in (False, True) for wait in (False, True)}
_ACTIVE = Prepared(_active_leases(bindparam("tid")))
_OWN_LEASE = Prepared(select(_A.c.id, _A.c.shown_order, _A.c.completed, _A.c.leased_at,
                             _A.c.expires_at, _A.c.guideline_version).where(
    _A.c.task_id == bindparam("tid"), _A.c.annotator_id == bindparam("aid")))
_ITEMS = Prepared(select(_I.c.response_id).where(_I.c.task_id == bindparam("tid"))
                  .order_by(_I.c.position))
# A lease stores the guideline version it is shown with, read by the same statement.
_NEW_LEASE = Prepared(insert(_A).values(
    {**{c: bindparam(c) for c in ("task_id", "annotator_id", "shown_order", "leased_at",
                                  "expires_at", "completed")},
     "guideline_version": _batch_version(bindparam("task_id"))}).returning(
        _A.c.id, _A.c.guideline_version))
_RENEW = Prepared(update(_A).where(_A.c.id == bindparam("lease_id")).values(
    leased_at=bindparam("now"), expires_at=bindparam("expires"),
    guideline_version=_batch_version(_A.c.task_id)).returning(_A.c.guideline_version))
# A held lease shown again after the guidelines changed is shown the new ones (rare).
_SHOWN_VERSION = Prepared(update(_A).where(_A.c.id == bindparam("lease_id")).values(
    guideline_version=bindparam("version")))
_VIEW = Prepared(select(_T.c.kind, _P.c.text, _P.c.messages)
                 .join(_P, _P.c.id == _T.c.prompt_id).where(_T.c.id == bindparam("tid")))
_TEXTS = Prepared(select(_R.c.id, _R.c.text).join(_I, _I.c.response_id == _R.c.id)
                  .where(_I.c.task_id == bindparam("tid")))
# Idempotency keys are unique per annotator (migration 0004): one user's keys never block or
# reveal another's. A judgment without an annotator (an import) has its own key space.
_BY_KEY_QUERY = select(_J.c.id, _J.c.task_id, _J.c.annotator_id, _J.c.ranking, _J.c.strength,
                       _J.c.shown_order, _J.c.guideline_version, _J.c.time_ms, _J.c.source,
                       _J.c.rationale).where(_J.c.idempotency_key == bindparam("key"))
# Only library callers give a margin; a float column has no driver-level result processor on
# PostgreSQL without the column's type code, so it is read apart, when needed.
_MARGIN = select(_J.c.margin).where(_J.c.id == bindparam("jid"))
_BY_KEY = {True: Prepared(_BY_KEY_QUERY.where(_J.c.annotator_id == bindparam("aid"))),
           False: Prepared(_BY_KEY_QUERY.where(_J.c.annotator_id.is_(None)))}
_TASK_QUERY = (select(_T.c.id, _T.c.done, _T.c.n_judgments, _T.c.overlap, _B.c.guideline_version)
               .outerjoin(_B, _B.c.id == _T.c.batch_id).where(_T.c.id == bindparam("tid")))
_TASK = Prepared(_TASK_QUERY)
_TASK_PG = Prepared(_TASK_QUERY.with_for_update(of=_T))
_JUDGED = Prepared(select(exists().where(_J.c.task_id == bindparam("tid"),
                                         _J.c.annotator_id == bindparam("aid"))))
_NEW_JUDGMENT = _insert(_J, "task_id", "annotator_id", "ranking", "strength", "margin",
                        "rationale", "shown_order", "time_ms", "guideline_version",
                        "idempotency_key", "source", "meta", "created_at")
_COUNT_JUDGMENT = Prepared(update(_T).where(_T.c.id == bindparam("tid")).values(
    n_judgments=_T.c.n_judgments + 1, done=_T.c.n_judgments + 1 >= _T.c.overlap))
_CLOSE_LEASE = Prepared(update(_A).where(_A.c.id == bindparam("lease_id")).values(
    completed=True, expires_at=bindparam("expires")))
_AUDIT_EVENT = _insert(_AUDIT, "at", "actor_id", "action", "payload")


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite gives back naive datetimes; everything is stored in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _id(obj: Any) -> int | None:
    return obj if obj is None or isinstance(obj, int) else obj.id


def _annotator_id(annotator: Annotator | int) -> int:
    return annotator if isinstance(annotator, int) else annotator.id


# -- handing out tasks ----------------------------------------------------------------------


def _claim(db: Driver, params: dict[str, Any], by_batch: bool) -> Any:
    if db.dialect.name != "postgresql":
        return _OPEN[by_batch].first(db, params)
    tried: list[int] = []
    # First skip the rows other transactions hold (claims race past each other); when that
    # finds nothing, wait a little for them: a row is locked by a submit or a renewal too, and
    # the other worker's group commit holds it, so "nothing left" could be said of a task with
    # room. The wait is bounded (CLAIM_WAIT_MS, below PostgreSQL's deadlock_timeout of 1 s):
    # two workers' groups may each hold what the other's claim waits for.
    for wait in (False, True):
        for _ in range(_MAX_CLAIM_TRIES):
            params_tried = {**params, "tried": tried}
            task = (_waited_claim(db, params_tried, by_batch) if wait
                    else _OPEN_PG[by_batch, False].first(db, params_tried))
            if task is None:
                break
            # We hold the row lock now, so this statement's snapshot sees every committed lease.
            held = _ACTIVE.scalars(db, {"tid": task.id, "now": params["now"]})[0]
            if task.n_judgments + held < task.overlap:
                return task
            tried.append(task.id)
    return None


CLAIM_WAIT_MS = 250
"""How long a claim waits for a task row another transaction holds before saying nothing is
left (PostgreSQL)."""


def _waited_claim(db: Driver, params: dict[str, Any], by_batch: bool) -> Any:
    """The claim that waits for held rows, at most :data:`CLAIM_WAIT_MS`; None when the wait
    runs out. In a savepoint, so a lock timeout undoes only this statement, and with the
    transaction's own lock timeout put back after it."""
    from psycopg.errors import LockNotAvailable

    (before,) = db.raw.execute("SELECT current_setting('lock_timeout')").fetchone()
    try:
        with db.raw.transaction():
            db.raw.execute("SELECT set_config('lock_timeout', %s, true)", (f"{CLAIM_WAIT_MS}ms",))
            task = _OPEN_PG[by_batch, True].first(db, params)
            db.raw.execute("SELECT set_config('lock_timeout', %s, true)", (before,))
            return task
    except LockNotAvailable:
        return None


LEASE_S = 600.0
"""Seconds a task stays reserved for the annotator it was handed to (renewed while they work)."""


def next_task(
    session: Session,
    annotator: Annotator | int,
    *,
    batch: Batch | int | None = None,
    lease_s: float = LEASE_S,
    rng: random.Random | None = None,
) -> Lease | None:
    """Lease the next task to ``annotator`` (or return the lease it already holds).

    Open tasks this annotator has not judged and that still have room under ``overlap`` come
    highest ``priority`` first, then oldest; a task with an ``audience`` only to annotators
    of that group. The display order of the responses is shuffled
    per annotator and kept with the lease. None when nothing is left.
    """
    db = Driver(session)
    aid, batch_id, by_batch = _annotator_id(annotator), _id(batch), batch is not None
    now = utcnow()
    params = {"aid": aid, "now": now, "batch_id": batch_id}
    row = _CURRENT[by_batch].first(db, params)
    if row is not None:
        if row.guideline_version != row.batch_version:
            _SHOWN_VERSION.run(db, {"lease_id": row.id, "version": row.batch_version})
        return Lease(row.id, row.task_id, aid, row.shown_order, _aware(row.leased_at),
                     _aware(row.expires_at), row.batch_version)
    task = _claim(db, params, by_batch)
    if task is None:
        return None
    expires = now + dt.timedelta(seconds=lease_s)
    if task.own_id is not None:  # this annotator's own lease ran out earlier: renew it
        (renewed,) = _RENEW.run(db, {"lease_id": task.own_id, "now": now, "expires": expires})
        return Lease(task.own_id, task.id, aid, task.shown_order, now, expires,
                     renewed.guideline_version)
    order = _ITEMS.scalars(db, {"tid": task.id})
    (rng or _SYSTEM_RNG).shuffle(order)
    (new,) = _NEW_LEASE.run(db, {"task_id": task.id, "annotator_id": aid, "shown_order": order,
                                 "leased_at": now, "expires_at": expires, "completed": False})
    return Lease(new.id, task.id, aid, order, now, expires, new.guideline_version)


def skip_task(session: Session, annotator: Annotator | int, task_id: int) -> None:
    """Hand a leased task back unjudged: its slot frees at once and it is not offered to this
    annotator again."""
    db, aid = Driver(session), _annotator_id(annotator)
    own = _OWN_LEASE.first(db, {"tid": task_id, "aid": aid})
    if own is None or own.completed:
        raise TaskError(f"task {task_id!r} is not leased to you", status=404)
    now = utcnow()
    _CLOSE_LEASE.run(db, {"lease_id": own.id, "expires": now})
    _AUDIT_EVENT.run(db, {"at": now, "actor_id": aid, "action": "task.skip",
                          "payload": {"task_id": task_id}})


_EXTEND = Prepared(update(_A).where(_A.c.id == bindparam("lease_id")).values(
    expires_at=bindparam("expires")))


def renew_lease(session: Session, annotator: Annotator | int, task_id: int, *,
                lease_s: float = LEASE_S) -> dt.datetime:
    """Extend ``annotator``'s lease on ``task_id`` to ``lease_s`` from now (the annotate page
    calls this while its reader is active, so a long read does not lose the task); the new
    expiry. A lease that ran out is renewed only while the task still has room: 409 once
    someone else took the slot; 404 without an open lease (judged, skipped or never held)."""
    db, aid = Driver(session), _annotator_id(annotator)
    own = _OWN_LEASE.first(db, {"tid": task_id, "aid": aid})
    if own is None or own.completed:
        raise TaskError(f"task {task_id!r} is not leased to you", status=404)
    now = utcnow()
    task = (_TASK_PG if db.dialect.name == "postgresql" else _TASK).first(db, {"tid": task_id})
    if task.done:
        raise TaskError(f"task {task_id} is complete; it needs no more judgments")
    if _aware(own.expires_at) <= now:
        held = _ACTIVE.scalars(db, {"tid": task_id, "now": now})[0]
        if task.n_judgments + held >= task.overlap:
            raise TaskError(f"the time for task {task_id} ran out and someone else took it")
    expires = now + dt.timedelta(seconds=lease_s)
    _EXTEND.run(db, {"lease_id": own.id, "expires": expires})
    return expires


def task_view(session: Session, lease: Lease) -> dict[str, Any]:
    """What an annotator is shown: the prompt and the responses in the leased display order."""
    db = Driver(session)
    row = _VIEW.first(db, {"tid": lease.task_id})
    texts = dict(_TEXTS.run(db, {"tid": lease.task_id}))
    return {
        "task_id": lease.task_id,
        "prompt": row.text if row.text is not None else row.messages,
        "responses": [{"id": rid, "text": texts[rid]} for rid in lease.shown_order],
        "kind": row.kind,
        "guideline_version": lease.guideline_version,
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


def _replay(session: Session, prior: Any, task_id: int, ranking: Any,
            given: dict[str, Any]) -> Recorded:
    """The stored judgment, if the replay asks for exactly it: every field the caller gave
    must match (a replay that silently dropped a new strength or rationale would lose it)."""
    stored = prior._asdict()
    if given.get("margin") is not None:
        stored["margin"] = session.scalar(_MARGIN, {"jid": prior.id})
    differ = [name for name, value in given.items()
              if value is not None or name in _ALWAYS_COMPARED if stored[name] != value
              and not (name == "time_ms" and _capped(stored[name], value))]
    if prior.task_id != task_id or prior.ranking != _normalise(ranking):
        differ.insert(0, "task_id" if prior.task_id != task_id else "ranking")
    if differ:
        raise TaskError(f"this idempotency key was already used for a different judgment "
                        f"({', '.join(differ)} differ); use a fresh key for each judgment")
    stored.pop("margin", None)
    return Recorded(**{k: v for k, v in stored.items() if k != "rationale"})


def _capped(stored: int | None, claimed: int | None) -> bool:
    """Whether a replay's claimed time may be the stored one before the cap: any larger claim
    (the cap is not stored, so a larger claim is taken as the same judgment)."""
    return stored is not None and claimed is not None and stored < claimed


# What an API client always sends (or leaves out) itself; the rest is compared when given.
_ALWAYS_COMPARED = frozenset({"strength", "rationale", "time_ms"})


def _own_lease(db: Driver, task_id: Any, aid: int | None, require_lease: bool) -> Any:
    """``aid``'s lease row on ``task_id`` (open or not), or None. When ``require_lease`` this
    comes before anything else is looked at, and no lease is a 403: a caller without one
    learns neither the task's responses nor that it exists."""
    own = _OWN_LEASE.first(db, {"tid": task_id, "aid": aid}) if isinstance(task_id, int) else None
    if own is None and require_lease:
        raise TaskError(f"task {task_id!r} is not leased to you; ask for the next task first",
                        status=403)
    return own


def _by_key(db: Driver, key: str, aid: int | None) -> Any:
    """The judgment ``aid`` stored under idempotency ``key``, or None."""
    return _BY_KEY[aid is not None].first(db, {"key": key, "aid": aid})


def _take_slot(db: Driver, task: Any, lease: Any, require_lease: bool) -> Any:
    """The annotator's open lease on ``task`` (``lease`` is their lease row, if any), after
    checking they may judge it now (they have not judged it yet)."""
    if lease is not None and lease.completed:
        lease = None
    if require_lease and lease is None:
        raise TaskError(f"task {task.id} is not leased to you; ask for the next task first",
                        status=403)
    now = utcnow()
    if lease is not None and _aware(lease.expires_at) > now:
        return lease  # the lease reserved a slot
    held = _ACTIVE.scalars(db, {"tid": task.id, "now": now})[0]
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

    Returns ``(judgment, created)``. Replaying an annotator's ``idempotency_key`` returns the
    stored judgment with ``created=False``; the same key with any other content is refused
    (409). Keys are per annotator. Raises TaskError (``status`` 404/403/409/422) for a task not
    leased to this annotator (403, checked first, when ``require_lease``), an unknown task
    (404), one already judged by them, a full task or an invalid ranking.
    """
    _check_judgment_fields(idempotency_key, strength, source, time_ms)
    db, aid = Driver(session), _id(annotator)
    given = {"strength": strength, "rationale": rationale, "time_ms": time_ms, "margin": margin,
             "source": source, "shown_order": shown_order, "guideline_version": guideline_version}
    prior = _by_key(db, idempotency_key, aid)
    if prior is not None:
        return _replay(session, prior, task_id, ranking, given), False
    own = _own_lease(db, task_id, aid, require_lease)
    task = None
    if isinstance(task_id, int):
        task = (_TASK_PG if db.dialect.name == "postgresql" else _TASK).first(db, {"tid": task_id})
    if task is None:
        raise TaskError(f"task {task_id!r} does not exist", status=404)
    if _JUDGED.scalars(db, {"tid": task.id, "aid": aid})[0]:
        # On PostgreSQL the same key can come in twice at once (a retry that another worker
        # process took): both miss the lookup above, the second waits for the task's row lock
        # and, once the first commits, sees its judgment. Read the key again: it is a replay.
        prior = _by_key(db, idempotency_key, aid)
        if prior is not None:
            return _replay(session, prior, task_id, ranking, given), False
        raise TaskError(f"you have already judged task {task.id}")
    lease = _take_slot(db, task, own, require_lease)
    if time_ms is not None and lease is not None and source == "human":
        # The time a person took is what their client measured, and no more than has passed
        # since the task was handed out (a client could claim ten minutes for each of 60
        # judgments a second). 1 s of slack for the two clocks' rounding.
        elapsed = (utcnow() - _aware(lease.leased_at)).total_seconds() * 1000
        time_ms = min(time_ms, int(elapsed) + 1000)
    # The ranking is read last: who may not judge the task now (judged, skipped, no slot) is
    # told that, not the task's response ids.
    try:
        groups = validate_ranking(ranking, _ITEMS.scalars(db, {"tid": task.id}))
    except ValueError as exc:
        raise TaskError(f"ranking: {exc}", status=422) from None
    if shown_order is None and lease is not None:
        shown_order = lease.shown_order
    if guideline_version is None:  # what the lease was shown with, else the batch's now
        guideline_version = (lease.guideline_version if lease is not None
                             else task.guideline_version)
    (new,) = _NEW_JUDGMENT.run(db, {
        "task_id": task.id, "annotator_id": aid, "ranking": groups, "strength": strength,
        "margin": margin, "rationale": rationale, "shown_order": shown_order,
        "time_ms": time_ms, "guideline_version": guideline_version,
        "idempotency_key": idempotency_key, "source": source, "meta": {},
        "created_at": utcnow()})
    judgment_id = new.id
    _COUNT_JUDGMENT.run(db, {"tid": task.id})
    if lease is not None:
        _CLOSE_LEASE.run(db, {"lease_id": lease.id, "expires": lease.expires_at})
    # The judgment's audit row is written by the database (trigger of migration 0003).
    return Recorded(judgment_id, task.id, aid, groups, strength, shown_order, guideline_version,
                    time_ms, source), True

