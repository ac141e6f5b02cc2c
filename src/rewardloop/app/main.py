"""The FastAPI application factory: ``create_app(store)`` wires the store, the server secret,
the security middleware, the JSON API and the HTML pages together."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text

from rewardloop import __version__
from rewardloop.app import accounts
from rewardloop.app.api import router as api_router
from rewardloop.app.deps import Db
from rewardloop.app.pages import router as pages_router
from rewardloop.app.schemas import Health
from rewardloop.app.security import MAX_BODY, LoginLimiter, SecurityMiddleware
from rewardloop.data.store import Store
from rewardloop.errors import DataError, UserError
from rewardloop.feedback.tasks import TaskError

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def create_app(store: Store, *, secret: str | None = None, max_body: int = MAX_BODY,
               login_limiter: LoginLimiter | None = None) -> FastAPI:
    """The annotation server on ``store``.

    The session secret is ``secret``, else ``$REWARDLOOP_SECRET``, else one generated on first
    start and kept in the store's ``settings`` table; there is no built-in default.
    """
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.db.writer.close()  # queued writes are committed before the process ends

    app = FastAPI(title="rewardloop annotation server", version=__version__, lifespan=lifespan,
                  description="Collect pairwise comparisons and rankings of model answers.")
    with store.write() as session:
        app.state.secret = accounts.server_secret(
            session, secret or os.environ.get("REWARDLOOP_SECRET"))
    app.state.db = Db(store)
    app.state.login_limiter = login_limiter or LoginLimiter()
    app.add_middleware(SecurityMiddleware, max_body=max_body)
    app.include_router(api_router)
    app.include_router(pages_router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(TaskError)
    def _task_error(_request: Request, exc: TaskError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(UserError)
    def _user_error(_request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)},
                            status_code=422 if isinstance(exc, DataError) else 400)

    @app.get("/healthz", tags=["health"])
    def healthz() -> Health:
        """Liveness and database reachability (no login needed, reveals nothing)."""
        with app.state.db.read() as session:
            session.execute(text("SELECT 1"))
        return Health(status="ok", database=store.dialect)

    return app


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
