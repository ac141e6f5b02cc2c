"""Fixtures for the annotation server: an app on a fresh store with an admin, two annotators
(passwords and bearer tokens) and a few tasks, plus a TestClient per user."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from rewardloop.app import accounts
from rewardloop.app.main import create_app
from rewardloop.feedback import tasks as T

PASSWORD = "correct horse battery"
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)> [link](javascript:alert(2))'


@dataclass
class Server:
    app: object
    store: object
    tokens: dict[str, str]
    task_ids: list[int]
    xss: str = XSS
    password: str = PASSWORD  # every user's

    def client(self, user: str | None = None) -> TestClient:
        c = TestClient(self.app)
        if user is not None:
            c.headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return c

    def login(self, user: str) -> tuple[TestClient, str]:
        c = TestClient(self.app)
        r = c.post("/api/login", json={"username": user, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return c, r.json()["csrf_token"]


def populate(store, *, n_tasks: int = 4, overlap: int = 2, users=("ann", "bob")) -> Server:
    tokens = {}
    with store.write() as s:
        for name, role in [("admin", "admin")] + [(u, "annotator") for u in users]:
            user = accounts.add_user(s, name, role, password=PASSWORD)
            tokens[name] = accounts.new_token(s, user)
        batch = T.get_or_create_batch(s, "b1", guidelines="Prefer **correct** answers.")
        rows = [{"prompt": f"Question {i}?", "responses": [f"Answer {i}a", f"Answer {i}b"]}
                for i in range(n_tasks - 1)]
        rows.append({"prompt": "Say hi", "responses": ["hi", XSS]})
        ids = [t.id for t in T.create_tasks_from_candidates(s, rows, overlap=overlap,
                                                             batch=batch)]
    return Server(create_app(store, secret="s" * 40), store, tokens, ids)


@pytest.fixture
def server(sqlite_store) -> Server:
    return populate(sqlite_store)


@pytest.fixture
def any_server(store) -> Server:
    """The same, on SQLite and PostgreSQL."""
    return populate(store)


@pytest.fixture(scope="session")
def make_server():
    """``populate`` itself, for tests that need other users or task counts."""
    return populate


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on right now (for tests that start `rewardloop serve`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def file_server(tmp_path):
    """``file_server(n_tasks, overlap) -> (url, Server)``: users and tasks in a SQLite file that
    a `rewardloop serve` process can open (the store is closed again)."""
    from rewardloop.data.store import Store

    def make(n_tasks: int, overlap: int) -> tuple[str, Server]:
        url = f"sqlite:///{tmp_path / 'serve.db'}"
        store = Store(url)
        server = populate(store, n_tasks=n_tasks, overlap=overlap)
        store.dispose()
        return url, server

    return make
