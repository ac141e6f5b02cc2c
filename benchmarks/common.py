"""Shared harness: run each side of a comparison in its own process launch and tabulate.

Each benchmark module exposes ``main()`` that, when called with ``--side NAME``, runs one side
and prints a single JSON object as its LAST stdout line (figures such as ``samples_per_s``,
``peak_rss_mb``, ``eval_accuracy``). Without ``--side`` it launches every side in a fresh
subprocess (so peak memory is per side, not shared) and prints the table with ratios.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_side(module: str, side: str, args: Sequence[str] = (), timeout: float = 1800) -> dict:
    """Run ``python -m module --side side *args`` in a fresh process; return its JSON line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--side", side, *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{module} --side {side} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} --side {side} printed no JSON result:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def reading(key: str, ours: Any, theirs: Any) -> str:
    """The ratio of ``key`` in words, so its direction cannot be misread: a time (``*_s``) as
    "1.8x faster" (theirs / ours), a rate (``*_per_s``) as "1.8x the rate", memory (``*_mb``,
    ``*_gib``) as "0.5x the memory" (ours / theirs); anything else as ours / theirs."""
    try:
        a, b = float(ours), float(theirs)
        if key.endswith("per_s"):
            return f"{a / b:.2f}x the rate"
        if key.endswith("_s"):
            return f"{b / a:.2f}x faster" if a <= b else f"{a / b:.2f}x slower"
        if key.endswith(("_mb", "_gib")):
            return f"{a / b:.2f}x the memory"
        return f"{a / b:.2f}x"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def print_table(title: str, results: dict[str, dict], keys: Sequence[str],
                ours: str = "rewardloop", theirs: str = "trl") -> None:
    """Print one row per key: each side's value and how ours compares (``reading``)."""
    sides = list(results)
    print(f"\n## {title}")
    print("| metric | " + " | ".join(sides) + f" | {ours} vs {theirs} |")
    print("|---" * (len(sides) + 2) + "|")
    for key in keys:
        vals = [results[s].get(key) for s in sides]
        shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals]
        r = reading(key, results.get(ours, {}).get(key), results.get(theirs, {}).get(key))
        print(f"| {key} | " + " | ".join(shown) + f" | {r} |")
    sys.stdout.flush()


def median_after_warmup(times: Sequence[float], warmup: int = 2) -> float | None:
    """The steady-state step time: the median of ``times`` after the first ``warmup``."""
    steady = sorted(times[warmup:])
    if not steady:
        return None
    mid = len(steady) // 2
    return steady[mid] if len(steady) % 2 else (steady[mid - 1] + steady[mid]) / 2


def step_timer() -> Any:
    """A transformers TrainerCallback that records the seconds of every optimizer step
    (``.times``), for TRL's side of ``median_step_s`` (ours is in summary.json)."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.times: list[float] = []
            self._last: float | None = None

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            if self._last is not None:
                self.times.append(now - self._last)
            self._last = now

    return StepTimer()
