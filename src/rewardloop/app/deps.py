"""Shared request plumbing: database access for routes and who the caller is.

Authentication is a bearer token (scripts) or the server-side session cookie (browsers).
Cookie-authenticated requests that change state must carry the session's CSRF token in
``X-CSRF-Token``; bearer requests need none (a browser never attaches them on its own).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from rewardloop.app.accounts import Principal, principal_for_session, principal_for_token
from rewardloop.app.writer import GroupWriter
from rewardloop.data.store import Store

R = TypeVar("R")

SESSION_COOKIE = "rl_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(auto_error=False, description="A token from `rewardloop users token`.")
cookie_scheme = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                             description="Session cookie set by POST /api/login.")


class Db:
    """The store as routes use it: reads directly, writes through the group-commit writer
    (one thread, many operations per durable commit; see ``app.writer``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.writer = GroupWriter(store)

    def run(self, fn: Callable[[Session], R]) -> R:
        """Run ``fn(session)`` in a write transaction; returns once it is committed."""
        return self.writer.run(fn)

    def read(self) -> Any:
        return self.store.read()


def get_db(request: Request) -> Db:
    return request.app.state.db


def authenticate(request: Request, bearer: HTTPAuthorizationCredentials | None,
                 cookie: str | None) -> Principal | None:
    """The caller, or None when they sent no valid credentials."""
    db: Db = request.app.state.db
    if bearer is not None and bearer.credentials:
        with db.read() as session:
            return principal_for_token(session, bearer.credentials)
    if cookie:
        with db.read() as session:
            return principal_for_session(session, request.app.state.secret, cookie)
    return None


def current_user(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    cookie: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal:
    """The authenticated caller (401 otherwise); checks CSRF on cookie-authenticated writes."""
    who = authenticate(request, bearer, cookie)
    if who is None:
        raise HTTPException(401, "not logged in: log in or send a valid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    if who.via == "session" and request.method not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not who.csrf_token or not hmac.compare_digest(sent, who.csrf_token):
            raise HTTPException(403, "missing or wrong X-CSRF-Token header")
    return who


def admin_user(who: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not who.is_admin:
        raise HTTPException(403, "admins only")
    return who


User = Annotated[Principal, Depends(current_user)]
Admin = Annotated[Principal, Depends(admin_user)]
DbDep = Annotated[Db, Depends(get_db)]
