"""Shared fixtures. ``store`` runs each store test on SQLite and, when a server is given by
``REWARDLOOP_TEST_PG_URL``, on PostgreSQL too (a schema per xdist worker, emptied per test)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

# One math thread per test process: `make test` runs two xdist workers on two cores, and with
# more threads OpenMP spin-waiting makes tiny models crawl. Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

PG_URL = os.environ.get("REWARDLOOP_TEST_PG_URL")
PG_SKIP_REASON = (
    "PostgreSQL tests need a server: set REWARDLOOP_TEST_PG_URL="
    "postgresql+psycopg://USER:PASS@127.0.0.1:5432/DB (.ci/run starts one)"
)


def _pg_url_for_worker(worker: str) -> str:
    from sqlalchemy import create_engine, text

    schema = f"rl_{worker}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, worker_id: str) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not PG_URL:
        pytest.skip(PG_SKIP_REASON)
    yield _pg_url_for_worker(worker_id)


@pytest.fixture
def store(db_url: str):
    """A migrated Store on a fresh database (SQLite and PostgreSQL)."""
    from rewardloop.data.store import Store

    st = Store(db_url)
    yield st
    st.dispose()


@pytest.fixture
def sqlite_store(tmp_path: Path):
    """A migrated Store on a fresh SQLite file, for tests that need no PostgreSQL run."""
    from rewardloop.data.store import Store

    st = Store(f"sqlite:///{tmp_path / 'test.db'}")
    yield st
    st.dispose()


# -- run directories for the report tests (unit and browser) ------------------------------------


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _rl_run(d: Path, steps: int = 6) -> Path:
    """An RL run as train grpo writes it (the metric names of metrics.jsonl)."""
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "steps": steps, "wall_s": 1.5, "alarms": ["proxy reward rose while gold fell at step 3"]}))
    _write_jsonl(d / "metrics.jsonl", [
        {"step": i, "reward/mean": 0.1 * i, "gold/mean": 0.5 - 0.02 * i, "kl_k1": 0.01 * i,
         "kl_k3": 0.011 * i, "kl_seq_k1": 0.3 * i, "entropy": 0.05, "loss": 1e-8,
         "completion_length_mean": 40.0 + i, "completion_length_max": 48,
         "truncated_frac": 0.1, "grad_norm": 0.5, "clip_frac": 0.0} for i in range(1, steps + 1)])
    (d / "samples.jsonl").write_text(json.dumps(
        {"prompt": "hi", "before": "<script>alert(1)</script>", "after": "Hello!"}) + "\n")
    return d


def _rm_run(d: Path) -> Path:
    """A reward-model run: training curves, and held-out figures logged once at the end."""
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "steps": 4, "eval_accuracy": 0.7, "calibration_bins": [
            {"confidence": 0.6, "accuracy": 0.55, "count": 5, "bin_low": 0.5, "bin_high": 0.6},
            {"confidence": 0.8, "accuracy": 0.75, "count": 5, "bin_low": 0.7, "bin_high": 0.8}]}))
    rows = [{"step": i, "loss": 0.7 - 0.05 * i, "grad_norm": 0.2, "accuracy": 0.5 + 0.05 * i,
             "rewards/chosen": 0.01 * i, "rewards/rejected": -0.01 * i} for i in range(1, 5)]
    rows.append({"step": 4, "eval_loss": 0.6, "eval_accuracy": 0.7, "length_correlation": 0.1})
    _write_jsonl(d / "metrics.jsonl", rows)
    return d


def _eval_run(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps({"win_rate": 0.6, "win_rate_ci": [0.5, 0.7],
                                             "n": 40, "judge": "gold", "policy_name": "round-1",
                                             "baseline_name": "start"}))
    (d / "quality.json").write_text(json.dumps({"krippendorff_alpha": 0.41, "annotators": {
        "ann-1": {"judgments": 10, "agreement": 0.8, "reliability": 0.9, "flags": []},
        "spam": {"judgments": 10, "agreement": 0.5, "reliability": 0.5, "flags": ["spam"]}}}))
    return d


@pytest.fixture
def report_runs(tmp_path: Path) -> list[Path]:
    """A demo-like set of run directories: a reward model, an RL policy, an evaluation."""
    return [_rm_run(tmp_path / "rm"), _rl_run(tmp_path / "policy"), _eval_run(tmp_path / "eval")]
