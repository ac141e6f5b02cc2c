"""Shared fixtures. ``store`` runs each store test on SQLite and, when a server is given by
``REWARDLOOP_TEST_PG_URL``, on PostgreSQL too (a schema per xdist worker, emptied per test)."""

from __future__ import annotations

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
