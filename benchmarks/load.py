"""Load test of the annotation server: a real uvicorn process, many simulated annotators.

    python -m benchmarks.load --db sqlite --annotators 50 --seconds 20
    python -m benchmarks.load --db postgresql ...   # uses $REWARDLOOP_TEST_PG_URL

Each annotator (an asyncio task with its own bearer token and keep-alive connection) loops
GET /api/tasks/next -> POST /api/judgments with no think time. Prints judgments/s sustained over
the run, p50/p99 latency per request kind, the requests answered 503 ("busy, try again", sent
again at once as the annotate page does; a request's latency runs until it is answered
otherwise) and CPU time per judgment on each side. The load
generator runs on the same machine as the server, so on a small box the two compete for the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_url(base: str, schema: str = "rl_bench") -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options={quote(f'-csearch_path={schema}')}"


def prepare(url: str, annotators: int, tasks: int, overlap: int) -> list[str]:
    """Users with tokens and ``tasks`` pairwise tasks; returns the annotators' tokens."""
    from rewardloop.app import accounts
    from rewardloop.data import schema as S
    from rewardloop.data.store import Store

    store = Store(url)
    tokens = []
    with store.write() as s:
        for i in range(annotators):
            user = accounts.add_user(s, f"load{i}", "annotator")
            tokens.append(accounts.new_token(s, user))
        batch = S.Batch(name="load", guideline_version="v1")
        s.add(batch)
        for i in range(tasks):
            p = S.Prompt(text=f"prompt {i}", content_hash=S.content_hash(f"prompt {i}"))
            rs = [S.Response(prompt=p, text=f"answer {i}.{j} " * 20,
                             content_hash=S.content_hash(f"answer {i}.{j}")) for j in range(2)]
            s.add(S.ComparisonTask(prompt=p, kind="pairwise", overlap=overlap, batch=batch,
                                   items=[S.TaskItem(response=r, position=j)
                                          for j, r in enumerate(rs)]))
    store.dispose()
    return tokens


def start_server(url: str, port: int, log: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve",
           "--db", url, "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, "REWARDLOOP_SECRET": uuid.uuid4().hex * 2}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    import httpx

    for _ in range(300):
        try:
            # Every worker listening first: SO_REUSEPORT spreads connections only over the
            # sockets that exist when they arrive, and the keep-alive connections never move.
            if listening_sockets(port) >= workers and httpx.get(
                    f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start; see {log}")


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on ``port`` (Linux /proc/net/tcp and tcp6)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            count += state == "0A" and int(local.rsplit(":", 1)[1], 16) == port
    return count


class Conn:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol for this test.

    A full client (httpx) costs about a millisecond of CPU per request, which on a 2-core box
    would measure the client as much as the server; this one builds requests from bytes and
    reads ``Content-Length`` bodies only (the server never sends chunked JSON).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, head: bytes, body: bytes = b"", busy: list[int] | None = None
                      ) -> tuple[int, bytes]:
        """Send one request; a 503 is counted in ``busy`` and the request sent again."""
        while True:
            status, payload = await self._once(head, body)
            if status != 503 or busy is None:
                return status, payload
            busy[0] += 1

    async def _once(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise RuntimeError("chunked responses are not expected from this server")
        return status, await self.reader.readexactly(length) if length else b""


async def annotator(port: int, token: str, deadline: float, lat: dict[str, list[float]],
                    done: list[int], busy: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Conn(reader, writer)
    auth = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n".encode()
    get_next = b"GET /api/tasks/next HTTP/1.1\r\n" + auth + b"\r\n"
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status, payload = await conn.request(get_next, busy=busy)
            t1 = time.perf_counter()
            lat["next"].append(t1 - t0)
            if status == 204:
                return
            if status != 200:
                raise RuntimeError(f"GET /api/tasks/next answered {status}: {payload[:200]!r}")
            lease = json.loads(payload)
            ids = [x["id"] for x in lease["responses"]]
            body = json.dumps({"task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]],
                               "idempotency_key": uuid.uuid4().hex, "time_ms": 1000}).encode()
            head = (b"POST /api/judgments HTTP/1.1\r\n" + auth
                    + b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n")
            status, payload = await conn.request(head, body, busy=busy)
            lat["submit"].append(time.perf_counter() - t1)
            if status != 201:
                raise RuntimeError(f"POST /api/judgments answered {status}: {payload[:200]!r}")
            done[0] += 1
    finally:
        writer.close()


async def drive(port: int, tokens: list[str], seconds: float
                ) -> tuple[int, float, dict, int]:
    lat: dict[str, list[float]] = {"next": [], "submit": []}
    done, busy = [0], [0]
    start = time.perf_counter()
    await asyncio.gather(*(annotator(port, t, start + seconds, lat, done, busy)
                           for t in tokens))
    return done[0], time.perf_counter() - start, lat, busy[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (Linux /proc), in seconds."""
    proc = Path(f"/proc/{pid}")
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in (proc / "task").iterdir():
        for child in (task / "children").read_text().split():
            total += cpu_seconds(int(child))
    return total


def run(coro: Any) -> Any:
    """Run ``coro`` on uvloop when it is installed (it is with the server's dependencies)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] * 1000 if len(values) > 1 \
        else values[0] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite",
                    help="Store to run against (postgresql needs $REWARDLOOP_TEST_PG_URL).")
    ap.add_argument("--annotators", type=int, default=50, help="Concurrent annotators.")
    ap.add_argument("--seconds", type=float, default=20, help="How long to drive load.")
    ap.add_argument("--workers", type=int, default=1, help="Server processes (serve --workers).")
    ap.add_argument("--tasks", type=int, default=8000, help="Tasks to create (overlap 3).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rewardloop-load-"))
    if args.db == "sqlite":
        url = f"sqlite:///{work / 'load.db'}"
    else:
        base = os.environ.get("REWARDLOOP_TEST_PG_URL")
        if not base:
            sys.exit("--db postgresql needs REWARDLOOP_TEST_PG_URL")
        url = pg_url(base)
    tokens = prepare(url, args.annotators, args.tasks, overlap=3)
    port = free_port()
    proc = start_server(url, port, work / "server.log", args.workers)
    try:
        server0, client0 = cpu_seconds(proc.pid), time.process_time()
        n, elapsed, lat, busy = run(drive(port, tokens, args.seconds))
        server_cpu, client_cpu = cpu_seconds(proc.pid) - server0, time.process_time() - client0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"db={args.db} annotators={args.annotators} seconds={elapsed:.1f} cpus={os.cpu_count()}")
    print(f"judgments={n} judgments/s={n / elapsed:.1f} requests/s={2 * n / elapsed:.1f} "
          f"busy (503, sent again)={busy}")
    per = 1000 / max(n, 1)
    print(f"cpu per judgment: server {server_cpu * per:.2f} ms, load generator "
          f"{client_cpu * per:.2f} ms (server busy {server_cpu / elapsed:.0%} of one core)")
    for kind, values in lat.items():
        print(f"{kind:>6}: p50={pct(values, 0.5):.1f} ms  p99={pct(values, 0.99):.1f} ms  "
              f"n={len(values)}")


if __name__ == "__main__":
    main()
