"""Server-rendered HTML pages: login, annotate, admin. Every page but /login needs a session.

The pages carry no inline script or style (the CSP forbids both); behaviour lives in
static/*.js and talks to the JSON API with the session's CSRF token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rewardloop.app import accounts
from rewardloop.app.accounts import Principal
from rewardloop.app.api import batch_of, do_login, export_response, set_session_cookie
from rewardloop.app.deps import SESSION_COOKIE, page_user, tokens_equal
from rewardloop.app.render import markdown, prompt_html, prompt_text
from rewardloop.app.schemas import NO_NUL, BatchQuery
from rewardloop.app.stats import admin_stats
from rewardloop.data.schema import Batch, ComparisonTask, Judgment, utcnow
from rewardloop.errors import DataError, UserError
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
EXPORT_FORMATS = ("trl", "ranking", "hh", "kto")


def answer_label(i: int) -> str:
    """The ``i``-th answer's label (from 0), as spreadsheet columns: A..Z, AA, AB, .., ZZ, AAA."""
    label = ""
    i += 1
    while i:
        i, rest = divmod(i - 1, 26)
        label = LETTERS[rest] + label
    return label


def _render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


def _to_login(request: Request | None = None) -> RedirectResponse:
    """To /login; from a page, with ``next`` set to it (query included, e.g. ``?batch=``)."""
    if request is None:
        return RedirectResponse("/login", status_code=303)
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?{urlencode({'next': here})}", status_code=303)


def _local_path(target: str | None) -> str | None:
    """``target`` if it is a path on this server (``/annotate?batch=x``), else None: a login
    must never send the browser to another site (``//evil.example``, ``/\\evil``)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return None
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else None


def _same_origin(request: Request) -> bool:
    """Whether a form post came from our own pages: its Origin is the server as this request
    reached it, or the public URL a reverse proxy serves it under (``--public-url``)."""
    origin = request.headers.get("origin")
    own = {f"{request.url.scheme}://{request.url.netloc}", request.app.state.public_url}
    return origin is None or origin in own


@router.get("/")
def index(request: Request) -> Response:
    who = page_user(request)
    if who is None:
        return _to_login()
    return RedirectResponse("/admin" if who.is_admin else "/annotate", status_code=303)


@router.get("/login")
def login_page(request: Request,
               next: Annotated[str | None, Query(max_length=2000)] = None) -> Response:  # noqa: A002
    return _render(request, "login.html", error=None, next=_local_path(next), username="")


@router.post("/login")
def login_form(request: Request, username: Annotated[str, Form(max_length=120, pattern=NO_NUL)],
               password: Annotated[str, Form(max_length=1024)],
               next: Annotated[str | None, Form(max_length=2000)] = None,  # noqa: A002
               ) -> Response:
    target = _local_path(next)
    if not _same_origin(request):
        return _render(request, "login.html", 403, error="cross-site login refused",
                       next=target, username=username)
    try:
        session_id, _csrf, role = do_login(request, request.app.state.db, username, password)
    except HTTPException as exc:
        return _render(request, "login.html", exc.status_code, error=exc.detail, next=target,
                       username=username)
    home = "/admin" if role == "admin" else "/annotate"
    response = RedirectResponse(target or home, status_code=303)
    set_session_cookie(request, response, session_id)
    return response


@router.post("/logout")
def logout_form(request: Request, csrf_token: Annotated[str, Form(max_length=128)]) -> Response:
    who, cookie = page_user(request), request.cookies.get(SESSION_COOKIE)
    if who is not None and cookie and tokens_equal(csrf_token, who.csrf_token or ""):
        secret = request.app.state.secret
        request.app.state.db.run(lambda s: accounts.logout(s, secret, cookie))
    response = _to_login()
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _lease_page(session: Session, who: Principal, batch_name: str | None, lease_s: float
                ) -> dict[str, Any]:
    batch = batch_of(session, who, batch_name or None)
    lease = Q.next_task(session, who.id, batch=batch, lease_s=lease_s)
    mine = session.scalar(select(func.count(Judgment.id)).where(Judgment.annotator_id == who.id))
    if lease is None:
        return {"task": None, "mine": mine, "progress": T.task_progress(session, batch, who.id)}
    view = Q.task_view(session, lease)
    task_batch = session.scalar(select(Batch).join(ComparisonTask).where(
        ComparisonTask.id == lease.task_id))
    width = len(str(len(view["responses"])))  # 01, 02, ... with 10 answers or more
    responses = [{"label": answer_label(i), "key": f"{i + 1:0{width}d}", "id": r["id"],
                  "html": markdown(r["text"]), "text": r["text"]}
                 for i, r in enumerate(view["responses"])]
    guidelines = task_batch.guidelines if task_batch is not None else None
    seconds_left = max(0, int((lease.expires_at - utcnow()).total_seconds()))
    return {"task": {**view, "prompt_html": prompt_html(view["prompt"]),
                     "prompt_text": prompt_text(view["prompt"]), "items": responses,
                     "lease_seconds": seconds_left},
            "guidelines": markdown(guidelines) if guidelines else None,
            "mine": mine, "progress": T.task_progress(session, task_batch, who.id)}


@router.get("/annotate")
def annotate(request: Request,
             batch: BatchQuery = None) -> Response:
    who = page_user(request)
    if who is None:
        return _to_login(request)
    try:
        lease_s = request.app.state.lease_s
        context = request.app.state.db.run_refusable_sync(
            lambda s: _lease_page(s, who, batch, lease_s))
    except HTTPException as exc:
        if exc.status_code != 404:
            raise
        return _render(request, "error.html", 404, user=who, csrf=who.csrf_token,
                       message=f"There is no batch named \u201c{batch}\u201d with tasks for "
                       "you. Check the link you were given, or annotate any batch.",
                       back="/annotate")
    return _render(request, "annotate.html", user=who, csrf=who.csrf_token, **context)


@router.get("/admin")
def admin(request: Request) -> Response:
    who = page_user(request)
    if who is None:
        return _to_login(request)
    if not who.is_admin:
        return _render(request, "error.html", 403, user=who, csrf=who.csrf_token,
                       message="This page is for admins.")
    with request.app.state.db.read() as session:
        stats = admin_stats(session)
    return _render(request, "admin.html", user=who, csrf=who.csrf_token, stats=stats,
                   formats=EXPORT_FORMATS)


@router.get("/admin/export")
def admin_export(request: Request,
                 format: Annotated[str, Query(max_length=20)] = "trl",  # noqa: A002
                 batch: BatchQuery = None) -> Response:
    """The admin page's export links: the file as a download, or a page that says why not.
    (A link to the JSON API left a cancelled download and no word when the session had ended.)
    A lapsed session goes to login and back to /admin, where the link is clicked again."""
    who = page_user(request)
    if who is None:
        return RedirectResponse(f"/login?{urlencode({'next': '/admin'})}", status_code=303)
    if not who.is_admin:
        return _render(request, "error.html", 403, user=who, csrf=who.csrf_token,
                       message="Exports are for admins.")
    if format not in EXPORT_FORMATS:
        return _render(request, "error.html", 404, user=who, csrf=who.csrf_token, back="/admin",
                       message=f"There is no export format \u201c{format}\u201d; the formats "
                       f"are {', '.join(EXPORT_FORMATS)}.")
    try:
        return export_response(request.app.state.db, format, batch)
    except (HTTPException, UserError) as exc:
        status, why = ((exc.status_code, exc.detail) if isinstance(exc, HTTPException)
                       else (422 if isinstance(exc, DataError) else 400, str(exc)))
        return _render(request, "error.html", status, user=who, csrf=who.csrf_token,
                       message=f"The export failed: {why}", back="/admin")
