"""A real browser (Debian's chromium via Playwright): the admin page shows the judgments per
annotator group, the work aimed at each, and marks the group that falls behind."""

from __future__ import annotations

import pytest
from _live import PASSWORD, chromium, live_server, login

from rewardloop.app import accounts
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def live(sqlite_store):
    with sqlite_store.write() as s:
        accounts.add_user(s, "boss", "admin", password=PASSWORD)
        for name, group in (("n1", "nurses"), ("n2", "nurses"), ("d1", "doctors")):
            accounts.add_user(s, name, "annotator", password=PASSWORD, groups=[group])
        batch = T.get_or_create_batch(s, "web")
        T.create_tasks_from_candidates(s, [{"prompt": f"q{i}", "responses": ["a", "b"]}
                                           for i in range(5)], batch=batch, overlap=3)
    with sqlite_store.write() as s:  # the nurses judge 5 tasks each, the doctor only 1
        for name, quota in (("n1", 5), ("n2", 5), ("d1", 1)):
            ann = accounts.get_user(s, name)
            for k in range(quota):
                lease = Q.next_task(s, ann)
                view = Q.task_view(s, lease)
                ids = [r["id"] for r in view["responses"]]
                Q.submit_judgment(s, ann, view["task_id"], [[ids[0]], [ids[1]]],
                                  idempotency_key=f"{name}-{k}")
    with sqlite_store.write() as s:  # work aimed at the doctors (generate --for-groups)
        p = T.get_or_create_prompt(s, "for doctors")
        T.create_task(s, p, [T.get_or_create_response(s, p, t) for t in "xy"], overlap=2,
                      batch=batch, audience="doctors")
    with live_server(sqlite_store, "g" * 40) as base:
        yield base


def test_admin_page_shows_group_counts_and_the_group_behind(live) -> None:
    with chromium() as browser:
        page = browser.new_page()
        login(page, live, "boss")
        page.wait_for_url(f"{live}/admin")
        assert page.text_content("#total-judgments") == "11"
        nurses = page.locator('#groups tr[data-group="nurses"]')
        doctors = page.locator('#groups tr[data-group="doctors"]')
        assert nurses.locator(".count").text_content() == "10"
        assert doctors.locator(".count").text_content() == "1"
        assert doctors.locator(".aimed").text_content() == "2"
        assert nurses.locator(".aimed").text_content() == "0"
        assert doctors.locator(".behind").is_visible()
        assert nurses.locator(".behind").count() == 0
        assert "lagging" in (doctors.get_attribute("class") or "")
