"""The annotate page as HTML (what annotators are shown), lease renewal, and the login
redirects around it, and the admin page's exports (audit s11: U6, U8, U9, U12, U13, U16)."""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import select

from rewardloop.app.render import markdown, prompt_text
from rewardloop.data import schema as S


def test_markdown_keeps_what_the_model_wrote() -> None:
    lines = markdown("Roses are red\nViolets are blue")
    assert lines.count("<br") == 1  # a single newline is a line break, not a space
    image = markdown("Here is the chart: ![sales *chart*](https://x.org/c.png) done")
    assert "[image: sales chart] https://x.org/c.png" in image and "<img" not in image
    heading = markdown("# Heading one\n\n## two")
    assert "<h4" in heading and "<h5" in heading and "<h1" not in heading
    hebrew = markdown("שלום.\n\n- אחד")
    assert hebrew.count('dir="auto"') == 2
    unsafe = markdown('<b>x</b> ![a](javascript:alert(1)) [l](javascript:x) <img src=x>')
    assert "<b>" not in unsafe and 'href="javascript' not in unsafe and "<img" not in unsafe
    chat = [{"role": "user", "content": "hi *there*"}, {"role": "assistant", "content": "yes"}]
    assert prompt_text(chat) == "user: hi *there*\n\nassistant: yes"


def test_page_carries_the_raw_text_escaped_and_the_form_in_order(server) -> None:
    for tid in server.task_ids[:-1]:
        with server.store.write() as s:
            s.get(S.ComparisonTask, tid).done = True
    c, _ = server.login("ann")
    html = c.get("/annotate").text
    xss_task = server.task_ids[-1]
    # Plain text view: the raw answer, escaped, in a pre-wrap block.
    plain = re.findall(r'<div class="plain" dir="auto">(.*?)</div>', html, re.S)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; " \
        "[link](javascript:alert(2))" in plain
    assert "Say hi" in plain
    # Task heading and title name the task; the form comes before the buttons that submit.
    assert f'<h1 id="task-heading" tabindex="-1">Task {xss_task}: compare 2 answers</h1>' in html
    assert f"<title>Task {xss_task} · Annotate" in html
    assert html.index('name="strength"') < html.index('data-choice="1"')
    assert html.index('id="rationale"') < html.index('data-choice="1"')
    assert re.search(r'name="strength" value="" checked', html)  # "not given" can be chosen
    assert 'draggable="true"' not in html  # pairwise: answer text stays selectable
    assert 'data-lease-seconds="' in html


def _lease(server, user: str) -> dict:
    r = server.client(user).get("/api/tasks/next")
    assert r.status_code == 200
    return r.json()


def _expire(server, task_id: int, annotator: str) -> None:
    with server.store.write() as s:
        aid = s.scalar(select(S.Annotator.id).where(S.Annotator.name == annotator))
        lease = s.scalar(select(S.Assignment).where(S.Assignment.task_id == task_id,
                                                    S.Assignment.annotator_id == aid))
        lease.expires_at = S.utcnow() - dt.timedelta(seconds=1)


def test_renew_extends_own_open_lease_only(make_server, sqlite_store) -> None:
    server = make_server(sqlite_store, n_tasks=2, overlap=1)
    ann, bob = server.client("ann"), server.client("bob")
    task = _lease(server, "ann")["task_id"]
    _expire(server, task, "ann")  # ran out, but nobody took it: renewed
    r = ann.post(f"/api/tasks/{task}/renew")
    assert r.status_code == 200, r.text
    assert 595 <= r.json()["seconds_left"] <= 600 and r.json()["task_id"] == task
    assert bob.post(f"/api/tasks/{task}/renew").status_code == 404  # not bob's lease
    assert ann.post("/api/tasks/999/renew").status_code == 404
    assert server.client().post(f"/api/tasks/{task}/renew").status_code == 401
    cookie, _csrf = server.login("ann")
    assert cookie.post(f"/api/tasks/{task}/renew").status_code == 403  # no CSRF header
    # Ran out and bob took the only slot: 409, and ann's judgment would be refused too.
    _expire(server, task, "ann")
    assert _lease(server, "bob")["task_id"] == task
    r = ann.post(f"/api/tasks/{task}/renew")
    assert r.status_code == 409 and "someone else took it" in r.json()["detail"]
    # A judged task has no lease left to renew.
    other = _lease(server, "ann")
    ids = [x["id"] for x in other["responses"]]
    assert ann.post("/api/judgments", json={"task_id": other["task_id"], "idempotency_key": "k",
                                            "ranking": [[ids[0]], [ids[1]]]}).status_code == 201
    assert ann.post(f"/api/tasks/{other['task_id']}/renew").status_code == 404


def test_renew_refuses_a_task_that_is_complete(make_server, sqlite_store) -> None:
    """A task closed while the lease is open (an admin, or judgments elsewhere) is not kept."""
    server = make_server(sqlite_store, n_tasks=1, overlap=1)
    ann = server.client("ann")
    task = _lease(server, "ann")["task_id"]
    with server.store.write() as s:
        s.get(S.ComparisonTask, task).done = True
    r = ann.post(f"/api/tasks/{task}/renew")
    assert r.status_code == 409 and "complete" in r.json()["detail"]


def test_renew_moves_the_expiry_in_the_store(server) -> None:
    task = _lease(server, "ann")["task_id"]
    with server.store.write() as s:
        lease = s.scalar(select(S.Assignment).where(S.Assignment.task_id == task))
        lease.expires_at = S.utcnow() + dt.timedelta(seconds=30)
    assert server.client("ann").post(f"/api/tasks/{task}/renew").status_code == 200
    with server.store.read() as s:
        lease = s.scalar(select(S.Assignment).where(S.Assignment.task_id == task))
        left = (lease.expires_at.replace(tzinfo=dt.UTC) - S.utcnow()).total_seconds()
    assert left > 590
    # The lease it renewed is still the one the next call returns (not a new one).
    assert _lease(server, "ann")["task_id"] == task


def test_unknown_batch_is_a_page_and_login_comes_back(server) -> None:
    c, _ = server.login("ann")
    r = c.get("/annotate", params={"batch": "nope"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "There is no batch named" in r.text and "nope" in r.text
    anon = server.client()
    r = anon.get("/annotate", params={"batch": "b1"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fannotate%3Fbatch%3Db1"
    form = anon.get(r.headers["location"]).text
    assert '<input type="hidden" name="next" value="/annotate?batch=b1">' in form
    r = anon.post("/login", data={"username": "ann", "password": server.password,
                                  "next": "/annotate?batch=b1"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/annotate?batch=b1"


def test_login_refuses_foreign_next_and_keeps_the_user_name(server) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "annotate"):
        c = server.client()
        r = c.post("/login", data={"username": "ann", "password": server.password,
                                   "next": target}, follow_redirects=False)
        assert r.headers["location"] == "/annotate", target
        assert "evil" not in c.get("/login", params={"next": target}).text
    r = server.client().post("/login", data={"username": "ann", "password": "wrong password"})
    assert r.status_code == 401 and 'name="username" value="ann"' in r.text


def test_admin_tables_scroll_on_their_own(server) -> None:
    c, _ = server.login("admin")
    html = c.get("/admin").text
    assert html.count('<div class="table-wrap"><table') == html.count("<table") >= 3
    assert html.count("<caption>") == html.count("<table")


def test_admin_export_links_download_or_say_why_not(server) -> None:
    """U16: the admin page's export links are a download, and a failure is a page that says why
    (a link to the JSON API left only a cancelled download when the session had ended)."""
    c, _ = server.login("admin")
    html = c.get("/admin").text
    links = re.findall(r'href="(/admin/export\?format=\w+)"', html)
    assert len(links) == 4 and " download>" not in html
    r = c.get(links[0])
    assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment")
    r = c.get("/admin/export", params={"format": "trl", "batch": "nope"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    assert "The export failed" in r.text and "nope" in r.text and 'href="/admin"' in r.text
    r = c.get("/admin/export", params={"format": "kto", "batch": "b1"})
    assert r.status_code == 422 and "kto exports ratings" in r.text
    r = c.get("/admin/export", params={"format": "csv"})
    assert r.status_code == 404 and "no export format" in r.text
    annotator, _ = server.login("ann")
    r = annotator.get(links[0])
    assert r.status_code == 403 and "for admins" in r.text
    r = server.client().get(links[0], follow_redirects=False)  # the session ended
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fadmin"


def test_the_lease_length_is_the_servers_setting(make_server, sqlite_store) -> None:
    """`serve --lease-minutes` (audit s12 concurrency: the lease length was fixed at 10
    minutes): handing out and renewing both use it."""
    from fastapi.testclient import TestClient

    from rewardloop.app.main import create_app

    server = make_server(sqlite_store)
    app = create_app(sqlite_store, secret="s" * 40, lease_s=30 * 60)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {server.tokens['ann']}"
    lease = client.get("/api/tasks/next").json()
    left = (dt.datetime.fromisoformat(lease["lease_expires_at"])
            - dt.datetime.now(dt.UTC)).total_seconds()
    assert 29 * 60 < left <= 30 * 60
    renewed = client.post(f"/api/tasks/{lease['task_id']}/renew").json()
    assert 29 * 60 < renewed["seconds_left"] <= 30 * 60
