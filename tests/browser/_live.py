"""What the browser tests share: where chromium is, how it is started, a live server over a
test store, and logging in through the form."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rewardloop.app.main import create_app

CHROMIUM = os.environ.get("REWARDLOOP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "browser test password"


@contextmanager
def live_server(store: Any, secret: str) -> Iterator[str]:
    """The app over ``store`` served by uvicorn on a free port, in a thread; its base URL.
    The server is stopped when the block ends, also when a test fails."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store, secret=secret), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium (Playwright) for one test, closed when the block ends, also when
    the test fails; the test is skipped where chromium or Playwright is missing."""
    import pytest

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}; set REWARDLOOP_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def login(page: Any, base: str, user: str) -> None:
    page.goto(f"{base}/login")
    page.fill('input[name="username"]', user)
    page.fill('input[name="password"]', PASSWORD)
    page.click('button[type="submit"]')
