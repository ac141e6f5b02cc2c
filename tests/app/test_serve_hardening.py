"""Hardening checked against a real `rewardloop serve` process: what only shows over real
sockets, a real event loop and real threads (body limits and validation replies, parallel
login floods, a stuck database writer, a reverse proxy that is not on 127.0.0.1)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from rewardloop.data.store import Store

PUBLIC = "https://annotate.example.org"
PROXY = "127.0.0.2"  # the trusted reverse proxy: the tests connect from this address


@dataclass
class Running:
    base: str
    server: Any  # conftest.Server
    db_path: Path
    log_path: Path

    def client(self, user: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.server.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=20, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running(tmp_path_factory, make_server):
    tmp = tmp_path_factory.mktemp("serve")
    db_path = tmp / "serve.db"
    store = Store(f"sqlite:///{db_path}")
    server = make_server(store, n_tasks=12, overlap=2, users=("ann", "bob", "cat", "dan"))
    store.dispose()
    port = _free_port()
    cmd = [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve",
           "--db", f"sqlite:///{db_path}", "--port", str(port), "--log-level", "info",
           "--forwarded-allow-ips", PROXY, "--public-url", PUBLIC, "--write-timeout", "1"]
    log_path = tmp / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "REWARDLOOP_SECRET": "h" * 40})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("server did not start")
        yield Running(base, server, db_path, log_path)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_m1_small_body_cap_and_validation_errors_echo_nothing(running) -> None:
    """A 0.9 MB unauthenticated body is refused unread (413); a malformed one inside the cap
    gets a short 422 naming fields, never the values (passwords included)."""
    with running.client() as c:
        huge = json.dumps({"task_id": 1, "ranking": [[i] for i in range(1, 100_000)],
                           "idempotency_key": "k"})
        assert len(huge) > 800_000
        r = c.post("/api/judgments", content=huge, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "64 KiB" in r.json()["detail"]
        groups = json.dumps({"task_id": 1, "ranking": [["x"] for _ in range(9_000)],
                             "idempotency_key": "k"})
        assert 40_000 < len(groups) < 64 * 1024
        started = time.monotonic()
        r = c.post("/api/judgments", content=groups, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and len(r.content) < 3000, len(r.content)
        assert '"x"' not in r.text and "input" not in r.text
        assert time.monotonic() - started < 5
        secret = "hunter2-very-secret"
        r = c.post("/api/login", content=f"username=ann&password={secret}",
                   headers={"Content-Type": "text/plain"})
        assert r.status_code == 422 and secret not in r.text
        r = c.post("/api/login", json={"username": "ann", "password": secret})
        assert r.status_code == 401 and secret not in r.text
        assert "server" not in r.headers  # no "uvicorn" to fingerprint (audit s14, L5)
    assert secret not in running.log_path.read_text()


def test_m2_parallel_wrong_passwords_cannot_beat_the_limit(running) -> None:
    """20 wrong passwords at once for one user: at most 5 are checked, the rest are 429."""
    def attempt(_i: int) -> int:
        with running.client() as c:
            return c.post("/api/login", json={"username": "cat", "password": "wrong one!"}
                          ).status_code

    with ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(attempt, range(20)))
    assert codes.count(401) <= 5 and codes.count(401) + codes.count(429) == 20, codes
    with running.client() as c:  # one address trying many names: limited too
        codes = [c.post("/api/login", json={"username": f"nobody{i}", "password": "x" * 9}
                        ).status_code for i in range(30)]
    assert codes.count(429) >= 10, codes


def test_m3_a_trusted_proxy_elsewhere_than_loopback(running) -> None:
    """Through a proxy at --forwarded-allow-ips: the client's own address counts for login
    limits, https from the proxy makes cookies Secure, and the public origin may log in."""
    via_proxy = httpx.HTTPTransport(local_address=PROXY)
    with running.client(transport=via_proxy) as c:
        for _ in range(5):  # someone at 203.0.113.9 locks ann out from there...
            r = c.post("/api/login", json={"username": "ann", "password": "wrong pass!"},
                       headers={"X-Forwarded-For": "203.0.113.9"})
            assert r.status_code == 401
        assert c.post("/api/login",
                      json={"username": "ann", "password": running.server.password},
                      headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 429
        r = c.post("/api/login",  # not locked out from everywhere
                   json={"username": "ann", "password": running.server.password},
                   headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"})
        assert r.status_code == 200
        assert "secure" in r.headers["set-cookie"].lower()
        form = {"username": "dan", "password": running.server.password}
        r = c.post("/login", data=form, headers={"Origin": PUBLIC,
                                                 "X-Forwarded-For": "198.51.100.8"})
        assert r.status_code == 303, r.text
        r = c.post("/login", data=form, headers={"Origin": "https://evil.example",
                                                 "X-Forwarded-For": "198.51.100.8"})
        assert r.status_code == 403
    with running.client() as direct:  # 127.0.0.1 is not the proxy: its headers count nothing
        for _ in range(5):
            direct.post("/api/login", json={"username": "bob", "password": "wrong pass!"},
                        headers={"X-Forwarded-For": f"192.0.2.{_}"})
        r = direct.post("/api/login", json={"username": "bob", "password": running.server.password},
                        headers={"X-Forwarded-For": "192.0.2.200"})
        assert r.status_code == 429


def test_item5_a_stuck_writer_times_out_and_recovers(running) -> None:
    """With the database write lock held elsewhere, queued writes are answered 503 after
    --write-timeout; once it is free the writer (which skips the withdrawn writes) serves on."""
    lock = os.open(f"{running.db_path}.writelock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(lambda: running.client("ann").get("/api/tasks/next"))
            time.sleep(0.5)  # the writer has taken this one and waits for the lock
            queued = [pool.submit(lambda u=u: running.client(u).get("/api/tasks/next"))
                      for u in ("bob", "dan")]
            for f in queued:
                r = f.result(timeout=15)
                assert r.status_code == 503 and r.headers["retry-after"], r.text
            assert not first.done()  # started before the timeout: waited for, not refused
            fcntl.flock(lock, fcntl.LOCK_UN)
            assert first.result(timeout=15).status_code == 200
    finally:
        os.close(lock)
    assert httpx.get(f"{running.base}/healthz", timeout=5).json()["status"] == "ok"
    with running.client("bob") as c:
        lease = c.get("/api/tasks/next")
        assert lease.status_code == 200
        ids = [x["id"] for x in lease.json()["responses"]]
        r = c.post("/api/judgments", json={"task_id": lease.json()["task_id"],
                                           "ranking": [[ids[0]], [ids[1]]],
                                           "idempotency_key": uuid.uuid4().hex})
        assert r.status_code == 201, r.text


def test_a_store_without_users_is_served_with_a_warning(tmp_path, running) -> None:
    """A mistyped --db is a new, empty store: say nobody can log in, and how to add users."""
    assert "has no users yet" not in running.log_path.read_text()  # a store with users
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve", "--db",
         f"sqlite:///{tmp_path / 'typo.db'}", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # A server that never says "serving" is killed after 60 s, which ends the read below.
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving"):
                break
    finally:
        watchdog.cancel()
        proc.terminate()
        proc.wait(timeout=30)
    text = "".join(lines)
    assert "has no users yet, so nobody can log in" in text
    assert "rewardloop users add NAME --role annotator --db sqlite:///" in text
