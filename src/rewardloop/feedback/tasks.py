"""Comparison tasks: creating them, handing them out under leases, recording judgments.

This is the one place that changes annotation state; the server, the simulated annotators and
the loop all go through it. Every function takes an ORM session and never commits: run the
writing ones (``create_*``, ``next_task``, ``submit_judgment``) inside ``Store.write()``, whose
commit makes them durable.

Handing out work is safe under concurrency. On SQLite ``Store.write()`` opens the transaction
with ``BEGIN IMMEDIATE``, so writers run one at a time and the capacity check below is exact. On
PostgreSQL the candidate task row is locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` and its
capacity recounted by a fresh statement once the lock is held, so two annotators never fill the
same last slot. A task's capacity is ``overlap``: judgments received plus unexpired leases held
by others never exceed it.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardloop.data.schema import (
    SOURCES,
    STRENGTHS,
    TASK_KINDS,
    Annotator,
    Assignment,
    AuditEvent,
    Batch,
    ComparisonTask,
    Judgment,
    Prompt,
    Response,
    TaskItem,
    content_hash,
    utcnow,
    validate_ranking,
)
from rewardloop.errors import DataError, UserError

PAIRINGS = ("all", "adjacent")
# On PostgreSQL a candidate can look open in a stale snapshot and turn out full once locked;
# we then try the next one. The race window is tiny, so a few tries always suffice.
_MAX_CLAIM_TRIES = 64
_SYSTEM_RNG = random.SystemRandom()


class TaskError(UserError):
    """A task operation that cannot be done as asked; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, *, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


# -- creating prompts, responses, batches and tasks ------------------------------------------


def _insert_or_get(session: Session, obj: Any, query: Select[Any]) -> Any:
    """Insert ``obj``; if a concurrent writer inserted the same unique row first, return that."""
    try:
        with session.begin_nested():
            session.add(obj)
            session.flush()
    except IntegrityError:
        found = session.scalar(query)
        if found is None:
            raise
        return found
    return obj


def get_or_create_prompt(
    session: Session,
    text: str | None = None,
    messages: list[Any] | None = None,
    external_id: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Prompt:
    """The prompt with this text (or chat ``messages``), created if new; de-duplicated by hash."""
    if (text is None) == (messages is None):
        raise DataError("a prompt needs either text or chat messages (exactly one)")
    if text is not None and not isinstance(text, str):
        raise DataError(f"a prompt text must be a string, got {type(text).__name__}")
    if messages is not None:
        _check_messages(messages)
    digest = content_hash(text if text is not None else messages)
    query = select(Prompt).where(Prompt.content_hash == digest)
    found = session.scalar(query)
    if found is not None:
        return found
    prompt = Prompt(text=text, messages=messages, external_id=external_id, meta=meta or {},
                    content_hash=digest)
    return _insert_or_get(session, prompt, query)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError("chat messages must be a non-empty list of {role, content} objects")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"each chat message needs string 'role' and 'content', got {m!r:.80}")


def get_or_create_response(
    session: Session,
    prompt: Prompt,
    text: str,
    model: str | None = None,
    model_version: str | None = None,
    gen_settings: dict[str, Any] | None = None,
    messages: list[Any] | None = None,
) -> Response:
    """The response ``text`` to ``prompt``, created if new; de-duplicated per prompt by hash."""
    if not isinstance(text, str):
        raise DataError(f"a response must be a string, got {type(text).__name__}")
    if prompt.id is None:
        session.flush()
    digest = content_hash(text)
    query = select(Response).where(Response.prompt_id == prompt.id, Response.content_hash == digest)
    found = session.scalar(query)
    if found is not None:
        return found
    response = Response(prompt_id=prompt.id, text=text, messages=messages, model=model,
                        model_version=model_version, gen_settings=gen_settings or {},
                        content_hash=digest)
    return _insert_or_get(session, response, query)


def get_or_create_batch(
    session: Session, name: str, guidelines: str | None = None,
    guideline_version: str | None = None,
) -> Batch:
    """The batch ``name``, created if new. Given guidelines replace the batch's; their version
    defaults to the first 12 hex digits of their hash so judgments record what was shown."""
    if not name or not name.strip():
        raise DataError("a batch needs a non-empty name")
    if guidelines is not None and guideline_version is None:
        guideline_version = content_hash(guidelines)[:12]
    query = select(Batch).where(Batch.name == name)
    batch = session.scalar(query)
    if batch is None:
        batch = _insert_or_get(
            session, Batch(name=name, guidelines=guidelines, guideline_version=guideline_version),
            query)
    if guidelines is not None and batch.guidelines != guidelines:
        batch.guidelines, batch.guideline_version = guidelines, guideline_version
    return batch


def create_task(
    session: Session,
    prompt: Prompt,
    responses: list[Response],
    kind: str = "pairwise",
    overlap: int = 1,
    batch: Batch | None = None,
    gold_ranking: list[list[int]] | None = None,
    priority: float = 0.0,
) -> ComparisonTask:
    """A task comparing ``responses`` (2..k of ``prompt``'s; exactly 2 for pairwise).

    ``gold_ranking`` (response ids, best group first) makes it a gold task with a known answer.
    """
    if kind not in TASK_KINDS:
        raise TaskError(f"task kind must be one of {list(TASK_KINDS)}, got {kind!r}", status=422)
    if not isinstance(overlap, int) or overlap < 1:
        raise TaskError(f"overlap must be an integer >= 1, got {overlap!r}", status=422)
    if len(responses) < 2 or (kind == "pairwise" and len(responses) != 2):
        want = "exactly 2" if kind == "pairwise" else "at least 2"
        raise TaskError(f"a {kind} task needs {want} responses, got {len(responses)}", status=422)
    if any(r.id is None for r in responses) or prompt.id is None:
        session.flush()
    ids = [r.id for r in responses]
    if len(set(ids)) != len(ids):
        raise TaskError("a task lists each response once; got a duplicate", status=422)
    if any(r.prompt_id != prompt.id for r in responses):
        raise TaskError("every response of a task must answer the task's prompt", status=422)
    gold = None
    if gold_ranking is not None:
        try:
            gold = validate_ranking(gold_ranking, ids)
        except ValueError as exc:
            raise TaskError(f"gold ranking: {exc}", status=422) from None
    task = ComparisonTask(
        prompt_id=prompt.id, kind=kind, overlap=overlap, batch_id=batch.id if batch else None,
        is_gold=gold is not None, gold_ranking=gold, priority=float(priority),
        items=[TaskItem(response_id=rid, position=i) for i, rid in enumerate(ids)],
    )
    session.add(task)
    session.flush()
    session.add(AuditEvent(action="task.create", payload={
        "task_id": task.id, "responses": ids, "kind": kind, "overlap": overlap,
        "batch": batch.name if batch else None, "gold": gold is not None}))
    return task


def _pairs(k: int, pairing: str) -> list[tuple[int, int]]:
    if pairing == "adjacent":
        return [(i, i + 1) for i in range(k - 1)]
    return list(combinations(range(k), 2))


def _row_responses(row: Mapping[str, Any], err: Any) -> tuple[list[str], list[str | None]]:
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise err("needs a list of at least 2 responses", "responses")
    if not all(isinstance(r, str) for r in responses):
        raise err("every response must be a string", "responses")
    if len(set(responses)) != len(responses):
        raise err("the same response text appears twice", "responses")
    models = row.get("models")
    if models is None:
        return responses, [None] * len(responses)
    if not isinstance(models, list) or len(models) != len(responses):
        raise err("must be a list with one model name per response", "models")
    if not all(m is None or isinstance(m, str) for m in models):
        raise err("model names must be strings", "models")
    return responses, models


def create_tasks_from_candidates(
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    *,
    kind: str = "pairwise",
    overlap: int = 1,
    batch: Batch | None = None,
    gold: dict[int, list[list[int]]] | None = None,
    pairing: str = "all",
    path: str | None = None,
    line_numbers: Sequence[int] | None = None,
) -> list[ComparisonTask]:
    """Tasks from candidates rows (``prompt`` string or chat list, ``responses``, ``models``?).

    ``kind="ranking"`` makes one task per row with all its responses. ``kind="pairwise"`` makes
    one task per pair of a row's responses: every pair (``pairing="all"``, k(k-1)/2 tasks) or
    neighbours only (``pairing="adjacent"``, k-1 tasks, 0-1, 1-2, ...).
    ``gold`` maps a row's index to its known ranking in response *indices* (best group first);
    those rows become gold tasks (a pair's gold answer is the ranking restricted to the pair).
    Errors name ``path``, the row's line (``line_numbers[i]``, else i+1) and the field.
    """
    if pairing not in PAIRINGS:
        raise TaskError(f"pairing must be one of {list(PAIRINGS)}, got {pairing!r}", status=422)
    gold = gold or {}
    created: list[ComparisonTask] = []
    for i, row in enumerate(rows):
        line = line_numbers[i] if line_numbers is not None else i + 1

        def err(msg: str, field: str | None, _line: int = line) -> DataError:
            return DataError(msg, path=path, line=_line, field=field)

        if not isinstance(row, Mapping):
            raise err("expected a JSON object", None)
        texts, models = _row_responses(row, err)
        prompt = _row_prompt(session, row, err)
        responses = [get_or_create_response(session, prompt, t, model=m)
                     for t, m in zip(texts, models, strict=True)]
        gold_idx = None
        if i in gold:
            try:
                gold_idx = validate_ranking(gold[i], list(range(len(texts))))
            except ValueError as exc:
                raise err(str(exc), "ranking") from None
        groups = [list(range(len(texts)))] if kind == "ranking" else _pairs(len(texts), pairing)
        for idx in groups:
            chosen = [responses[j] for j in idx]
            ranking = None
            if gold_idx is not None:
                ranking = [[responses[j].id for j in g if j in idx] for g in gold_idx]
                ranking = [g for g in ranking if g]
            try:
                created.append(create_task(session, prompt, chosen, kind=kind, overlap=overlap,
                                           batch=batch, gold_ranking=ranking))
            except TaskError as exc:
                raise err(str(exc), None) from None
    return created


def _row_prompt(session: Session, row: Mapping[str, Any], err: Any) -> Prompt:
    value = row.get("prompt")
    ext = row.get("id")
    ext = str(ext) if ext is not None else None
    try:
        if isinstance(value, str):
            return get_or_create_prompt(session, text=value, external_id=ext)
        if isinstance(value, list):
            return get_or_create_prompt(session, messages=value, external_id=ext)
    except DataError as exc:
        raise err(str(exc), "prompt") from None
    raise err("needs a prompt: a string or a list of chat messages", "prompt")


# -- handing out tasks ----------------------------------------------------------------------


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite gives back naive datetimes; everything is stored in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _active_leases(task_id: Any, now: dt.datetime) -> Select[Any]:
    """Count of unexpired, uncompleted leases on a task (a reserved slot each)."""
    return select(func.count(Assignment.id)).where(
        Assignment.task_id == task_id, Assignment.completed.is_(False),
        Assignment.expires_at > now)


def _batch_filter(batch: Batch | None) -> list[ColumnElement[bool]]:
    return [ComparisonTask.batch_id == batch.id] if batch is not None else []


def _current_lease(session: Session, annotator_id: int, batch: Batch | None,
                   now: dt.datetime) -> Assignment | None:
    query = (
        select(Assignment).join(ComparisonTask, ComparisonTask.id == Assignment.task_id)
        .where(Assignment.annotator_id == annotator_id, Assignment.completed.is_(False),
               Assignment.expires_at > now, ComparisonTask.done.is_(False),
               *_batch_filter(batch))
        .order_by(Assignment.leased_at).limit(1)
    )
    return session.scalar(query)


def _claim_open_task(session: Session, annotator_id: int, batch: Batch | None,
                     now: dt.datetime) -> ComparisonTask | None:
    judged = exists().where(Judgment.task_id == ComparisonTask.id,
                            Judgment.annotator_id == annotator_id)
    skipped = exists().where(Assignment.task_id == ComparisonTask.id,
                             Assignment.annotator_id == annotator_id,
                             Assignment.completed.is_(True))
    active = _active_leases(ComparisonTask.id, now).scalar_subquery()
    query = (
        select(ComparisonTask)
        .where(ComparisonTask.done.is_(False), ~judged, ~skipped,
               ComparisonTask.n_judgments + active < ComparisonTask.overlap,
               *_batch_filter(batch))
        .order_by(ComparisonTask.priority.desc(), ComparisonTask.id).limit(1)
        .execution_options(populate_existing=True)
    )
    if not _is_postgres(session):
        return session.scalar(query)
    tried: list[int] = []
    for _ in range(_MAX_CLAIM_TRIES):
        q = query.where(ComparisonTask.id.not_in(tried)) if tried else query
        task = session.scalar(q.with_for_update(skip_locked=True, of=ComparisonTask))
        if task is None:
            return None
        # We hold the row lock now, so this statement's snapshot sees every committed lease.
        if task.n_judgments + session.scalar(_active_leases(task.id, now)) < task.overlap:
            return task
        tried.append(task.id)
    return None


def next_task(
    session: Session,
    annotator: Annotator,
    *,
    batch: Batch | None = None,
    lease_s: float = 600,
    rng: random.Random | None = None,
) -> Assignment | None:
    """Lease the next task to ``annotator`` (or return the lease it already holds).

    Open tasks this annotator has not judged and that still have room under ``overlap`` come
    highest ``priority`` first, then oldest. The display order of the responses is shuffled
    per annotator and kept in ``Assignment.shown_order``. None when nothing is left.
    """
    now = utcnow()
    lease = _current_lease(session, annotator.id, batch, now)
    if lease is not None:
        return lease
    task = _claim_open_task(session, annotator.id, batch, now)
    if task is None:
        return None
    expires = now + dt.timedelta(seconds=lease_s)
    lease = session.scalar(select(Assignment).where(Assignment.task_id == task.id,
                                                    Assignment.annotator_id == annotator.id))
    if lease is not None:  # this annotator's own lease ran out earlier: renew it, same order
        lease.leased_at, lease.expires_at = now, expires
    else:
        order = list(session.scalars(select(TaskItem.response_id).where(
            TaskItem.task_id == task.id).order_by(TaskItem.position)))
        (rng or _SYSTEM_RNG).shuffle(order)
        lease = Assignment(task_id=task.id, annotator_id=annotator.id, shown_order=order,
                           leased_at=now, expires_at=expires)
        session.add(lease)
    session.flush()
    return lease


def skip_task(session: Session, annotator: Annotator, task_id: int) -> None:
    """Hand a leased task back unjudged: its slot frees at once and it is not offered to this
    annotator again."""
    lease = session.scalar(select(Assignment).where(
        Assignment.task_id == task_id, Assignment.annotator_id == annotator.id,
        Assignment.completed.is_(False)))
    if lease is None:
        raise TaskError(f"task {task_id!r} is not leased to you", status=404)
    lease.completed, lease.expires_at = True, utcnow()
    session.add(AuditEvent(actor_id=annotator.id, action="task.skip",
                           payload={"task_id": task_id}))
    session.flush()


def task_view(session: Session, assignment: Assignment) -> dict[str, Any]:
    """What an annotator is shown: the prompt and the responses in the leased display order."""
    row = session.execute(
        select(ComparisonTask.kind, Prompt.text, Prompt.messages, Batch.guideline_version)
        .join(Prompt, Prompt.id == ComparisonTask.prompt_id)
        .outerjoin(Batch, Batch.id == ComparisonTask.batch_id)
        .where(ComparisonTask.id == assignment.task_id)).one()
    texts = dict(session.execute(
        select(Response.id, Response.text).join(TaskItem, TaskItem.response_id == Response.id)
        .where(TaskItem.task_id == assignment.task_id)).all())
    return {
        "task_id": assignment.task_id,
        "prompt": row.text if row.text is not None else row.messages,
        "responses": [{"id": rid, "text": texts[rid]} for rid in assignment.shown_order],
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


def _replay(prior: Judgment, annotator: Annotator, task_id: int, ranking: Any) -> Judgment:
    if prior.annotator_id != annotator.id:
        raise TaskError("this idempotency key was already used by another annotator; "
                        "use a fresh key for each judgment")
    if prior.task_id != task_id or prior.ranking != _normalise(ranking):
        raise TaskError("this idempotency key was already used for a different judgment; "
                        "use a fresh key for each judgment")
    return prior


def _load_task(session: Session, task_id: int) -> ComparisonTask:
    query = (select(ComparisonTask).where(ComparisonTask.id == task_id)
             .execution_options(populate_existing=True))
    if _is_postgres(session):
        query = query.with_for_update(of=ComparisonTask)
    task = session.scalar(query) if isinstance(task_id, int) else None
    if task is None:
        raise TaskError(f"task {task_id!r} does not exist", status=404)
    return task


def _take_slot(session: Session, task: ComparisonTask, annotator: Annotator,
               require_lease: bool) -> Assignment | None:
    """The annotator's open lease on ``task``, after checking they may judge it now."""
    if session.scalar(select(exists().where(Judgment.task_id == task.id,
                                            Judgment.annotator_id == annotator.id))):
        raise TaskError(f"you have already judged task {task.id}")
    lease = session.scalar(select(Assignment).where(
        Assignment.task_id == task.id, Assignment.annotator_id == annotator.id,
        Assignment.completed.is_(False)))
    if require_lease and lease is None:
        raise TaskError(f"task {task.id} is not leased to you; ask for the next task first",
                        status=403)
    now = utcnow()
    if lease is not None and _aware(lease.expires_at) > now:
        return lease  # the lease reserved a slot
    if task.done or task.n_judgments + session.scalar(_active_leases(task.id, now)) \
            >= task.overlap:
        raise TaskError(f"task {task.id} already has all the judgments it needs")
    return lease


def submit_judgment(
    session: Session,
    annotator: Annotator,
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
) -> tuple[Judgment, bool]:
    """Record ``annotator``'s ranking of task ``task_id`` (response ids, best group first).

    Returns ``(judgment, created)``. Replaying an ``idempotency_key`` returns the stored
    judgment with ``created=False``; the same key from another annotator or with other content
    is refused. Raises TaskError (``status`` 404/403/409/422) for an unknown task, a task not
    leased to this annotator (when ``require_lease``), one already judged by them, a full task
    or an invalid ranking.
    """
    _check_judgment_fields(idempotency_key, strength, source, time_ms)
    prior = session.scalar(select(Judgment).where(Judgment.idempotency_key == idempotency_key))
    if prior is not None:
        return _replay(prior, annotator, task_id, ranking), False
    task = _load_task(session, task_id)
    item_ids = list(session.scalars(select(TaskItem.response_id).where(
        TaskItem.task_id == task.id).order_by(TaskItem.position)))
    try:
        groups = validate_ranking(ranking, item_ids)
    except ValueError as exc:
        raise TaskError(f"ranking: {exc}", status=422) from None
    lease = _take_slot(session, task, annotator, require_lease)
    if shown_order is None and lease is not None:
        shown_order = lease.shown_order
    if guideline_version is None and task.batch_id is not None:
        guideline_version = session.scalar(
            select(Batch.guideline_version).where(Batch.id == task.batch_id))
    judgment = Judgment(
        task_id=task.id, annotator_id=annotator.id, ranking=groups, strength=strength,
        margin=margin, rationale=rationale, shown_order=shown_order, time_ms=time_ms,
        guideline_version=guideline_version, idempotency_key=idempotency_key, source=source)
    session.add(judgment)
    task.n_judgments += 1
    task.done = task.n_judgments >= task.overlap
    if lease is not None:
        lease.completed = True
    session.flush()
    session.add(AuditEvent(actor_id=annotator.id, action="judgment.create", payload={
        "judgment_id": judgment.id, "task_id": task.id, "ranking": groups,
        "idempotency_key": idempotency_key, "source": source}))
    session.flush()
    return judgment, True


# -- progress -------------------------------------------------------------------------------


def batch_progress(session: Session, batch: Batch | None = None) -> dict[str, Any]:
    """Tasks, tasks done, judgments and judgments per annotator name, in ``batch`` or overall."""
    where = _batch_filter(batch)
    tasks, done = session.execute(
        select(func.count(ComparisonTask.id),
               func.count(ComparisonTask.id).filter(ComparisonTask.done.is_(True)))
        .where(*where)).one()
    per = session.execute(
        select(Annotator.name, func.count(Judgment.id))
        .join(Judgment, Judgment.annotator_id == Annotator.id)
        .join(ComparisonTask, ComparisonTask.id == Judgment.task_id)
        .where(*where).group_by(Annotator.name).order_by(Annotator.name)).all()
    judgments = session.scalar(
        select(func.count(Judgment.id)).join(ComparisonTask, ComparisonTask.id == Judgment.task_id)
        .where(*where))
    return {
        "batch": batch.name if batch is not None else None,
        "tasks": int(tasks), "done": int(done), "judgments": int(judgments or 0),
        "annotators": {name: int(n) for name, n in per},
    }
