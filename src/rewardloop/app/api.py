"""The JSON API: routes only parse, authorise and call feedback.queue / feedback.tasks (or
accounts / stats)."""

from __future__ import annotations

import datetime as dt
import pathlib
import shutil
import tempfile
from functools import partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Path, Request, Response
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.background import BackgroundTask

from rewardloop.app import accounts
from rewardloop.app.deps import HOT_SECURITY, SESSION_COOKIE, Admin, Db, DbDep, HotCreds, User
from rewardloop.app.schemas import (
    MAX_ID,
    BatchQuery,
    JudgmentIn,
    JudgmentOut,
    LeaseOut,
    LoginIn,
    LoginOut,
    TaskOut,
    TasksCreateIn,
    TasksCreateOut,
    UserOut,
)
from rewardloop.app.stats import admin_stats
from rewardloop.data.schema import Annotator, Batch
from rewardloop.data.transfer import SKIP_TIES
from rewardloop.data.transfer import export as export_store
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T

router = APIRouter(prefix="/api")
ERRORS: dict[int | str, dict[str, Any]] = {401: {"description": "Not logged in"},
                                           403: {"description": "Not allowed"}}


def client_addr(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    """The session cookie; ``Secure`` when the request came over HTTPS (directly or through a
    trusted proxy) or the configured public URL is https (``--public-url``)."""
    public_url = request.app.state.public_url or ""
    secure = request.url.scheme == "https" or public_url.startswith("https://")
    response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict",
                        secure=secure, path="/",
                        max_age=int(accounts.SESSION_TTL.total_seconds()))


def _check_password(request: Request, db: DbDep, username: str, password: str,
                    ) -> tuple[int | None, str | None]:
    """``(user_id, role)`` of the user if the password is theirs, else ``(None, None)``;
    503 when every password-check slot stayed busy."""
    limiter = request.app.state.login_limiter
    if not limiter.check_slot():
        raise HTTPException(503, "the server is busy checking other logins; try again",
                            headers={"Retry-After": "1"})
    try:
        with db.read() as session:
            user_id = accounts.check_password(session, username, password)
            role = session.scalar(select(Annotator.role).where(Annotator.id == user_id))
    finally:
        limiter.release_slot()
    return user_id, role


def _signed_in_from(db: DbDep, username: str, addr: str) -> bool:
    with db.read() as session:
        return accounts.signed_in_from(session, username, addr)


def do_login(request: Request, db: DbDep, username: str, password: str) -> tuple[str, str, str]:
    """Rate-limited password check: ``(session_id, csrf, role)``; 429 / 401 / 503 otherwise.
    Failures are audited (without the password, and without names nobody has)."""
    limiter = request.app.state.login_limiter
    addr = client_addr(request)
    attempt = limiter.start(username, addr, known=lambda: _signed_in_from(db, username, addr))
    if attempt is None:
        raise HTTPException(429, "too many failed logins; wait a minute and try again",
                            headers={"Retry-After": str(int(limiter.window_s))})
    try:
        user_id, role = _check_password(request, db, username, password)
    except HTTPException:
        limiter.withdraw(attempt)  # never checked
        raise
    if user_id is None:
        db.run(lambda s: accounts.record_failed_login(s, username, addr))
        raise HTTPException(401, "wrong user name or password")
    limiter.withdraw(attempt, clear_pair=True)
    secret = request.app.state.secret
    session_id, csrf = db.run(lambda s: accounts.open_session(s, secret, user_id, addr))
    return session_id, csrf, role or "annotator"


@router.post("/login", responses={401: ERRORS[401], 429: {"description": "Too many failures"}})
def login(body: LoginIn, request: Request, response: Response, db: DbDep) -> LoginOut:
    """Open a session: sets an HttpOnly cookie and returns the CSRF token for it."""
    session_id, csrf, role = do_login(request, db, body.username, body.password)
    set_session_cookie(request, response, session_id)
    return LoginOut(user=UserOut(name=body.username, role=role), csrf_token=csrf)


@router.post("/logout", status_code=204, responses=ERRORS)
def logout(request: Request, who: User, db: DbDep) -> Response:
    """End this browser session (bearer tokens are revoked with `rewardloop users token`)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if who.via == "session" and cookie:
        secret = request.app.state.secret
        db.run(lambda s: accounts.logout(s, secret, cookie))
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _batch_id(session: Session, name: str | None) -> int | None:
    """An admin's batch by name (404 when none has it)."""
    if name is None:
        return None
    found = session.scalar(select(Batch.id).where(Batch.name == name))
    if found is None:
        raise HTTPException(404, f"no batch named {name!r}")
    return found


def batch_of(session: Session, who: accounts.Principal, name: str | None) -> Batch | None:
    """The batch ``who`` asked to annotate: 404 alike for an unknown name and for a batch with
    no task for them (``tasks.batch_for``), so annotators cannot probe other groups' batches."""
    if name is None:
        return None
    found = T.batch_for(session, name, who.id, admin=who.is_admin)
    if found is None:
        raise HTTPException(404, f"no batch named {name!r} with tasks for you")
    return found


@router.get("/tasks/next", response_model=TaskOut, openapi_extra=HOT_SECURITY,
            responses={204: {"description": "Nothing left for you"}, **ERRORS})
async def next_task(creds: HotCreds, request: Request,
                    batch: BatchQuery = None
                    ) -> Response | TaskOut:
    """Lease the next task to the caller (or the one they hold), responses in shown order."""

    def lease(session: Session) -> TaskOut | None:  # refuses only before writing
        who = creds.resolve(session)
        got = Q.next_task(session, who.id, batch=batch_of(session, who, batch),
                          lease_s=request.app.state.lease_s)
        if got is None:
            return None
        return TaskOut(**Q.task_view(session, got), lease_expires_at=got.expires_at)

    out = await request.app.state.db.run_refusable(lease)
    return Response(status_code=204) if out is None else out


@router.post("/judgments", status_code=201, openapi_extra=HOT_SECURITY, responses={
    200: {"model": JudgmentOut, "description": "Replay of a stored judgment"},
    404: {"description": "No such task"}, 409: {"description": "Conflict"}, **ERRORS})
async def submit_judgment(body: JudgmentIn, creds: HotCreds, request: Request,
                          response: Response) -> JudgmentOut:
    """Record a ranking of a task leased to the caller; committed before the answer is sent."""

    def record(session: Session) -> JudgmentOut:  # refuses only before writing
        who = creds.resolve(session)
        judgment, created = Q.submit_judgment(
            session, who.id, body.task_id, [list(g) for g in body.ranking],
            idempotency_key=body.idempotency_key, strength=body.strength,
            rationale=body.rationale, time_ms=body.time_ms)
        return JudgmentOut(id=judgment.id, task_id=judgment.task_id, ranking=judgment.ranking,
                           strength=judgment.strength, created=created)

    try:
        out = await request.app.state.db.run_refusable(record)
    except IntegrityError:
        raise HTTPException(409, "conflicting concurrent judgment") from None
    response.status_code = 201 if out.created else 200
    return out


@router.post("/tasks/{task_id}/skip", status_code=204, responses=ERRORS)
def skip_task(task_id: Annotated[int, Path(ge=1, le=MAX_ID)], who: User,
              db: DbDep) -> Response:
    """Give a leased task back without judging it; it is not offered to the caller again."""
    db.run_refusable_sync(lambda s: Q.skip_task(s, who.id, task_id))
    return Response(status_code=204)


@router.post("/tasks/{task_id}/renew", responses={
    404: {"description": "Not leased to you (judged, skipped or never held)"},
    409: {"description": "The lease ran out and someone else took the task"}, **ERRORS})
def renew_lease(task_id: Annotated[int, Path(ge=1, le=MAX_ID)], who: User,
                db: DbDep, request: Request) -> LeaseOut:
    """Extend the caller's lease on a task to the lease length from now (10 minutes unless
    `serve --lease-minutes` says otherwise; the annotate page does this while its reader is
    active)."""
    lease_s = request.app.state.lease_s
    expires = db.run_refusable_sync(lambda s: Q.renew_lease(s, who.id, task_id,
                                                            lease_s=lease_s))
    left = (expires - dt.datetime.now(dt.UTC)).total_seconds()
    return LeaseOut(task_id=task_id, lease_expires_at=expires, seconds_left=max(0, int(left)))


# One upload's work is bounded (the body limit bounds bytes, not tasks: one row of 64 short
# answers makes 2016 pairs), and it is written in chunks of about CHUNK_TASKS tasks, each its
# own write, so the annotators' writes go in between. Larger batches: `rewardloop tasks create`.
MAX_UPLOAD_TASKS = 10_000
MAX_ROW_PAIRS = 496  # C(32, 2): pairing=all over at most 32 answers a row
CHUNK_TASKS = 500


def _check_upload_work(per_row: list[int], pairing: str, kind: str) -> None:
    """422 for a row with too many pairs, 413 for an upload of too many tasks."""
    if kind == "pairwise" and pairing == "all":
        for i, n in enumerate(per_row):
            if n > MAX_ROW_PAIRS:
                raise HTTPException(422, f"rows:line {i + 1}: pairing=all makes {n} pairs of this "
                                    f"row's answers, more than {MAX_ROW_PAIRS} (32 answers); "
                                    "use pairing=adjacent or kind=ranking")
    total = sum(per_row)
    if total > MAX_UPLOAD_TASKS:
        raise HTTPException(413, f"these rows make {total} tasks, more than {MAX_UPLOAD_TASKS} "
                            "per request; send them in several requests (to the same batch), "
                            "or use `rewardloop tasks create`")


def _chunks(per_row: list[int], size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of about ``size`` tasks each (a row is never split)."""
    out, start, held = [], 0, 0
    for i, n in enumerate(per_row):
        if held and held + n > size:
            out.append((start, i))
            start, held = i, 0
        held += n
    out.append((start, len(per_row)))
    return out


@router.post("/admin/tasks", status_code=201, responses={
    413: {"description": "The rows make too many tasks"}, 422: {"description": "Bad rows"},
    **ERRORS})
def create_tasks(body: TasksCreateIn, who: Admin, db: DbDep) -> TasksCreateOut:
    """Turn candidates rows (prompt, responses, models?) into tasks of a batch. Comparisons
    the batch already holds are not made again: their task ids come back in
    ``skipped_task_ids``, so the same request sent twice does not double the work."""
    rows = [r.model_dump(exclude_none=True) for r in body.rows]
    gold = body.gold or {}
    per_row = T.check_candidates(rows, kind=body.kind, pairing=body.pairing, gold=gold,
                                 path="rows")
    _check_upload_work(per_row, body.pairing, body.kind)

    def create(session: Session, start: int, stop: int) -> tuple[list[int], list[int]]:
        batch = T.get_or_create_batch(session, body.batch, guidelines=body.guidelines)
        skipped: list[int] = []
        made = T.create_tasks_from_candidates(
            session, rows[start:stop], kind=body.kind, overlap=body.overlap, batch=batch,
            gold={i - start: g for i, g in gold.items() if start <= i < stop},
            pairing=body.pairing, path="rows", line_numbers=range(start + 1, stop + 1),
            skipped=skipped, wait_for_batch=False)
        return [t.id for t in made], skipped

    ids: list[int] = []
    skipped: dict[int, None] = {}  # in order, once each
    for start, stop in _chunks(per_row, CHUNK_TASKS):
        made, held = db.run(partial(create, start=start, stop=stop))
        ids += made
        skipped.update(dict.fromkeys(held))
    return TasksCreateOut(batch=body.batch, created=len(ids), task_ids=ids,
                          skipped_task_ids=list(skipped))


@router.get("/admin/stats", responses=ERRORS)
def stats(who: Admin, db: DbDep) -> dict[str, object]:
    """Progress, per-annotator counts, agreement, gold accuracy, position bias, activity."""
    with db.read() as session:
        return admin_stats(session)


_COUNT_HEADER = {"schema": {"type": "integer"}}


@router.get("/admin/export", response_class=FileResponse, responses={200: {
    "content": {"application/x-ndjson": {}}, "headers": {
        "X-Rewardloop-Skipped": {**_COUNT_HEADER, "description": "Rows left out (see below)"},
        "X-Rewardloop-Skipped-Ties": {**_COUNT_HEADER, "description": "Tied pairs left out "
                                      "(trl and hh cannot express a tie)"}}}, **ERRORS})
def export(who: Admin, db: DbDep,
           format: Literal["trl", "ranking", "kto", "hh"] = "trl",  # noqa: A002
           batch: BatchQuery = None) -> FileResponse:
    """All judgments (of ``batch``) as JSONL in a training format (see docs/server.md)."""
    return export_response(db, format, batch)


def export_response(db: Db, format: str, batch: str | None) -> FileResponse:  # noqa: A002
    """The export as a download (``Content-Disposition: attachment``), or an HTTPException that
    says why not: the API answers it as JSON, the admin page as a page."""
    if batch is not None and format == "kto":
        raise HTTPException(422, "batch selects comparisons; kto exports ratings")
    with db.read() as session:
        _batch_id(session, batch)  # 404 for an unknown batch (the export would say 400)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rewardloop-export-"))
    try:
        report = export_store(db.store, format, tmp / "export.jsonl", batch=batch)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # What the format could not express (tied pairs in trl and hh) is said, not dropped quietly.
    headers = {"X-Rewardloop-Skipped": str(sum(report.skipped.values())),
               "X-Rewardloop-Skipped-Ties": str(report.skipped.get(SKIP_TIES, 0))}
    return FileResponse(tmp / "export.jsonl", media_type="application/x-ndjson",
                        filename=f"judgments-{format}.jsonl", headers=headers,
                        background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True))
