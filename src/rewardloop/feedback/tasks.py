"""Comparison tasks: creating them and reporting progress (``feedback.queue`` leases them
and records judgments).

With ``feedback.queue`` this is the one place that changes annotation state; the server, the
simulated annotators and the loop all go through them. Every function takes an ORM session and
never commits: run the writing ones (``create_*``, ``get_or_create_*``) inside
``Store.write()``, whose commit makes them durable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rewardloop.data import _fields as F
from rewardloop.data.schema import (
    AUDIENCE_MAX,
    TASK_KINDS,
    Annotator,
    AuditEvent,
    Batch,
    ComparisonTask,
    Judgment,
    Prompt,
    Response,
    TaskItem,
    content_hash,
    validate_ranking,
)
from rewardloop.errors import DataError, UserError

PAIRINGS = ("all", "adjacent")


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
    for text, what in ((name, "batch name"), (guidelines, "guidelines")):
        if text is not None and "\x00" in text:  # PostgreSQL cannot store it, SQLite would
            raise DataError(f"the {what} contains a NUL character (\\u0000)")
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
    audience: str | None = None,
    models: Sequence[str | None] | None = None,
) -> ComparisonTask:
    """A task comparing ``responses`` (2..k of ``prompt``'s; exactly 2 for pairwise).

    ``gold_ranking`` (response ids, best group first) makes it a gold task with a known answer.
    ``audience`` (an annotator group) makes the queue hand it only to that group's annotators.
    ``models`` names who wrote each response for this task (``TaskItem.model``): a response
    stored earlier keeps the model that first wrote it.
    """
    if kind not in TASK_KINDS:
        raise TaskError(f"task kind must be one of {list(TASK_KINDS)}, got {kind!r}", status=422)
    if audience is not None and not (isinstance(audience, str)
                                     and 1 <= len(audience) <= AUDIENCE_MAX):
        raise TaskError(f"audience must be a group name of 1 to {AUDIENCE_MAX} characters, got "
                        f"{audience!r}", status=422)
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
    if models is not None and len(models) != len(ids):
        raise TaskError("give one model name per response", status=422)
    names = list(models) if models is not None else [None] * len(ids)
    gold = None
    if gold_ranking is not None:
        try:
            gold = validate_ranking(gold_ranking, ids)
        except ValueError as exc:
            raise TaskError(f"gold ranking: {exc}", status=422) from None
    task = ComparisonTask(
        prompt_id=prompt.id, kind=kind, overlap=overlap, batch_id=batch.id if batch else None,
        is_gold=gold is not None, gold_ranking=gold, priority=float(priority), audience=audience,
        items=[TaskItem(response_id=rid, position=i, model=m)
               for i, (rid, m) in enumerate(zip(ids, names, strict=True))],
    )
    session.add(task)
    session.flush()
    session.add(AuditEvent(action="task.create", payload={
        "task_id": task.id, "responses": ids, "kind": kind, "overlap": overlap,
        "batch": batch.name if batch else None, "gold": gold is not None,
        "audience": audience}))
    return task


def _pairs(k: int, pairing: str) -> list[tuple[int, int]]:
    if pairing == "adjacent":
        return [(i, i + 1) for i in range(k - 1)]
    return list(combinations(range(k), 2))


def tasks_per_row(n_responses: int, kind: str, pairing: str) -> int:
    """How many tasks ``create_tasks_from_candidates`` makes of a row of ``n_responses``."""
    if kind == "ranking":
        return 1
    return n_responses - 1 if pairing == "adjacent" else n_responses * (n_responses - 1) // 2


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


@dataclass(frozen=True)
class _Row:
    texts: list[str]
    models: list[str | None]
    gold: list[list[int]] | None  # known ranking in response indices


def _check_row(row: Any, gold: list[list[int]] | None, err: Any) -> _Row:
    """Everything about a candidates row that can be checked without the database."""
    if not isinstance(row, Mapping):
        raise err("expected a JSON object", None)
    texts, models = _row_responses(row, err)
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        try:
            _check_messages(prompt)
        except DataError as exc:
            raise err(str(exc), "prompt") from None
    elif not isinstance(prompt, str):
        raise err("needs a prompt: a string or a list of chat messages", "prompt")
    _check_storable(row, prompt, texts, models, err)
    if gold is not None:
        try:
            gold = validate_ranking(gold, list(range(len(texts))))
        except ValueError as exc:
            raise err(str(exc), "ranking") from None
    return _Row(texts, models, gold)


def _check_storable(row: Mapping[str, Any], prompt: Any, texts: list[str],
                    models: list[str | None], err: Any) -> None:
    """What the database would refuse part way through (a NUL, an id or model name over 255
    characters): found before anything is written, as the importer finds it."""
    try:
        if isinstance(prompt, str):
            F.check_str(prompt, "prompt")
        else:  # chat messages (their content is stored as JSON: PostgreSQL keeps a NUL there)
            F.check_json(prompt, "prompt")
        for i, text in enumerate(texts):
            F.check_str(text, f"responses[{i}]")
        for i, model in enumerate(models):
            F.ident({f"models[{i}]": model}, f"models[{i}]")
        F.ident(dict(row), "id")
    except F.Invalid as exc:
        raise err(str(exc), exc.field) from None


def _errors(path: str | None, line_numbers: Sequence[int] | None, i: int) -> Any:
    """The DataError maker for row ``i``: it names ``path``, the row's line and the field."""
    line = line_numbers[i] if line_numbers is not None else i + 1

    def err(msg: str, field: str | None) -> DataError:
        return DataError(msg, path=path, line=line, field=field)

    return err


def check_candidates(
    rows: Sequence[Any], *, kind: str = "pairwise", pairing: str = "all",
    gold: Mapping[int, list[list[int]]] | None = None, path: str | None = None,
    line_numbers: Sequence[int] | None = None,
) -> list[int]:
    """Check candidates rows as ``create_tasks_from_candidates`` does, without the database;
    the number of tasks each row makes (before skipping any the batch already holds)."""
    return [tasks_per_row(len(r.texts), kind, pairing)
            for r in _check_rows(rows, pairing, gold, path, line_numbers)]


def _check_rows(rows: Sequence[Any], pairing: str, gold: Mapping[int, list[list[int]]] | None,
                path: str | None, line_numbers: Sequence[int] | None) -> list[_Row]:
    if pairing not in PAIRINGS:
        raise TaskError(f"pairing must be one of {list(PAIRINGS)}, got {pairing!r}", status=422)
    gold = gold or {}
    return [_check_row(row, gold.get(i), _errors(path, line_numbers, i))
            for i, row in enumerate(rows)]


# A comparison, as a batch holds it once: (kind, sorted response ids, gold or not, audience).
_Key = tuple[str, tuple[int, ...], bool, str | None]


_TASKS_LOCK = "rewardloop: making tasks in batch "  # the advisory lock's key, hashed


def _lock_batch_tasks(session: Session, batch: Batch | None, wait: bool) -> None:
    """On PostgreSQL, hold a transaction-scoped advisory lock on making tasks in ``batch``, so
    two requests (or two chunks of one retried upload on two server workers) cannot both find
    a comparison missing and both make it. SQLite's writers already run one at a time.
    Without ``wait`` (the server, whose writer thread must not stall behind a long
    ``tasks create``) a batch another transaction is filling is a TaskError 503: try again."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.flush()  # a batch made in this transaction needs its id
    # Advisory locks are database-wide: the key names the schema too, so stores sharing one
    # database in schemas of their own never wait for each other's batch of the same id.
    key = func.hashtextextended(func.concat(
        _TASKS_LOCK, func.current_schema(), ":", batch.id if batch is not None else 0), 0)
    if wait:
        session.execute(select(func.pg_advisory_xact_lock(key)))
    elif not session.scalar(select(func.pg_try_advisory_xact_lock(key))):
        name = batch.name if batch is not None else "(no batch)"
        raise TaskError(f"another upload is making tasks in batch {name}; send this one again "
                        "when it is done (what was made is skipped)", status=503)


PREFETCH_ROWS = 500  # candidates rows whose prompts and answers are looked up at once


def _prefetch(session: Session, rows: Sequence[Mapping[str, Any]], checked: Sequence[_Row],
              errs: Sequence[Any]) -> list[tuple[Prompt, list[Response]]]:
    """Each row's prompt and answers, found or made with one query and one insert per kind
    for all ``rows`` (one at a time, each a query and a savepoint, they cost 15 ms a row). A
    writer elsewhere that made one of them first makes the insert fail: then the rows go the
    one-at-a-time way, which takes the other writer's row."""
    specs = [_prompt_spec(row, err) for row, err in zip(rows, errs, strict=True)]
    by_digest: dict[str, Any] = {}
    for spec in specs:  # a prompt given twice is made as its first row gives it
        by_digest.setdefault(spec[0], spec)
    prompts = _found_or_made(
        session, Prompt, by_digest,
        lambda digests: select(Prompt).where(Prompt.content_hash.in_(digests)),
        lambda p: p.content_hash,
        lambda spec: Prompt(text=spec[1], messages=spec[2], external_id=spec[3], meta={},
                            content_hash=spec[0]))
    if prompts is None:
        return [_one_at_a_time(session, row, c, err)
                for row, c, err in zip(rows, checked, errs, strict=True)]
    wanted: dict[tuple[int, str], tuple[int, str, str | None]] = {}
    for spec, c in zip(specs, checked, strict=True):
        prompt = prompts[spec[0]]
        for text, model in zip(c.texts, c.models, strict=True):
            wanted.setdefault((prompt.id, content_hash(text)), (prompt.id, text, model))
    pids = sorted({key[0] for key in wanted})
    responses = _found_or_made(
        session, Response, wanted,
        lambda keys: select(Response).where(Response.prompt_id.in_(pids),
                                            Response.content_hash.in_({h for _, h in keys})),
        lambda r: (r.prompt_id, r.content_hash),
        lambda spec: Response(prompt_id=spec[0], text=spec[1], model=spec[2], gen_settings={},
                              content_hash=content_hash(spec[1])))
    if responses is None:
        return [_one_at_a_time(session, row, c, err)
                for row, c, err in zip(rows, checked, errs, strict=True)]
    out = []
    for spec, c in zip(specs, checked, strict=True):
        prompt = prompts[spec[0]]
        out.append((prompt, [responses[(prompt.id, content_hash(t))] for t in c.texts]))
    return out


def _found_or_made(session: Session, model: Any, wanted: Mapping[Any, Any],
                   query: Any, key_of: Any, make: Any) -> dict[Any, Any] | None:
    """``model`` rows by key: those the store holds (``query`` of the keys, ``key_of`` a
    row's key) and the others made from their spec (``make``) in one flush; None when another
    writer made one of them meanwhile (nothing of this call is kept)."""
    keys = list(wanted)
    found: dict[Any, Any] = {}
    for start in range(0, len(keys), 500):  # bound the IN list
        for row in session.scalars(query(keys[start:start + 500])):
            key = key_of(row)
            if key in wanted:
                found[key] = row
    new = {key: make(spec) for key, spec in wanted.items() if key not in found}
    if new:
        try:
            with session.begin_nested():
                session.add_all(new.values())
                session.flush()
        except IntegrityError:
            return None
    return {**found, **new}


def _prompt_spec(row: Mapping[str, Any], err: Any) -> tuple[str, str | None, Any, str | None]:
    """(content hash, text, messages, external id) of a row's prompt, checked as
    ``get_or_create_prompt`` checks it."""
    value = row.get("prompt")
    ext = row.get("id")
    ext = str(ext) if ext is not None else None
    if isinstance(value, str):
        return content_hash(value), value, None, ext
    if isinstance(value, list):
        try:
            _check_messages(value)
        except DataError as exc:
            raise err(str(exc), "prompt") from None
        return content_hash(value), None, value, ext
    raise err("needs a prompt: a string or a list of chat messages", "prompt")


def _one_at_a_time(session: Session, row: Mapping[str, Any], checked: _Row, err: Any
                   ) -> tuple[Prompt, list[Response]]:
    prompt = _row_prompt(session, row, err)
    responses = [get_or_create_response(session, prompt, t, model=m)
                 for t, m in zip(checked.texts, checked.models, strict=True)]
    if any(r.id is None for r in responses):
        session.flush()
    return prompt, responses


def create_tasks_from_candidates(
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    *,
    kind: str = "pairwise",
    overlap: int = 1,
    batch: Batch | None = None,
    gold: Mapping[int, list[list[int]]] | None = None,
    pairing: str = "all",
    path: str | None = None,
    line_numbers: Sequence[int] | None = None,
    audience: str | None = None,
    skipped: list[int] | None = None,
    wait_for_batch: bool = True,
) -> list[ComparisonTask]:
    """Tasks from candidates rows (``prompt`` string or chat list, ``responses``, ``models``?),
    for everyone or, with ``audience``, for the annotators of that group only.

    ``kind="ranking"`` makes one task per row with all its responses. ``kind="pairwise"`` makes
    one task per pair of a row's responses: every pair (``pairing="all"``, k(k-1)/2 tasks) or
    neighbours only (``pairing="adjacent"``, k-1 tasks, 0-1, 1-2, ...).
    ``gold`` maps a row's index to its known ranking in response *indices* (best group first);
    those rows become gold tasks (a pair's gold answer is the ranking restricted to the pair).
    Errors name ``path``, the row's line (``line_numbers[i]``, else i+1) and the field.
    A comparison is made once: one that ``batch`` already holds, or that an earlier row made
    (same kind, set of responses in any order, gold or not, audience), is not made again; its
    task's id is appended to ``skipped`` when given. So the same rows given twice do not double
    the work. Uploads into one batch take turns on PostgreSQL; ``wait_for_batch=False`` refuses
    (TaskError 503) instead of waiting for another one.
    """
    checked = _check_rows(rows, pairing, gold, path, line_numbers)  # all, before any write
    _lock_batch_tasks(session, batch, wait_for_batch)
    held: dict[int, dict[_Key, int]] = {}  # by prompt id
    created: list[ComparisonTask] = []
    answered: list[tuple[Prompt, list[Response]]] = []
    for i, checked_row in enumerate(checked):
        if i % PREFETCH_ROWS == 0:  # the chunk's prompts, answers and held tasks at once
            end = min(i + PREFETCH_ROWS, len(rows))
            answered = _prefetch(session, rows[i:end], checked[i:end],
                                 [_errors(path, line_numbers, j) for j in range(i, end)])
            new_ids = {p.id for p, _ in answered} - held.keys()
            held.update(held_by_prompt(session, batch, sorted(new_ids)))
        err = _errors(path, line_numbers, i)
        prompt, responses = answered[i % PREFETCH_ROWS]
        groups = ([list(range(len(responses)))] if kind == "ranking"
                  else _pairs(len(responses), pairing))
        for idx in groups:
            chosen = [responses[j] for j in idx]
            ranking = None
            if checked_row.gold is not None:
                ranking = [[responses[j].id for j in g if j in idx] for g in checked_row.gold]
                ranking = [g for g in ranking if g]
            key = comparison_key(kind, [r.id for r in chosen], ranking is not None, audience)
            if key in held[prompt.id]:
                if skipped is not None:
                    skipped.append(held[prompt.id][key])
                continue
            try:
                task = create_task(session, prompt, chosen, kind=kind, overlap=overlap,
                                   batch=batch, gold_ranking=ranking, audience=audience,
                                   models=[checked_row.models[j] for j in idx])
            except TaskError as exc:
                raise err(str(exc), None) from None
            held[prompt.id][key] = task.id
            created.append(task)
    return created


@dataclass(frozen=True)
class HeldTask:
    """A task a batch holds, with its answers: (response id, the model that wrote it for this
    task: the item's, else the response's)."""

    id: int
    prompt_id: int
    kind: str
    is_gold: bool
    audience: str | None
    items: tuple[tuple[int, str | None], ...]


def held_tasks(session: Session, batch: Batch, prompt_id: int | Sequence[int] | None = None
               ) -> list[HeldTask]:
    """The tasks ``batch`` holds (for one prompt, or several, given ``prompt_id``): what a
    creation that must not make a comparison twice checks against
    (``create_tasks_from_candidates``, the arena)."""
    if batch.id is None:
        session.flush()
    query = (select(ComparisonTask.id, ComparisonTask.prompt_id, ComparisonTask.kind,
                    ComparisonTask.is_gold, ComparisonTask.audience, TaskItem.response_id,
                    TaskItem.model, Response.model)
             .join(TaskItem, TaskItem.task_id == ComparisonTask.id)
             .join(Response, Response.id == TaskItem.response_id)
             .where(ComparisonTask.batch_id == batch.id))
    if isinstance(prompt_id, int):
        query = query.where(ComparisonTask.prompt_id == prompt_id)
    elif prompt_id is not None:
        query = query.where(ComparisonTask.prompt_id.in_(list(prompt_id)))
    about: dict[int, tuple[int, str, bool, str | None]] = {}
    items: dict[int, list[tuple[int, str | None]]] = {}
    for task_id, prompt, kind, is_gold, audience, response_id, item_model, model in (
            session.execute(query)):
        about[task_id] = (prompt, kind, is_gold, audience)
        items.setdefault(task_id, []).append((response_id, item_model or model))
    return [HeldTask(t, *about[t], tuple(items[t])) for t in about]


def comparison_key(kind: str, response_ids: Sequence[int], is_gold: bool,
                   audience: str | None) -> _Key:
    """What makes two tasks the same comparison: kind, the set of answers in any order, gold
    or not, audience."""
    return (kind, tuple(sorted(response_ids)), is_gold, audience)


def held_comparisons(session: Session, batch: Batch | None, prompt_id: int) -> dict[_Key, int]:
    """The tasks ``batch`` holds for one prompt, by ``comparison_key`` (none without a
    batch)."""
    return held_by_prompt(session, batch, [prompt_id])[prompt_id]


def held_by_prompt(session: Session, batch: Batch | None, prompt_ids: Sequence[int]
                   ) -> dict[int, dict[_Key, int]]:
    """``held_comparisons`` of each of ``prompt_ids``, in one query."""
    held: dict[int, dict[_Key, int]] = {p: {} for p in prompt_ids}
    if batch is None or not prompt_ids:
        return held
    for t in held_tasks(session, batch, prompt_ids):
        held[t.prompt_id][comparison_key(t.kind, [r for r, _ in t.items], t.is_gold,
                                         t.audience)] = t.id
    return held


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


def _batch_filter(batch: Batch | None) -> list[ColumnElement[bool]]:
    return [ComparisonTask.batch_id == batch.id] if batch is not None else []


# -- progress -------------------------------------------------------------------------------


def open_to(session: Session, annotator_id: int) -> ColumnElement[bool]:
    """Tasks this annotator may be handed: for everyone, or aimed at one of their groups (the
    queue's rule, ``queue._open_task``)."""
    groups = session.scalar(select(Annotator.groups).where(Annotator.id == annotator_id)) or []
    return ComparisonTask.audience.is_(None) | ComparisonTask.audience.in_(
        [g for g in groups if isinstance(g, str)])


def batch_for(session: Session, name: str, annotator_id: int, *, admin: bool = False
              ) -> Batch | None:
    """The batch named ``name`` if this annotator may work on it (it holds a task for everyone
    or for one of their groups; an admin: any batch), else None. An unknown name and a batch
    aimed only at other groups answer alike, so annotators cannot probe which batches exist."""
    batch = session.scalar(select(Batch).where(Batch.name == name))
    if batch is None or admin:
        return batch
    theirs = session.scalar(select(ComparisonTask.id).where(
        ComparisonTask.batch_id == batch.id, open_to(session, annotator_id)).limit(1))
    return batch if theirs is not None else None


def task_progress(session: Session, batch: Batch | None, annotator_id: int) -> dict[str, Any]:
    """Tasks and tasks done, in ``batch`` or overall, counting only the tasks this annotator
    may be handed (what the annotation page shows them)."""
    tasks, done = session.execute(
        select(func.count(ComparisonTask.id),
               func.count(ComparisonTask.id).filter(ComparisonTask.done.is_(True)))
        .where(*_batch_filter(batch), open_to(session, annotator_id))).one()
    return {"batch": batch.name if batch is not None else None, "tasks": int(tasks),
            "done": int(done)}


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
