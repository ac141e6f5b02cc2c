"""The FastAPI application factory: ``create_app(store)`` wires the store, the server secret,
the security middleware, the JSON API and the HTML pages together."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import DataError as StoreDataError

from rewardloop import __version__
from rewardloop.app import accounts
from rewardloop.app.api import router as api_router
from rewardloop.app.deps import WRITE_TIMEOUT_S, Db
from rewardloop.app.pages import router as pages_router
from rewardloop.app.schemas import Health
from rewardloop.app.security import MAX_BODY, LoginLimiter, SecurityMiddleware
from rewardloop.app.writer import WriterUnavailable
from rewardloop.data.store import Store
from rewardloop.errors import DataError, UserError
from rewardloop.feedback.queue import LEASE_S
from rewardloop.feedback.tasks import TaskError

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def create_app(store: Store, *, secret: str | None = None, max_body: int = MAX_BODY,
               login_limiter: LoginLimiter | None = None, public_url: str | None = None,
               write_timeout: float = WRITE_TIMEOUT_S, lease_s: float = LEASE_S) -> FastAPI:
    """The annotation server on ``store``.

    The session secret is ``secret``, else ``$REWARDLOOP_SECRET``, else one generated on first
    start and kept in the store's ``settings`` table; there is no built-in default.
    ``public_url`` is the origin browsers use (``https://host[:port]``) when a reverse proxy
    stands in front: the login form accepts it as Origin, and https makes cookies Secure.
    ``lease_s``: how long a handed-out task stays reserved (and a renewal extends it).
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.db.writer.close()  # queued writes are committed before the process ends

    # No /docs or /redoc: their pages load script from a CDN, which the CSP (rightly) blocks.
    app = FastAPI(title="rewardloop annotation server", version=__version__, lifespan=lifespan,
                  description="Collect pairwise comparisons and rankings of model answers.",
                  docs_url=None, redoc_url=None)
    with store.write() as session:
        app.state.secret = accounts.server_secret(
            session, secret or os.environ.get("REWARDLOOP_SECRET"))
    app.state.db = Db(store, write_timeout=write_timeout)
    app.state.login_limiter = login_limiter or LoginLimiter()
    app.state.public_url = public_url
    app.state.lease_s = lease_s
    app.add_middleware(SecurityMiddleware, max_body=max_body)
    app.include_router(api_router)
    app.include_router(pages_router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(TaskError)
    def _task_error(_request: Request, exc: TaskError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status,
                            headers={"Retry-After": "5"} if exc.status == 503 else None)

    @app.exception_handler(UserError)
    def _user_error(_request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)},
                            status_code=422 if isinstance(exc, DataError) else 400)

    @app.exception_handler(RequestValidationError)
    def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

    @app.exception_handler(StoreDataError)
    def _unstorable(_request: Request, exc: StoreDataError) -> JSONResponse:
        # A value the database refuses (PostgreSQL: a NUL character, a number out of range)
        # that validation let through: the client's mistake, not a server error.
        log.warning("the database refused a value: %s", exc.orig)
        return JSONResponse({"detail": "a value the database cannot store (a NUL character "
                             "or a number out of range)"}, status_code=422)

    @app.exception_handler(WriterUnavailable)
    def _no_writer(_request: Request, exc: WriterUnavailable) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; try again"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/healthz", tags=["health"], response_model=Health,
             responses={503: {"model": Health, "description": "The writer has stopped"}})
    def healthz() -> Response:
        """Liveness, database reachability and a running writer (no login needed, reveals
        nothing); 503 when the writer has stopped, since no write could then succeed."""
        with app.state.db.read() as session:
            session.execute(text("SELECT 1"))
        if not app.state.db.writer.alive:
            return JSONResponse(Health(status="writer stopped", database=store.dialect)
                                .model_dump(), status_code=503)
        return JSONResponse(Health(status="ok", database=store.dialect).model_dump())

    return app


MAX_ERRORS = 10


def validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Which fields are wrong and why, never the values sent (FastAPI's default handler echoes
    each offending ``input``: passwords included, and megabytes of it built on the event loop).
    At most ``MAX_ERRORS`` entries; location parts are cut to 64 characters, since a key of
    the body can be one."""
    out = [{"loc": [part if isinstance(part, int) else str(part)[:64] for part in e["loc"]],
            "msg": e["msg"], "type": e["type"]} for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"loc": [], "msg": f"and {len(errors) - MAX_ERRORS} more errors",
                    "type": "too_many_errors"})
    return out


def tune_gc_for_serving() -> None:
    """Keep Python's cycle collector from stalling every request now and then.

    A full collection walks every tracked object, and a server process holds a few hundred
    thousand long-lived ones (FastAPI, SQLAlchemy, pydantic): each full collection stopped
    the event loop for ~100-150 ms, which set the p99 latency under load. ``gc.freeze`` moves
    everything alive at start-up out of the collector's sight, and a larger first threshold
    makes young collections rarer. Call once, after the app is built, in the serving process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
