"""`rewardloop serve` killed with SIGKILL loses no acknowledged judgment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from rewardloop.data import schema as S
from rewardloop.data.store import Store


def _serve(url: str, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve", "--db", url,
           "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "REWARDLOOP_SECRET": "r" * 40})
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
        assert proc.poll() is None, "server exited"
    proc.kill()
    raise AssertionError("server did not start")


@pytest.mark.slow
def test_kill_9_keeps_acknowledged_judgments(tmp_path, file_server, free_port) -> None:
    url, server = file_server(n_tasks=10, overlap=2)
    port = free_port
    acked: list[int] = []
    with open(tmp_path / "server.log", "wb") as log:
        proc = _serve(url, port, log)
        try:
            for user in ("ann", "bob"):
                client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={
                    "Authorization": f"Bearer {server.tokens[user]}"})
                for _ in range(4):
                    lease = client.get("/api/tasks/next").json()
                    ids = [x["id"] for x in lease["responses"]]
                    r = client.post("/api/judgments", json={
                        "task_id": lease["task_id"], "ranking": [[ids[1]], [ids[0]]],
                        "idempotency_key": uuid.uuid4().hex})
                    assert r.status_code == 201
                    acked.append(r.json()["id"])
        finally:
            proc.kill()  # SIGKILL: no shutdown hooks, no final flush
            proc.wait(timeout=30)
        proc = _serve(url, port, log)
        try:
            admin = httpx.get(f"http://127.0.0.1:{port}/api/admin/stats",
                              headers={"Authorization": f"Bearer {server.tokens['admin']}"})
            assert admin.json()["judgments"] == len(acked) == 8
        finally:
            proc.kill()
            proc.wait(timeout=30)
    store = Store(url)
    with store.read() as s:
        assert sorted(s.scalars(select(S.Judgment.id))) == sorted(acked)
    store.dispose()
