"""Server hardening (issue 18), tested in process: each test here failed before its fix.
The ones that need a real `rewardloop serve` process are in test_serve_hardening.py."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from rewardloop.app import accounts
from rewardloop.app.deps import tokens_equal
from rewardloop.app.main import create_app
from rewardloop.app.security import LoginLimiter
from rewardloop.app.writer import GroupWriter, WriterUnavailable
from rewardloop.cli import app as cli_app
from rewardloop.data import schema as S
from rewardloop.data.store import Store

# -- M1: validation errors and body limits ------------------------------------------------------


def test_validation_errors_name_fields_but_never_echo_values(server) -> None:
    c = server.client()
    r = c.post("/api/login", content="username=ann&password=s3cret-pass",
               headers={"Content-Type": "text/plain"})
    assert r.status_code == 422 and "s3cret" not in r.text and "input" not in r.text
    r = server.client("ann").post("/api/judgments", json={
        "task_id": 1, "ranking": [["x"]] * 60, "idempotency_key": "k", "evil" * 100: 1})
    detail = r.json()["detail"]
    assert r.status_code == 422 and len(detail) == 11  # 10 errors and a count of the rest
    assert detail[-1]["type"] == "too_many_errors"
    assert all(len(str(part)) <= 64 for e in detail for part in e["loc"])
    assert '"x"' not in r.text


def test_small_body_cap_except_task_upload(server) -> None:
    body = {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": "k", "rationale": "x" * 9000}
    r = server.client("ann").post("/api/judgments", content=json.dumps(body) + " " * 70_000,
                                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "64 KiB" in r.json()["detail"]
    rows = [{"prompt": f"p{i}", "responses": ["a" * 400, "b" * 400]} for i in range(150)]
    r = server.client("admin").post("/api/admin/tasks", json={"rows": rows, "batch": "big"})
    assert r.status_code == 201 and r.json()["created"] == 150  # ~125 KB: an upload


# -- M2: login limits ---------------------------------------------------------------------------


def test_limiter_counts_an_attempt_before_it_is_checked() -> None:
    limiter = LoginLimiter(per_pair=5)
    attempts = [limiter.start("ann", "10.0.0.1") for _ in range(7)]  # all in flight at once
    assert sum(a is not None for a in attempts) == 5
    limiter.withdraw(attempts[0], clear_pair=True)  # a success forgets the pair's failures
    assert limiter.start("ann", "10.0.0.1") is not None


def test_limiter_limits_one_address_and_one_name_across_the_other() -> None:
    limiter = LoginLimiter(per_pair=5, per_addr=20, per_user=20)
    assert all(limiter.start(f"user{i}", "10.0.0.1") for i in range(20))
    assert limiter.start("someone-else", "10.0.0.1") is None  # one address, many names
    assert all(limiter.start("admin", f"10.1.0.{i}") for i in range(20))
    assert limiter.start("admin", "10.2.0.1") is None  # one name, many addresses
    assert limiter.start("bob", "10.3.0.1") is not None


def test_a_name_tried_from_many_hosts_does_not_lock_its_user_out(server) -> None:
    """The per-name limit alone let anyone who knows a name lock its user out, admins too
    (audit s14, security M1): an address the user signed in from before still gets in;
    one they never used, and every guessing host, stay refused."""
    limiter = LoginLimiter(per_pair=5, per_addr=20, per_user=2)
    server.app.state.login_limiter = limiter
    c = server.client()
    login = {"username": "ann", "password": server.password}
    assert c.post("/api/login", json=login).status_code == 200  # ann's usual address
    for i in range(2):  # the name tried from other hosts
        assert limiter.start("ann", f"10.0.0.{i}") is not None
        assert limiter.start("admin", f"10.0.0.{i}") is not None
    assert limiter.start("ann", "10.0.0.9") is None  # guessing hosts stay capped
    assert limiter.start("ann", "10.0.0.9", known=lambda: False) is None
    assert c.post("/api/login", json=login).status_code == 200
    r = c.post("/api/login", json={"username": "admin", "password": server.password})
    assert r.status_code == 429  # admin never signed in from here
    with server.store.read() as session:
        assert accounts.signed_in_from(session, "ann", "testclient")
        assert not accounts.signed_in_from(session, "ann", "10.0.0.1")
        assert not accounts.signed_in_from(session, "nobody", "testclient")


def test_concurrent_password_checks_are_capped(server, monkeypatch) -> None:
    """At most ``max_checks`` argon2 checks run at once; the rest wait, then get 503."""
    server.app.state.login_limiter = LoginLimiter(max_checks=2)
    running, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()
    real = accounts.check_password

    def slow_check(session, name, password):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(3)
        with lock:
            running[0] -= 1
        return real(session, name, password)

    monkeypatch.setattr(accounts, "check_password", slow_check)

    def login(i: int) -> int:
        return server.client().post("/api/login", json={"username": f"u{i}", "password": "x" * 9}
                                    ).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(login, range(6)))
    release.set()
    assert peak[0] == 2
    assert codes.count(503) >= 1 and set(codes) <= {401, 503}, codes


# -- M3: proxy and public URL -------------------------------------------------------------------


def test_public_url_is_accepted_as_origin_and_makes_cookies_secure(sqlite_store, make_server):
    server = make_server(sqlite_store)
    app = create_app(sqlite_store, secret="s" * 40, public_url="https://annotate.example.org")
    form = {"username": "ann", "password": server.password}
    c = TestClient(app)
    r = c.post("/login", data=form, headers={"Origin": "https://annotate.example.org"},
               follow_redirects=False)
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    r = c.post("/login", data=form, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--public-url", "annotate.example.org", "is not an origin"),
    ("--public-url", "https://annotate.example.org/path", "is not an origin"),
    ("--public-url", "https://host:port", "is not an origin"),
    ("--forwarded-allow-ips", "10.0.0.5,proxy.local", "is not an IP address"),
    ("--forwarded-allow-ips", " , ", "at least one"),
])
def test_serve_refuses_bad_proxy_settings(tmp_path, flag, value, message) -> None:
    res = CliRunner().invoke(cli_app, ["serve", "--db", f"sqlite:///{tmp_path / 'x.db'}",
                                       flag, value])
    assert res.exit_code == 2 and message in res.output, res.output


# -- item 4: CSRF token with non-ASCII characters -----------------------------------------------


def test_non_ascii_csrf_token_is_403_not_500(server) -> None:
    assert tokens_equal("abc", "abc") and not tokens_equal("é", "abc")
    c, csrf = server.login("ann")
    lease = c.get("/api/tasks/next").json()
    ids = [x["id"] for x in lease["responses"]]
    r = c.post("/api/judgments", json={"task_id": lease["task_id"], "ranking": [ids[:1], ids[1:]],
                                       "idempotency_key": "k"},
               headers={"X-CSRF-Token": "é".encode()})
    assert r.status_code == 403
    cookie = c.cookies["rl_session"]
    r = c.post("/logout", data={"csrf_token": "jé"}, follow_redirects=False)
    assert r.status_code == 303
    c.cookies.set("rl_session", cookie)
    assert c.get("/api/tasks/next").status_code == 200  # that logout was refused


# -- item 5: the writer thread --------------------------------------------------------------------


def test_writer_skips_cancelled_operations_and_survives_errors(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    writer = GroupWriter(store)
    gate, started, ran = threading.Event(), threading.Event(), []

    def hold(_session):
        started.set()
        gate.wait(10)

    first = writer.submit(hold)
    started.wait(10)
    cancelled = writer.submit(lambda s: ran.append("cancelled"))
    assert cancelled.cancel()
    gate.set()
    first.result(10)
    assert writer.run(lambda s: "still here", timeout=10) == "still here"
    assert ran == []

    def escapes(_session):
        raise KeyboardInterrupt  # not an Exception: used to end the thread

    with pytest.raises(KeyboardInterrupt):
        writer.run(escapes, timeout=10)
    assert writer.alive and writer.run(lambda s: 1, timeout=10) == 1
    writer.close()
    assert not writer.alive
    with pytest.raises(WriterUnavailable):
        writer.submit(lambda s: None)
    store.dispose()


def test_write_that_is_not_taken_in_time_is_withdrawn(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    writer = GroupWriter(store)
    gate, started, ran = threading.Event(), threading.Event(), []
    busy = writer.submit(lambda s: (started.set(), gate.wait(10)))
    started.wait(10)
    with pytest.raises(WriterUnavailable, match="within 0.2 s"):
        writer.run(lambda s: ran.append(1), timeout=0.2)
    gate.set()
    busy.result(10)
    assert writer.run(lambda s: "ok") == "ok" and ran == []  # the withdrawn op never ran
    writer.close()
    store.dispose()


def test_healthz_reports_a_stopped_writer(server) -> None:
    c = server.client("ann")
    assert c.get("/healthz").status_code == 200
    server.app.state.db.writer.close()
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "writer stopped"
    r = c.get("/api/tasks/next")
    assert r.status_code == 503 and "writer is stopped" in r.json()["detail"]


# -- item 8: deactivation releases leases -------------------------------------------------------


def test_deactivating_a_user_frees_their_leases(make_server, sqlite_store) -> None:
    server = make_server(sqlite_store, n_tasks=1, overlap=1)
    lease = server.client("ann").get("/api/tasks/next").json()
    assert server.client("bob").get("/api/tasks/next").status_code == 204  # ann holds it
    res = CliRunner().invoke(cli_app, ["users", "deactivate", "ann", "--db", sqlite_store.url])
    assert res.exit_code == 0, res.output
    assert server.client("bob").get("/api/tasks/next").json()["task_id"] == lease["task_id"]


# -- item 9: smaller items ----------------------------------------------------------------------


def test_500_replies_carry_the_security_headers(server) -> None:
    @server.app.get("/boom")
    def boom() -> None:
        raise RuntimeError("bug")

    r = TestClient(server.app, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500 and "bug" not in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


def test_no_docs_pages(server) -> None:
    for path in ("/docs", "/redoc"):
        assert server.client("admin").get(path).status_code == 404
    assert server.client().get("/openapi.json").status_code == 200


def test_failed_logins_and_logouts_are_audited(server) -> None:
    c = server.client()
    assert c.post("/api/login", json={"username": "ann", "password": "wrong pass"}
                  ).status_code == 401
    assert c.post("/api/login", json={"username": "a typed password", "password": "whatever1"}
                  ).status_code == 401
    c, csrf = server.login("bob")
    assert c.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    with server.store.read() as s:
        rows = s.execute(select(S.AuditEvent.action, S.AuditEvent.payload, S.Annotator.name)
                         .outerjoin(S.Annotator, S.Annotator.id == S.AuditEvent.actor_id)
                         .where(S.AuditEvent.action.like("session.%"))
                         .order_by(S.AuditEvent.id)).all()
    assert [(r.action, r.name) for r in rows] == [
        ("session.login_failed", "ann"), ("session.login_failed", None),
        ("session.login", "bob"), ("session.logout", "bob")]
    assert rows[0].payload["user"] == "ann" and rows[1].payload["user"] is None
    assert "a typed password" not in json.dumps([r.payload for r in rows])


def test_expired_and_revoked_sessions_are_purged(server) -> None:
    server.login("ann")
    c, csrf = server.login("bob")
    c.post("/api/logout", headers={"X-CSRF-Token": csrf})
    with server.store.write() as s:
        s.add(S.WebSession(session_hash="0" * 64, annotator_id=1, csrf_token="c",
                           expires_at=S.utcnow() - dt.timedelta(seconds=1)))
    server.login("ann")
    with server.store.read() as s:
        live = s.scalars(select(S.WebSession)).all()
    assert len(live) == 2 and not any(w.revoked for w in live)


def test_new_sqlite_files_are_private(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        store = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
        with store.write() as s:
            s.add(S.Setting(key="k", value="v"))
        store.backup(tmp_path / "copy.db")
        for name in ("fresh.db", "fresh.db-wal", "copy.db"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        store.dispose()
    finally:
        os.umask(old)


@pytest.mark.parametrize("bad", [{"task_id": "7"}, {"task_id": True},
                                 {"ranking": [["1"], ["2"]]}, {"ranking": [[True], [2]]},
                                 {"time_ms": "5"}])
def test_ids_must_be_json_integers(server, bad) -> None:
    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    body = {"task_id": lease["task_id"], "ranking": [[r["id"]] for r in lease["responses"]],
            "idempotency_key": uuid.uuid4().hex, **bad}
    assert ann.post("/api/judgments", json=body).status_code == 422
    with server.store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.Judgment)) == 0


def test_export_of_an_unknown_batch_is_404(server) -> None:
    r = server.client("admin").get("/api/admin/export?format=trl&batch=nope")
    assert r.status_code == 404 and "nope" in r.json()["detail"]


def test_limiter_forgets_old_attempts_under_a_spray_of_names(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("rewardloop.app.security.time.monotonic", lambda: clock[0])
    limiter = LoginLimiter(window_s=60)
    for i in range(4000):  # 3 keys each: over the 10,000 that start pruning
        limiter.start(f"name{i}", f"10.0.{i // 250}.{i % 250}")
    clock[0] += 61
    limiter.start("late", "10.9.9.9")
    assert len(limiter._attempts) == 3  # noqa: SLF001 - the memory bound itself


def test_import_keys_are_reserved(server, tmp_path) -> None:
    """A user cannot store an import's predictable key first and so make the import skip
    that record as already present."""
    from rewardloop.data.transfer import import_file

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Question 0?", "chosen": "Answer 0a",
                                "rejected": "Answer 0b"}) + "\n")
    from rewardloop.data import formats
    from rewardloop.data.bulk import record_key

    (record,) = formats.read_records(path, "trl")[1]
    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    ids = [x["id"] for x in lease["responses"]]
    r = ann.post("/api/judgments", json={"task_id": lease["task_id"],
                                         "ranking": [ids[:1], ids[1:]],
                                         "idempotency_key": record_key(record)})
    assert r.status_code == 422 and "reserved" in r.text
    assert import_file(server.store, path, "trl").imported == 1


def test_serve_warns_about_a_database_others_can_read(tmp_path) -> None:
    from rewardloop.cli.serve import readable_by_others

    url = f"sqlite:///{tmp_path / 'old.db'}"
    Store(url).dispose()
    assert readable_by_others(url) is None  # created 0600
    (tmp_path / "old.db").chmod(0o644)
    assert "chmod 600" in readable_by_others(url)
    assert readable_by_others("postgresql+psycopg://u@h/db") is None


# -- audit s14: values PostgreSQL cannot store are the client's mistake ------------------------


def test_nul_characters_and_ids_beyond_the_store_are_422_not_500(any_server, monkeypatch) -> None:
    """PostgreSQL cannot store NUL and its ids are 32-bit: such input was a 500 (before any
    login for /api/login) and made the writer roll back and rerun its whole group."""
    anon, ann = any_server.client(), any_server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    big = 2**31
    for r in (
        anon.post("/api/login", json={"username": "ann\x00", "password": "x" * 9}),
        anon.post("/login", data={"username": "ann\x00", "password": "x" * 9}),
        ann.get("/api/tasks/next", params={"batch": "round\x00"}),
        ann.get("/annotate", params={"batch": "round\x00"}),
        ann.post(f"/api/tasks/{big}/skip"),
        ann.post("/api/judgments", json={"task_id": big, "ranking": [[1], [2]],
                                         "idempotency_key": "k"}),
        ann.post("/api/judgments", json={"task_id": lease["task_id"], "ranking": [
            [lease["responses"][0]["id"]], [lease["responses"][1]["id"]]],
            "idempotency_key": "k\x00"}),
        any_server.client("admin").post("/api/admin/tasks", json={"batch": "chat", "rows": [
            {"prompt": [{"role": "user", "content": "hi\x00"}], "responses": ["a", "b"]}]}),
        any_server.client("admin").post("/api/admin/tasks", json={"batch": "b\x00", "rows": [
            {"prompt": "hi", "responses": ["a", "b"]}]}),
        any_server.client("admin").post("/api/admin/tasks", json={
            "batch": "g", "guidelines": "be kind\x00", "rows": [
                {"prompt": "hi", "responses": ["a", "b"]}]}),
    ):
        assert r.status_code == 422, (r.request.url, r.status_code, r.text)
    with any_server.store.read() as s:  # nothing of them was stored (SQLite would keep NUL)
        names = set(s.scalars(select(S.Batch.name)))
        assert not names & {"b\x00", "g", "chat"}, names
    # A value that gets past validation and is refused by the database is a 422 as well.
    from sqlalchemy.exc import DataError as StoreDataError

    from rewardloop.app import api

    def refuse(*args, **kwargs):
        raise StoreDataError("INSERT ...", {}, ValueError("integer out of range"))

    monkeypatch.setattr(api.Q, "next_task", refuse)
    r = ann.get("/api/tasks/next")
    assert r.status_code == 422 and "cannot store" in r.json()["detail"]


def test_weak_passwords_are_refused(sqlite_store, tmp_path) -> None:
    """Only the length was checked: "password", "12345678" and the user's own name were taken
    (audit s14, security L2)."""
    from rewardloop.errors import UserError

    for password, words in (("short", "at least 8"), ("Password", "first any attacker"),
                            ("12345678", "first any attacker"), ("aaaaaaaaaa", "first any"),
                            ("frankfrank!", "user name"), ("my-FRANK-pass", "user name")):
        with sqlite_store.write() as s, pytest.raises(UserError, match=words):
            accounts.add_user(s, "frank", "annotator", password=password)
    with sqlite_store.write() as s:
        accounts.add_user(s, "frank", "annotator", password="amber tiger river")
        accounts.add_user(s, "ed", "annotator", password="red tomatoes here")  # a short name
    with sqlite_store.write() as s, pytest.raises(UserError, match="user name"):
        accounts.add_user(s, "ed-the-annotator", "annotator", password="ed-the-annotator")
    weak = tmp_path / "weak"
    weak.write_text("password123\n")
    r = CliRunner().invoke(cli_app, ["users", "add", "gina", "--role", "annotator",
                                     "--password-file", str(weak), "--db", sqlite_store.url])
    assert r.exit_code == 2 and "first any attacker tries" in r.output, r.output


def test_a_claimed_time_is_capped_at_the_time_since_the_task_was_handed_out(server) -> None:
    """time_ms came from the client unchecked: one token claimed ten minutes for each of 60
    judgments a second, and the admin page showed it (audit s14, security L3). A replay of the
    same request is still the same judgment."""
    import time

    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    ids = [r["id"] for r in lease["responses"]]
    body = {"task_id": lease["task_id"], "ranking": [[ids[0]], [ids[1]]],
            "idempotency_key": "k1", "time_ms": 600_000}
    started = time.monotonic()
    first = ann.post("/api/judgments", json=body)
    took_ms = (time.monotonic() - started) * 1000
    assert first.status_code == 201
    assert ann.post("/api/judgments", json=body).status_code == 200  # the replay
    with server.store.read() as s:
        stored = s.scalar(select(S.Judgment.time_ms).where(S.Judgment.id == first.json()["id"]))
    assert 1000 <= stored <= 1000 + took_ms + 1000, stored
