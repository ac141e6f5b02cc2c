"""Shared request plumbing: database access for routes and who the caller is.

Authentication is a bearer token (scripts) or the server-side session cookie (browsers).
Cookie-authenticated requests that change state must carry the session's CSRF token in
``X-CSRF-Token``; bearer requests need none (a browser never attaches them on its own).

Most routes take ``User``/``Admin``: the caller is looked up in a read transaction before the
route runs. The two hot routes of the JSON API (next task, submit judgment) take ``Creds``
instead, which only reads the headers, and resolve the caller inside their own write
transaction with :meth:`Credentials.resolve`: one transaction and no thread hop per request.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from rewardloop.app.accounts import Principal, principal_for_session, principal_for_token
from rewardloop.app.writer import GroupWriter, WriterUnavailable
from rewardloop.data.store import Store
from rewardloop.feedback.tasks import TaskError

R = TypeVar("R")

SESSION_COOKIE = "rl_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(auto_error=False, description="A token from `rewardloop users token`.")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                             description="Session cookie set by POST /api/login.")


@dataclass(frozen=True)
class _Refusal:
    error: Exception


WRITE_TIMEOUT_S = 30.0


class Db:
    """The store as routes use it: reads directly, writes through the group-commit writer
    (one thread, many operations per durable commit; see ``app.writer``).

    A write the writer has not started within ``write_timeout`` seconds is withdrawn and
    answered 503 (WriterUnavailable), so a stuck database fails requests instead of holding
    them forever; one already started is waited for, so a 503 always means "not written".
    """

    def __init__(self, store: Store, write_timeout: float = WRITE_TIMEOUT_S) -> None:
        self.store, self.write_timeout = store, write_timeout
        self.writer = GroupWriter(store)

    def run(self, fn: Callable[[Session], R]) -> R:
        """Run ``fn(session)`` in a write transaction; returns once it is committed."""
        return self.writer.run(fn, timeout=self.write_timeout)

    async def run_async(self, fn: Callable[[Session], R]) -> R:
        """``run`` for async routes: the event loop keeps serving while ``fn`` is committed."""
        future = self.writer.submit(fn)
        waiter = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), self.write_timeout)
        except TimeoutError:
            if future.cancel():  # not started: the writer will skip it
                raise WriterUnavailable(f"the database did not take the write within "
                                        f"{self.write_timeout:g} s") from None
            return await waiter

    async def run_refusable(self, fn: Callable[[Session], R]) -> R:
        """``run_async`` for an operation that refuses (HTTPException, TaskError) only before it
        writes anything: the refusal is handed back as a value and raised here, so it does not
        make the writer roll back and re-run the group it shared (a flood of bad tokens would
        otherwise double the work of everyone's requests)."""
        return _raise_refusal(await self.run_async(_refusable(fn)))

    def run_refusable_sync(self, fn: Callable[[Session], R]) -> R:
        """``run_refusable`` for sync routes."""
        return _raise_refusal(self.run(_refusable(fn)))

    def read(self) -> Any:
        return self.store.read()


def _refusable(fn: Callable[[Session], R]) -> Callable[[Session], R | _Refusal]:
    def op(session: Session) -> R | _Refusal:
        try:
            return fn(session)
        except (HTTPException, TaskError) as exc:
            return _Refusal(exc)

    return op


def _raise_refusal(out: R | _Refusal) -> R:
    if isinstance(out, _Refusal):
        raise out.error
    return out


def tokens_equal(given: str, expected: str) -> bool:
    """Constant-time comparison of a token a client sent with the real one. On ``str``,
    ``hmac.compare_digest`` raises TypeError for non-ASCII text (a 500 for any client that
    sends some), so both are compared as UTF-8 bytes."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


async def get_db(request: Request) -> Db:
    return request.app.state.db


@dataclass(frozen=True)
class Credentials:
    """What a request presented to prove who it is (nothing looked up yet)."""

    token: str | None
    cookie: str | None
    method: str
    csrf_header: str
    secret: str

    def lookup(self, session: Session) -> Principal | None:
        """The caller, or None when they sent no valid credentials."""
        if self.token:
            return principal_for_token(session, self.token)
        if self.cookie:
            return principal_for_session(session, self.secret, self.cookie)
        return None

    def resolve(self, session: Session) -> Principal:
        """The authenticated caller (401 otherwise); checks CSRF on cookie-authenticated writes."""
        who = self.lookup(session)
        if who is None:
            raise HTTPException(401, "not logged in: log in or send a valid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if who.via == "session" and self.method not in SAFE_METHODS:
            if not who.csrf_token or not tokens_equal(self.csrf_header, who.csrf_token):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
        return who


async def credentials(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    cookie: Annotated[str | None, Depends(cookie_scheme)],
) -> Credentials:
    return Credentials(token=bearer.credentials if bearer is not None else None, cookie=cookie,
                       method=request.method, csrf_header=request.headers.get("x-csrf-token", ""),
                       secret=request.app.state.secret)


Creds = Annotated[Credentials, Depends(credentials)]


async def hot_credentials(request: Request) -> Credentials:
    """``credentials`` read straight from the headers, for the two routes every judgment
    calls: FastAPI resolves one dependency instead of four. Routes using it declare
    ``HOT_SECURITY`` so the OpenAPI document still names both schemes."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return Credentials(token=token.strip() if scheme.lower() == "bearer" else None,
                       cookie=request.cookies.get(SESSION_COOKIE), method=request.method,
                       csrf_header=request.headers.get("x-csrf-token", ""),
                       secret=request.app.state.secret)


HotCreds = Annotated[Credentials, Depends(hot_credentials)]
HOT_SECURITY: dict[str, Any] = {"security": [{"HTTPBearer": []}, {"APIKeyCookie": []}]}


def page_user(request: Request) -> Principal | None:
    """The session-cookie user of an HTML page request, or None."""
    creds = Credentials(None, request.cookies.get(SESSION_COOKIE), request.method, "",
                        request.app.state.secret)
    with request.app.state.db.read() as session:
        return creds.lookup(session)


def current_user(request: Request, creds: Creds) -> Principal:
    """The authenticated caller, looked up in a read transaction (see ``Credentials.resolve``)."""
    with request.app.state.db.read() as session:
        return creds.resolve(session)


def admin_user(who: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not who.is_admin:
        raise HTTPException(403, "admins only")
    return who


User = Annotated[Principal, Depends(current_user)]
Admin = Annotated[Principal, Depends(admin_user)]
DbDep = Annotated[Db, Depends(get_db)]
