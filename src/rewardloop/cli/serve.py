"""``rewardloop serve``: the annotation server (FastAPI under uvicorn)."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import typer

from rewardloop.cli._common import DB, resolve_db

ORDER = 10


def check_public_url(value: str | None) -> str | None:
    """``--public-url`` as an origin (``scheme://host[:port]``), or a UserError."""
    from urllib.parse import urlsplit

    from rewardloop.errors import UserError

    if value is None:
        return None
    parts = urlsplit(value.rstrip("/"))
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise UserError(f"--public-url: {value!r} is not an origin like "
                        "https://annotate.example.org or https://host:8443 (no path)")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def check_forwarded_allow_ips(value: str) -> str:
    """``--forwarded-allow-ips`` checked entry by entry (addresses, networks or '*')."""
    import ipaddress

    from rewardloop.errors import UserError

    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise UserError("--forwarded-allow-ips: give at least one address, network or '*'")
    for entry in entries:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise UserError(f"--forwarded-allow-ips: {entry!r} is not an IP address or "
                            "network (like 10.0.0.5 or 10.0.0.0/8)") from None
    return ",".join(entries)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
"""uvicorn's log levels."""


def check_log_level(value: str) -> str:
    """``--log-level`` as uvicorn spells it, or a UserError naming the choices."""
    from rewardloop.errors import UserError

    if value.lower() not in LOG_LEVELS:
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` as uvicorn binds one, or a UserError when the address is
    taken or cannot be had: said before the server claims to serve, not after."""
    from rewardloop.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _has_users(store: Any) -> bool:
    from sqlalchemy import select

    from rewardloop.data.schema import Annotator

    with store.read() as session:
        return session.execute(select(Annotator.id).limit(1)).first() is not None


def serve_one(application: Any, sock: socket.socket, host: str, port: int,
              options: dict[str, Any]) -> None:
    """Serve ``application`` on the bound ``sock`` until Ctrl-C or SIGTERM; exit status 3 when
    it failed to start, as ``uvicorn.run``."""
    import uvicorn

    from rewardloop.app.main import tune_gc_for_serving

    tune_gc_for_serving()
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, **options))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a server is stopped
        server.run(sockets=[sock])
    if not server.started:
        raise typer.Exit(3)


def readable_by_others(url: str) -> str | None:
    """A warning when the SQLite file of ``url`` may be read by other users (files made before
    stores were created 0600 keep their old mode), else None."""
    import stat
    from pathlib import Path

    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0
    if not mode & 0o077:
        return None
    return (f"warning: {path} (mode {mode:04o}) holds the session secret and password hashes "
            f"but other users may read it; chmod 600 {path}")


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        db: str | None = DB,
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes the server on "
            "every interface (put it behind HTTPS then)."),
        port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
        proxy_headers: bool = typer.Option(
            False, "--proxy-headers", help="Trust X-Forwarded-Proto/For from the reverse proxy "
            "(at the addresses of --forwarded-allow-ips): the client address is then the "
            "real one (login limits) and cookies are Secure behind an HTTPS proxy."),
        forwarded_allow_ips: str | None = typer.Option(
            None, "--forwarded-allow-ips", help="Comma-separated addresses or networks of the "
            "reverse proxy, e.g. 10.0.0.5,fd00::/8 ('*' trusts anyone: only when nothing else "
            "can reach the port). Implies --proxy-headers. Default 127.0.0.1."),
        public_url: str | None = typer.Option(
            None, "--public-url", help="The origin browsers use, e.g. https://annotate.example"
            ".org, when a proxy serves the app: the login form accepts it as Origin, and "
            "https marks cookies Secure."),
        write_timeout: float = typer.Option(
            30.0, "--write-timeout", min=0.1, max=3600,
            help="Seconds a request waits for the database writer to take its write before "
            "it is answered 503 (and not written)."),
        lease_minutes: float = typer.Option(
            10.0, "--lease-minutes", min=5, max=24 * 60,
            help="How long a task stays reserved for the annotator it was handed to; the "
            "annotate page renews it while its reader is active. Raise it for long tasks."),
        log_level: str = typer.Option(
            "warning", "--log-level",
            help="uvicorn log level: critical, error, warning, info, debug or trace."),
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
        from rewardloop.app.accounts import server_secret
        from rewardloop.app.main import create_app
        from rewardloop.app.workers import serve_workers
        from rewardloop.data.store import Store
        from rewardloop.errors import UserError

        if not 0 < port < 65536:
            raise UserError(f"--port must be 1..65535, got {port}")
        log_level = check_log_level(log_level)
        app_options: dict[str, Any] = {"public_url": check_public_url(public_url),
                       "write_timeout": write_timeout, "lease_s": lease_minutes * 60}
        allowed = check_forwarded_allow_ips(forwarded_allow_ips or "127.0.0.1")
        # One process binds here, before the store is touched or "serving" is said; with
        # --workers each worker binds the port itself and reports its own failure (app.workers).
        sock = listen_socket(host, port) if workers == 1 else None
        url = resolve_db(db)
        store = Store(url)  # migrates once, before any worker starts
        warning = readable_by_others(url)
        if warning:
            typer.echo(warning, err=True)
        if not _has_users(store):  # a mistyped --db is a new, empty store nobody can log in to
            typer.echo(f"warning: {store.safe_url} has no users yet, so nobody can log in; add "
                       f"them with `rewardloop users add NAME --role annotator --db {db or url}`"
                       " (or check --db)", err=True)
        options: dict[str, Any] = dict(
            log_level=log_level, proxy_headers=proxy_headers or forwarded_allow_ips is not None,
            forwarded_allow_ips=allowed, access_log=log_level in ("debug", "info"),
            server_header=False)  # no "server: uvicorn" to fingerprint
        typer.echo(f"serving {store.safe_url} on http://{host}:{port}"
                   + (f" with {workers} worker processes" if workers > 1 else ""), err=True)
        if sock is not None:
            serve_one(create_app(store, **app_options), sock, host, port, options)
            return
        with store.write() as session:  # made once here, so workers never race to make it
            server_secret(session, os.environ.get("REWARDLOOP_SECRET"))
        store.dispose()
        code = serve_workers(url, host, port, workers, options, app_options)
        if code:
            raise typer.Exit(code)
