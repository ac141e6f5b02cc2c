"""``rewardloop serve --workers N``: N server processes listening on one port.

Each worker binds its own socket to the address with ``SO_REUSEPORT``, so the kernel spreads
new connections evenly over the workers. (With one shared listening socket, the way uvicorn's
own ``--workers`` does it, whichever process wins the accept race takes the connection: in the
load benchmark all 50 keep-alive connections often landed on one worker.) Every worker has its
own group-commit writer; on SQLite the writers take turns through the store's write lock.

The parent only supervises: it migrates the store and makes the session secret once before any
worker starts, forwards SIGINT/SIGTERM, and if a worker dies it stops the others and exits
non-zero, so a process manager (systemd, a container runtime) restarts the whole server.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
from multiprocessing.connection import wait
from typing import Any

import uvicorn

from rewardloop.app.main import create_app, tune_gc_for_serving
from rewardloop.data.store import Store
from rewardloop.errors import UserError


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(url: str, host: str, port: int, options: dict[str, Any],
            app_options: dict[str, Any]) -> None:
    try:
        sock = _listen(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        sys.exit(2)
    app = create_app(Store(url, migrate=False), **app_options)
    tune_gc_for_serving()
    uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[sock])


def serve_workers(url: str, host: str, port: int, workers: int, options: dict[str, Any],
                  app_options: dict[str, Any]) -> int:
    """Run ``workers`` processes until a signal stops them; returns the exit status.
    ``options`` go to uvicorn, ``app_options`` to ``create_app``."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise UserError("--workers needs SO_REUSEPORT (Linux, macOS, BSD); run one process")
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(url, host, port, options, app_options),
                             name=f"rewardloop-worker-{i}") for i in range(workers)]
    asked_to_stop = False

    def terminate_workers() -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal asked_to_stop
        asked_to_stop = True
        terminate_workers()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        wait([p.sentinel for p in procs])  # until the first worker ends
        terminate_workers()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if asked_to_stop:
        return 0
    codes = [p.exitcode for p in procs]
    print(f"error: a worker stopped unexpectedly (exit codes {codes}); stopped the others",
          file=sys.stderr)
    return 1
