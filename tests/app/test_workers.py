"""`rewardloop serve --workers 2`: two processes on one port, both serving, stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_two_workers_share_the_port_and_stop_together(tmp_path, file_server, free_port) -> None:
    url, server = file_server(n_tasks=6, overlap=2)
    port = free_port
    cmd = [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve", "--db", url,
           "--port", str(port), "--workers", "2"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "REWARDLOOP_SECRET": "w" * 40})
    try:
        deadline = time.monotonic() + 60
        while True:  # both workers up: every fresh connection answers
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                ok = all(httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                         .status_code == 200 for _ in range(8))
            except httpx.HTTPError:
                ok = False
            if ok and len(_children(proc.pid)) >= 2:
                break
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.2)
        workers = [c for c in _children(proc.pid)  # not multiprocessing's resource tracker
                   if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) == 2
        done = 0
        for user in ("ann", "bob"):  # one connection each: judged through whichever worker
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={
                    "Authorization": f"Bearer {server.tokens[user]}"}) as client:
                for _ in range(3):
                    lease = client.get("/api/tasks/next").json()
                    ids = [x["id"] for x in lease["responses"]]
                    r = client.post("/api/judgments", json={
                        "task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]],
                        "idempotency_key": uuid.uuid4().hex})
                    assert r.status_code == 201, r.text
                    done += 1
        admin = httpx.get(f"http://127.0.0.1:{port}/api/admin/stats", headers={
            "Authorization": f"Bearer {server.tokens['admin']}"}).json()
        assert admin["judgments"] == done
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_a_worker_that_cannot_start_stops_the_server_with_an_error(tmp_path, free_port) -> None:
    import socket

    taken = socket.socket()  # a plain listener on the port: no worker can bind it
    taken.bind(("127.0.0.1", free_port))
    taken.listen()
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve", "--db",
             f"sqlite:///{tmp_path / 'x.db'}", "--port", str(free_port), "--workers", "2"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "REWARDLOOP_SECRET": "w" * 40})
    finally:
        taken.close()
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1" in done.stderr and "Address already in use" in done.stderr
    assert "stopped unexpectedly" in done.stderr and "Traceback" not in done.stderr
