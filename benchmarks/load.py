"""Load test of the annotation server: a real uvicorn process, many simulated annotators.

    python -m benchmarks.load --db sqlite --annotators 50 --seconds 20
    python -m benchmarks.load --db postgresql ...   # uses $REWARDLOOP_TEST_PG_URL

Each annotator (an asyncio task with its own bearer token, one shared httpx connection pool)
loops GET /api/tasks/next -> POST /api/judgments. Prints judgments/s sustained over the run and
p50/p99 latency per request kind. The load generator runs on the same machine as the server,
so on a small box the two compete for the CPU; the figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
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


def start_server(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from rewardloop.cli import main; main()", "serve",
           "--db", url, "--port", str(port)]
    env = {**os.environ, "REWARDLOOP_SECRET": uuid.uuid4().hex * 2}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    import httpx

    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start; see {log}")


async def annotator(client, token: str, deadline: float, lat: dict[str, list[float]],
                    done: list[int]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        r = await client.get("/api/tasks/next", headers=headers)
        t1 = time.perf_counter()
        lat["next"].append(t1 - t0)
        if r.status_code == 204:
            return
        r.raise_for_status()
        lease = r.json()
        ids = [x["id"] for x in lease["responses"]]
        body = {"task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]],
                "idempotency_key": uuid.uuid4().hex, "time_ms": 1000}
        r = await client.post("/api/judgments", json=body, headers=headers)
        lat["submit"].append(time.perf_counter() - t1)
        r.raise_for_status()
        done[0] += 1


async def drive(port: int, tokens: list[str], seconds: float) -> tuple[int, float, dict]:
    import httpx

    lat: dict[str, list[float]] = {"next": [], "submit": []}
    done = [0]
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits,
                                 timeout=30) as client:
        start = time.perf_counter()
        await asyncio.gather(*(annotator(client, t, start + seconds, lat, done)
                               for t in tokens))
        elapsed = time.perf_counter() - start
    return done[0], elapsed, lat


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
    proc = start_server(url, port, work / "server.log")
    try:
        n, elapsed, lat = asyncio.run(drive(port, tokens, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"db={args.db} annotators={args.annotators} seconds={elapsed:.1f} cpus={os.cpu_count()}")
    print(f"judgments={n} judgments/s={n / elapsed:.1f} requests/s={2 * n / elapsed:.1f}")
    for kind, values in lat.items():
        print(f"{kind:>6}: p50={pct(values, 0.5):.1f} ms  p99={pct(values, 0.99):.1f} ms  "
              f"n={len(values)}")


if __name__ == "__main__":
    main()
