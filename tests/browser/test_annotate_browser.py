"""A real browser (Debian's chromium via Playwright): log in, judge two tasks with the keyboard,
log in as admin and download an export."""

from __future__ import annotations

import json

import pytest
from _live import PASSWORD, chromium, live_server, login
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
    csp_errors: list[str] = []
    with chromium() as browser:
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
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 and all("ranking" in r for r in rows)
    assert not csp_errors, csp_errors
    with sqlite_store.read() as s:
        judgments = s.scalars(select(S.Judgment).order_by(S.Judgment.id)).all()
        assert len(judgments) == 2
        assert len(judgments[1].ranking) == 1  # "t" recorded a tie
        assert all(j.time_ms is not None and j.shown_order for j in judgments)


@pytest.fixture
def live_ranking(sqlite_store):
    """A 12-answer ranking task (two-digit keys) and then a 3-answer one, for ``ann``."""
    with sqlite_store.write() as s:
        accounts.add_user(s, "ann", "annotator", password=PASSWORD)
        batch = T.get_or_create_batch(s, "rank")
        rows = [{"prompt": "Twelve?", "responses": [f"answer {i}" for i in range(12)]},
                {"prompt": "Three?", "responses": ["x", "y", "z"]}]
        T.create_tasks_from_candidates(s, rows, kind="ranking", batch=batch)
    with live_server(sqlite_store, "c" * 40) as base:
        yield base


def _rank_list(page) -> list[str]:
    return [li.text_content() for li in page.query_selector_all("#rank-list li")]


def test_rank_twelve_answers_by_keys_and_drag_keeps_ties(live_ranking, sqlite_store) -> None:
    with chromium() as browser:
        page = browser.new_page()
        login(page, live_ranking, "ann")
        page.wait_for_url(f"{live_ranking}/annotate")
        assert page.text_content("#task kbd") == "01"
        first = page.get_attribute("#task", "data-task-id")
        for n in [12, *range(1, 12)]:  # answer 12 first, then 1 to 11
            for digit in f"{n:02d}":
                page.keyboard.press(digit)
        labels = [f"Answer {c}" for c in "LABCDEFGHIJK"]
        assert _rank_list(page) == labels
        shown = [int(a.get_attribute("data-id"))
                 for a in page.query_selector_all("#task .answer")]
        page.keyboard.press("Enter")
        page.wait_for_function(
            "id => document.getElementById('task').dataset.taskId !== id", arg=first)
        # The 3-answer task: A and B tie, then C is dragged onto A: C first, A = B kept.
        for key in ("1", "t", "2"):
            page.keyboard.press(key)
        assert _rank_list(page) == ["Answer A = Answer B"]
        page.drag_and_drop("#task .answer[data-label='C'] .handle",
                           "#task .answer[data-label='A']")
        assert _rank_list(page) == ["Answer C", "Answer A = Answer B"]
    with sqlite_store.read() as s:
        (judgment,) = s.scalars(select(S.Judgment)).all()
    assert judgment.ranking == [[shown[11]], *[[i] for i in shown[:11]]]
