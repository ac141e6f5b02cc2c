"""The JSON API: every route with no credentials, a bad token, the wrong user, malformed and
oversized bodies; idempotent judgments; CSRF on cookie sessions; XSS in model text."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import func, select

from rewardloop.app import accounts
from rewardloop.data import schema as S
from rewardloop.feedback import tasks as T

ROUTES = [
    ("GET", "/api/tasks/next", None),
    ("POST", "/api/judgments", {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": "k"}),
    ("POST", "/api/tasks/1/skip", None),
    ("POST", "/api/logout", None),
    ("POST", "/api/admin/tasks", {"rows": [{"prompt": "p", "responses": ["a", "b"]}],
                                  "batch": "x"}),
    ("GET", "/api/admin/stats", None),
    ("GET", "/api/admin/export?format=trl", None),
]
ADMIN_ROUTES = [r for r in ROUTES if "/admin/" in r[1]]


def _judge(client, lease, key=None, ranking=None, **fields):
    ids = [r["id"] for r in lease["responses"]]
    body = {"task_id": lease["task_id"], "ranking": ranking or [[ids[0]], [ids[1]]],
            "idempotency_key": key or uuid.uuid4().hex, "strength": "clear", "time_ms": 500,
            **fields}
    return client.post("/api/judgments", json=body)


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_no_credentials_and_bad_token_are_401(server, method, path, body) -> None:
    anon = server.client()
    assert anon.request(method, path, json=body).status_code == 401
    anon.headers["Authorization"] = "Bearer not-a-real-token"
    assert anon.request(method, path, json=body).status_code == 401
    anon.cookies.set("rl_session", "forged")
    del anon.headers["Authorization"]
    assert anon.request(method, path, json=body).status_code == 401


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_annotators_cannot_use_admin_routes(server, method, path, body) -> None:
    r = server.client("ann").request(method, path, json=body)
    assert r.status_code == 403 and r.json()["detail"] == "admins only"


def test_health_openapi_and_security_headers(server) -> None:
    c = server.client()
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "database": "sqlite"}
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/api/login", "/api/tasks/next", "/api/judgments", "/api/admin/stats"} <= set(paths)
    # One user's pages, answers and exports are kept by no cache; static files may be.
    admin = server.client("admin")
    for r in (server.client("ann").get("/api/tasks/next"), admin.get("/admin"),
              admin.get("/api/admin/export"), c.get("/login")):
        assert r.headers["cache-control"] == "no-store", r.request.url
    assert "cache-control" not in c.get("/static/app.css").headers


def test_next_submit_replay_and_conflicts(any_server) -> None:
    ann, bob = any_server.client("ann"), any_server.client("bob")
    lease = ann.get("/api/tasks/next").json()
    assert ann.get("/api/tasks/next").json()["task_id"] == lease["task_id"]  # held lease
    r1 = _judge(ann, lease, key="key-1")
    assert r1.status_code == 201 and r1.json()["created"] is True
    r2 = _judge(ann, lease, key="key-1")
    assert r2.status_code == 200 and r2.json()["id"] == r1.json()["id"]
    assert not r2.json()["created"]
    ids = [r["id"] for r in lease["responses"]]
    r3 = _judge(ann, lease, key="key-1", ranking=[[ids[1]], [ids[0]]])
    assert r3.status_code == 409 and "different judgment" in r3.json()["detail"]
    # Every field is compared: a replay must not silently drop a new strength or rationale.
    for other in ({"strength": "strong"}, {"rationale": "second thoughts"}, {"time_ms": 9},
                  {"strength": None}):
        r = _judge(ann, lease, key="key-1", **other)
        assert r.status_code == 409, other
        assert next(iter(other)) in r.json()["detail"]
    assert _judge(ann, lease).status_code == 409  # already judged, new key
    # Keys are per annotator: ann's key does not block bob's judgment of the same task.
    bob_lease = bob.get("/api/tasks/next").json()
    assert bob_lease["task_id"] == lease["task_id"]
    assert _judge(bob, bob_lease, key="key-1").status_code == 201
    with any_server.store.read() as s:
        assert s.scalar(select(func.count()).select_from(S.Judgment)) == 2
        j = s.scalars(select(S.Judgment).where(S.Judgment.id == r1.json()["id"])).one()
        bobs = s.scalars(select(S.Judgment).where(S.Judgment.annotator_id != j.annotator_id)
                         ).one()
        assert bobs.time_ms == 500
        assert j.shown_order == ids and j.time_ms == 500 and j.strength == "clear"
        assert j.guideline_version is not None and j.rationale is None


def test_task_errors(server) -> None:
    ann = server.client("ann")
    # Without a lease the answer says nothing about the task: not whether it exists, nor
    # (through a ranking error) which response ids it has.
    unknown = {"task_id": 10**6, "ranking": [[1], [2]], "idempotency_key": "u"}
    r = ann.post("/api/judgments", json=unknown)
    assert r.status_code == 403 and "not leased" in r.json()["detail"]
    other = server.task_ids[-1]
    r = ann.post("/api/judgments", json={"task_id": other, "ranking": [[1], [2]],
                                         "idempotency_key": "n"})
    assert r.status_code == 403 and "not leased" in r.json()["detail"]
    lease = ann.get("/api/tasks/next").json()
    bad = {"task_id": lease["task_id"], "ranking": [[999999], [888888]], "idempotency_key": "b"}
    r = ann.post("/api/judgments", json=bad)
    assert r.status_code == 422 and "ranking" in r.json()["detail"]
    assert ann.post("/api/tasks/999999/skip").status_code == 404


def test_annotator_only_sees_own_lease(server) -> None:
    ann, bob = server.client("ann"), server.client("bob")
    lease = ann.get("/api/tasks/next").json()
    r = _judge(bob, lease)  # bob never leased it
    assert r.status_code == 403 and "not leased" in r.json()["detail"]


def test_malformed_bodies(server) -> None:
    ann = server.client("ann")
    bad_json = ann.post("/api/judgments", content=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 422
    for body in ({}, {"task_id": "x", "ranking": [[1]], "idempotency_key": "k"},
                 {"task_id": 1, "ranking": [], "idempotency_key": "k"},
                 {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": ""},
                 {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": "k", "evil": 1},
                 {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": "k",
                  "strength": "huge"}, [1, 2, 3]):
        assert ann.post("/api/judgments", json=body).status_code == 422, body
    admin = server.client("admin")
    r = admin.post("/api/admin/tasks", json={"rows": [{"prompt": "p", "responses": ["a"]}],
                                             "batch": "x"})
    assert r.status_code == 422
    assert server.client().post("/api/login", json={"username": "ann"}).status_code == 422


def test_oversized_body_is_413(server) -> None:
    ann = server.client("ann")
    big = {"task_id": 1, "ranking": [[1], [2]], "idempotency_key": "k",
           "rationale": "x" * (2 * 1024 * 1024)}
    r = ann.post("/api/judgments", content=json.dumps(big),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert "content-security-policy" in r.headers

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b"x" * 65536

    r = ann.post("/api/judgments", content=chunks(),
                 headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_login_cookie_csrf_and_logout(server) -> None:
    c, csrf = server.login("ann")
    cookie = c.cookies.jar._cookies  # noqa: SLF001 - inspect the flags the server set
    assert cookie
    r = c.post("/api/login", json={"username": "ann", "password": "correct horse battery"})
    header = r.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header
    lease = c.get("/api/tasks/next").json()
    assert _judge(c, lease).status_code == 403  # cookie without CSRF header
    c.headers["X-CSRF-Token"] = "wrong"
    assert _judge(c, lease).status_code == 403
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    assert _judge(c, lease).status_code == 201
    assert c.post("/api/logout").status_code == 204
    c.cookies.set("rl_session", server.login("ann")[0].cookies["rl_session"])  # other session
    assert csrf != r.json()["csrf_token"]


def test_logout_revokes_session(server) -> None:
    c, csrf = server.login("bob")
    session_cookie = c.cookies["rl_session"]
    assert c.post("/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    replay = server.client()
    replay.cookies.set("rl_session", session_cookie)
    assert replay.get("/api/tasks/next").status_code == 401


def test_wrong_password_and_rate_limit(server) -> None:
    c = server.client()
    for _ in range(5):
        r = c.post("/api/login", json={"username": "ann", "password": "wrong password"})
        assert r.status_code == 401
    r = c.post("/api/login", json={"username": "ann", "password": "correct horse battery"})
    assert r.status_code == 429
    unknown = c.post("/api/login", json={"username": "nobody", "password": "whatever1"})
    assert unknown.status_code == 401


def test_deactivated_user_and_new_token(server) -> None:
    with server.store.write() as s:
        fresh = accounts.new_token(s, accounts.get_user(s, "bob"))
    old = server.client("bob")
    assert old.get("/api/tasks/next").status_code == 401  # revoked by the new token
    new = server.client()
    new.headers["Authorization"] = f"Bearer {fresh}"
    assert new.get("/api/tasks/next").status_code == 200
    with server.store.write() as s:
        accounts.deactivate_user(s, "bob")
    assert new.get("/api/tasks/next").status_code == 401
    with server.store.read() as s:
        hashes = s.scalars(select(S.ApiToken.token_hash)).all()
        assert fresh not in hashes and accounts.token_hash(fresh) in hashes


def test_skip_and_drain_to_204(server) -> None:
    ann = server.client("ann")
    first = ann.get("/api/tasks/next").json()
    assert ann.post(f"/api/tasks/{first['task_id']}/skip").status_code == 204
    seen = {first["task_id"]}
    for _ in range(10):
        r = ann.get("/api/tasks/next")
        if r.status_code == 204:
            break
        lease = r.json()
        assert lease["task_id"] not in seen
        seen.add(lease["task_id"])
        assert _judge(ann, lease).status_code == 201
    assert r.status_code == 204 and seen == set(server.task_ids)


def test_xss_stored_raw_served_sanitised(server) -> None:
    ann = server.client("ann")
    xss_task = server.task_ids[-1]
    with server.store.read() as s:
        assert s.scalar(select(func.count()).where(S.Response.text == server.xss)) == 1
    for tid in server.task_ids[:-1]:
        with server.store.write() as s:
            s.get(S.ComparisonTask, tid).done = True
    lease = ann.get("/api/tasks/next").json()
    assert lease["task_id"] == xss_task
    assert server.xss in [r["text"] for r in lease["responses"]]  # JSON carries the raw text
    c, _ = server.login("ann")
    page = c.get("/annotate")
    assert page.status_code == 200
    html = page.text
    assert "<script>alert" not in html and "<img" not in html
    assert 'href="javascript' not in html
    assert "&lt;script&gt;alert(" in html and "&lt;img src=x onerror" in html  # shown as text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "<script" not in html.split('<script src="/static/annotate.js">')[0].lower()


def test_admin_create_stats_export(server) -> None:
    admin = server.client("admin")
    rows = [{"prompt": "Gold?", "responses": ["right", "wrong"]}]
    r = admin.post("/api/admin/tasks", json={"rows": rows, "batch": "gold", "overlap": 2,
                                             "gold": {"0": [[0], [1]]}})
    assert r.status_code == 201 and r.json()["created"] == 1
    gold_id = r.json()["task_ids"][0]
    for name in ("ann", "bob"):
        c = server.client(name)
        while (resp := c.get("/api/tasks/next")).status_code == 200:
            lease = resp.json()
            by_text = {x["text"]: x["id"] for x in lease["responses"]}
            if lease["task_id"] == gold_id and name == "bob":  # bob gets gold wrong
                ranking = [[by_text["wrong"]], [by_text["right"]]]
            else:
                ranking = sorted([[x["id"]] for x in lease["responses"]])
            assert _judge(c, lease, ranking=ranking).status_code == 201
    stats = admin.get("/api/admin/stats").json()
    n = 2 * (len(server.task_ids) + 1)
    assert stats["judgments"] == n and stats["progress"]["done"] == len(server.task_ids) + 1
    per = {a["name"]: a for a in stats["annotators"]}
    assert per["ann"]["gold_accuracy"] == 1.0 and per["bob"]["gold_accuracy"] == 0.0
    assert stats["agreement"] == pytest.approx((len(server.task_ids)) / (n // 2))
    assert 0.0 <= stats["position_bias"] <= 1.0 and len(stats["recent"]) == min(n, 20)
    for fmt in ("trl", "ranking", "hh"):
        r = admin.get(f"/api/admin/export?format={fmt}")
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()]
        assert lines and "attachment" in r.headers["content-disposition"]
    assert len([json.loads(x) for x in admin.get("/api/admin/export?format=ranking")
                .text.splitlines()]) == n
    assert admin.get("/api/admin/export?format=csv").status_code == 422


def test_a_task_aimed_at_a_group_is_served_only_to_its_annotators(server) -> None:
    """ann is in group "night"; a task aimed at it (highest priority) is what ann is served
    next, bob (no group) is served everything else and never it; the admin stats count the
    labels still wanted from the group."""
    with server.store.write() as s:
        s.scalar(select(S.Annotator).where(S.Annotator.name == "ann")).groups = ["night"]
        p = T.get_or_create_prompt(s, "Night shift?")
        aimed = T.create_task(s, p, [T.get_or_create_response(s, p, t) for t in ("yes", "no")],
                              overlap=2, priority=9.0, audience="night").id
    bob = server.client("bob")
    seen = []
    while (resp := bob.get("/api/tasks/next")).status_code == 200:
        lease = resp.json()
        seen.append(lease["task_id"])
        assert _judge(bob, lease, ranking=[[x["id"]] for x in lease["responses"]]).status_code \
            == 201
    assert sorted(seen) == sorted(server.task_ids)
    stats = server.client("admin").get("/api/admin/stats").json()
    assert stats["groups"]["night"]["aimed_open"] == 2
    ann = server.client("ann")
    lease = ann.get("/api/tasks/next").json()
    assert lease["task_id"] == aimed
    assert _judge(ann, lease, ranking=[[x["id"]] for x in lease["responses"]]).status_code == 201
    stats = server.client("admin").get("/api/admin/stats").json()
    assert stats["groups"]["night"]["aimed_open"] == 1


def test_a_batch_aimed_at_other_groups_answers_like_an_unknown_one(server) -> None:
    """bob (no group) cannot tell a batch aimed only at "night" from a name nobody uses, on the
    API and the page, and the page's progress counts only tasks he may be handed; ann (night)
    and the admin work on the batch and see it."""
    with server.store.write() as s:
        s.scalar(select(S.Annotator).where(S.Annotator.name == "ann")).groups = ["night"]
        batch = T.get_or_create_batch(s, "nightbatch")
        p = T.get_or_create_prompt(s, "Night shift?")
        for i in range(3):
            T.create_task(s, p, [T.get_or_create_response(s, p, f"{t}{i}") for t in "ab"],
                          batch=batch, audience="night")
    bob = server.client("bob")
    for name in ("nightbatch", "doesnotexist"):
        r = bob.get("/api/tasks/next", params={"batch": name})
        assert r.status_code == 404 and r.json()["detail"] == (
            f"no batch named {name!r} with tasks for you")
    page = server.login("bob")[0]
    pages = [page.get("/annotate", params={"batch": n}) for n in ("nightbatch", "doesnotexist")]
    assert [r.status_code for r in pages] == [404, 404]
    assert pages[0].text.replace("nightbatch", "doesnotexist") == pages[1].text
    # Overall progress on bob's page counts the tasks for everyone, not the 3 aimed at night.
    with server.store.read() as s:
        everyone = s.scalar(select(func.count(S.ComparisonTask.id)).where(
            S.ComparisonTask.audience.is_(None)))
    assert f"of {everyone} tasks complete" in page.get("/annotate").text
    ann = server.client("ann")
    assert ann.get("/api/tasks/next", params={"batch": "nightbatch"}).status_code == 200
    ann_page = server.login("ann")[0].get("/annotate", params={"batch": "nightbatch"}).text
    assert "Batch <b>nightbatch</b>: 0 of 3 tasks complete" in ann_page
    admin = server.client("admin")
    assert admin.get("/api/tasks/next", params={"batch": "nightbatch"}).status_code == 204
