"""A real browser (Debian's chromium via Playwright): log in, judge two tasks with the keyboard,
log in as admin and download an export."""

from __future__ import annotations

import json
import os

import pytest
from _live import CHROMIUM, FLAGS, PASSWORD, live_server, login
from sqlalchemy import select

from rewardloop.app import accounts
from rewardloop.data import schema as S
from rewardloop.feedback import tasks as T

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def live(sqlite_store):
    with sqlite_store.write() as s:
        for name, role in (("ann", "annotator"), ("boss", "admin")):
            accounts.add_user(s, name, role, password=PASSWORD)
        batch = T.get_or_create_batch(s, "web", guidelines="Pick the **correct** answer.")
        rows = [{"prompt": f"What is {i} + {i}?", "responses": [str(2 * i), str(2 * i + 1)]}
                for i in range(3)]
        T.create_tasks_from_candidates(s, rows, batch=batch)
    with live_server(sqlite_store, "b" * 40) as base:
        yield base


def test_judge_with_keyboard_and_export(live, sqlite_store, tmp_path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM}; set REWARDLOOP_CHROMIUM")
    sync_api = pytest.importorskip("playwright.sync_api")
    csp_errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # phone width
            page.on("console", lambda m: csp_errors.append(m.text)
                    if "Content Security Policy" in m.text else None)
            login(page, live, "ann")
            page.wait_for_url(f"{live}/annotate")
            for key in ("1", "t"):
                first = page.get_attribute("#task", "data-task-id")
                page.keyboard.press(key)
                page.wait_for_function(
                    "id => !document.getElementById('task') || "
                    "document.getElementById('task').dataset.taskId !== id", arg=first)
            assert "judged 2 tasks" in page.text_content("#progress")
            admin = browser.new_page()
            login(admin, live, "boss")
            admin.wait_for_url(f"{live}/admin")
            assert admin.text_content("#total-judgments") == "2"
            with admin.expect_download() as info:
                admin.click("#export-ranking")
            path = tmp_path / "export.jsonl"
            info.value.save_as(path)
        finally:
            browser.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and all("ranking" in r for r in rows)
    assert not csp_errors, csp_errors
    with sqlite_store.read() as s:
        judgments = s.scalars(select(S.Judgment).order_by(S.Judgment.id)).all()
        assert len(judgments) == 2
        assert len(judgments[1].ranking) == 1  # "t" recorded a tie
        assert all(j.time_ms is not None and j.shown_order for j in judgments)
