"""``rewardloop serve``: the annotation server (FastAPI under uvicorn)."""

from __future__ import annotations

import os
from typing import Any

import typer

from rewardloop.cli._common import DB, resolve_db

ORDER = 10


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        db: str | None = DB,
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes the server on "
            "every interface (put it behind HTTPS then)."),
        port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
        proxy_headers: bool = typer.Option(
            False, "--proxy-headers", help="Trust X-Forwarded-Proto/For from a reverse proxy on "
            "127.0.0.1 (so cookies are marked Secure behind an HTTPS proxy)."),
        log_level: str = typer.Option("warning", "--log-level",
                                      help="uvicorn log level: debug, info, warning, error."),
        workers: int = typer.Option(
            1, "--workers", min=1, max=64,
            help="Server processes sharing the port (SO_REUSEPORT spreads connections over "
            "them). Each has its own group-commit writer; on SQLite they take turns at the "
            "write lock. Use about one per core (see docs/server.md). The login rate limit "
            "counts per process."),
    ) -> None:
        """Serve the annotation pages and JSON API. Create users first with `rewardloop users add`.

        The session secret comes from $REWARDLOOP_SECRET, else one is generated on first start
        and kept in the database.
        """
        import uvicorn

        from rewardloop.app.accounts import server_secret
        from rewardloop.app.main import create_app, tune_gc_for_serving
        from rewardloop.app.workers import serve_workers
        from rewardloop.data.store import Store
        from rewardloop.errors import UserError

        if not 0 < port < 65536:
            raise UserError(f"--port must be 1..65535, got {port}")
        url = resolve_db(db)
        store = Store(url)  # migrates once, before any worker starts
        options: dict[str, Any] = dict(
            log_level=log_level, proxy_headers=proxy_headers, forwarded_allow_ips="127.0.0.1",
            access_log=log_level in ("debug", "info"))
        typer.echo(f"serving {store.safe_url} on http://{host}:{port}"
                   + (f" with {workers} worker processes" if workers > 1 else ""), err=True)
        if workers == 1:
            application = create_app(store)
            tune_gc_for_serving()
            uvicorn.run(application, host=host, port=port, **options)
            return
        with store.write() as session:  # made once here, so workers never race to make it
            server_secret(session, os.environ.get("REWARDLOOP_SECRET"))
        store.dispose()
        code = serve_workers(url, host, port, workers, options)
        if code:
            raise typer.Exit(code)
