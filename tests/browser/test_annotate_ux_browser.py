"""The annotate page in a real browser: keyboard safety, ranking by drag and tap, what the
annotator sees, errors and the lease (audit s11, findings U1-U16)."""

from __future__ import annotations

import pytest
from _live import PASSWORD, chromium, live_server, login
from sqlalchemy import select

from rewardloop.app import accounts
from rewardloop.data import schema as S
from rewardloop.feedback import tasks as T

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG = "\n\n".join(f"Paragraph {i} of a long answer, with some words in it." for i in range(150))
POEM = "Roses are red\nViolets are blue\n\n![chart](https://x.org/c.png) and 2*3*4"
WIDE = ("שלום עולם, זו תשובה.\n\n```\n" + "x" * 400 + "\n```\n\n| a | b | c | d | e | f |\n"
        "|---|---|---|---|---|---|\n| " + " | ".join(["longcellcontent" * 4] * 6) + " |")
NEW_TASK = ("id => document.getElementById('task') && "
            "document.getElementById('task').dataset.taskId !== id")


@pytest.fixture
def live(sqlite_store):
    with sqlite_store.write() as s:
        accounts.add_user(s, "ann", "annotator", password=PASSWORD)
        long = T.get_or_create_batch(s, "long")
        T.create_tasks_from_candidates(s, [{"prompt": f"Long {i}?", "responses": [LONG, LONG + "!"]}
                                           for i in range(4)], batch=long)
        rank = T.get_or_create_batch(s, "rank", guidelines="Rank **carefully**.")
        T.create_tasks_from_candidates(
            s, [{"prompt": f"Rank {i}?", "responses": ["alpha", "bravo", "charlie", "delta"]}
                for i in range(3)], kind="ranking", batch=rank)
        render = T.get_or_create_batch(s, "render")
        T.create_tasks_from_candidates(s, [{"prompt": "Show?", "responses": [POEM, WIDE]}],
                                       batch=render)
    with live_server(sqlite_store, "d" * 40) as base:
        yield base


def _open(browser, base: str, batch: str, **context):
    page = browser.new_context(**context).new_page()
    login(page, base, "ann")
    page.wait_for_url(f"{base}/annotate")
    page.goto(f"{base}/annotate?batch={batch}")
    return page


def _judgments(store) -> list[S.Judgment]:
    with store.read() as s:
        return list(s.scalars(select(S.Judgment).order_by(S.Judgment.id)).all())


def _rank_list(page) -> list[str]:
    return [li.text_content() for li in page.query_selector_all("#rank-list li")]


def _shown(page) -> dict[str, int]:
    return {a.get_attribute("data-label"): int(a.get_attribute("data-id"))
            for a in page.query_selector_all("#task .answer")}


def test_enter_on_a_control_does_what_the_control_does(live, sqlite_store) -> None:
    """U1: Enter on Clear clears, Enter on Guidelines opens them; neither submits."""
    with chromium() as browser:
        page = _open(browser, live, "rank")
        first = page.get_attribute("#task", "data-task-id")
        for key in "213":
            page.keyboard.press(key)
        assert _rank_list(page) == ["Answer B", "Answer A", "Answer C"]
        page.focus("button[data-choice='clear']")
        page.keyboard.press("Enter")
        assert _rank_list(page) == []
        page.focus("summary")
        page.keyboard.press("Enter")
        assert page.evaluate("document.querySelector('details').open")
        page.focus("#shortcuts")
        page.keyboard.press("Enter")
        page.wait_for_timeout(300)
        assert page.get_attribute("#task", "data-task-id") == first
        assert _judgments(sqlite_store) == []
        for key in "1234":
            page.keyboard.press(key)
        page.focus("#task-heading")  # not a control: Enter submits the ranking
        page.keyboard.press("Enter")
        page.wait_for_function(NEW_TASK, arg=first)
    assert len(_judgments(sqlite_store)) == 1


def test_a_drag_places_only_the_dragged_answer(live, sqlite_store) -> None:
    """U5: one drag ranks one answer; the unplaced ones stay unranked and block submit."""
    with chromium() as browser:
        page = _open(browser, live, "rank")
        page.drag_and_drop("#task .answer[data-label='D'] .handle",
                           "#task .answer[data-label='A']")
        assert _rank_list(page) == ["Answer D"]
        assert "Answer A, Answer B, Answer C" in page.text_content("#unranked")
        assert page.text_content(".answer[data-label='B'] .rank-badge") == "unranked"
        page.focus("#task-heading")
        page.keyboard.press("Enter")
        assert "Rank all answers first" in page.text_content("#status")
        page.drag_and_drop("#task .answer[data-label='C'] .handle",
                           "#task .answer[data-label='D'] .handle")
        assert _rank_list(page) == ["Answer C", "Answer D"]
        page.wait_for_timeout(200)
    assert _judgments(sqlite_store) == []


def test_rank_by_tapping_on_a_phone(live, sqlite_store) -> None:
    """U4: a touch user ranks with the per-answer buttons."""
    with chromium() as browser:
        page = _open(browser, live, "rank", viewport={"width": 390, "height": 844},
                     is_mobile=True, has_touch=True)
        shown = _shown(page)
        first = page.get_attribute("#task", "data-task-id")
        for label in "CA":
            page.tap(f".answer[data-label='{label}'] button[data-place]")
        page.tap(".answer[data-label='D'] button[data-tie]")
        assert _rank_list(page) == ["Answer C", "Answer A = Answer D"]
        assert page.is_disabled(".answer[data-label='C'] button[data-place]")
        page.tap("button[data-choice='submit']")
        page.wait_for_function(NEW_TASK, arg=first)
    (judgment,) = _judgments(sqlite_store)
    assert [sorted(g) for g in judgment.ranking] == [
        [shown["C"]], sorted([shown["A"], shown["D"]]), [shown["B"]]]


def test_next_task_opens_at_its_top_with_focus_and_news(live) -> None:
    """U2, U13: the next task opens scrolled to the top, its heading focused, "Saved." said."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        first = page.get_attribute("#task", "data-task-id")
        assert page.title().startswith(f"Task {first} ·")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        assert page.evaluate("window.scrollY") > 1000
        page.keyboard.press("2")
        page.wait_for_function(NEW_TASK, arg=first)
        page.wait_for_load_state()
        assert page.evaluate("window.scrollY") == 0
        assert page.evaluate("document.activeElement.id") == "task-heading"
        assert page.text_content("#status").startswith("Saved.")
        assert page.locator(".answer h1, .answer h2, .answer h3 h3").count() == 0


def test_strength_and_reason_come_first_and_keys_work_from_them(live, sqlite_store) -> None:
    """U9: strength and rationale precede the choice; a key pressed on a strength radio, or
    after Escape left the rationale, chooses."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        first = page.get_attribute("#task", "data-task-id")
        assert page.evaluate("""() => {
            const radio = document.querySelector('input[name=strength][value=strong]');
            const choice = document.querySelector('button[data-choice="1"]');
            const after = radio.compareDocumentPosition(choice);
            return Boolean(after & Node.DOCUMENT_POSITION_FOLLOWING);
        }""")
        page.check("input[name=strength][value=strong]")
        page.keyboard.press("1")  # focus is on the radio
        page.wait_for_function(NEW_TASK, arg=first)
        second = page.get_attribute("#task", "data-task-id")
        page.fill("#rationale", "B is shorter")
        page.keyboard.press("Escape")
        page.keyboard.press("2")
        page.wait_for_function(NEW_TASK, arg=second)
        assert page.is_checked("input[name=strength][value='']")  # not carried over
    one, two = _judgments(sqlite_store)
    assert one.strength == "strong" and two.rationale == "B is shorter" and two.strength is None


def test_shortcuts_can_be_turned_off_and_skip_asks_first(live, sqlite_store) -> None:
    """U10: the shortcut switch is remembered; `s` asks before skipping."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        first = page.get_attribute("#task", "data-task-id")
        page.uncheck("#shortcuts")
        page.reload()
        assert not page.is_checked("#shortcuts")
        page.focus("#task-heading")
        for key in ("1", "s", "s"):
            page.keyboard.press(key)
        page.wait_for_timeout(300)
        assert page.get_attribute("#task", "data-task-id") == first
        assert _judgments(sqlite_store) == []
        page.check("#shortcuts")
        page.focus("#task-heading")
        page.keyboard.press("s")
        assert "Press s again" in page.text_content("#status")
        page.keyboard.press("Escape")
        page.keyboard.press("s")
        page.wait_for_timeout(300)
        assert page.get_attribute("#task", "data-task-id") == first
        page.keyboard.press("s")
        page.wait_for_function(NEW_TASK, arg=first)
        assert page.text_content("#status").startswith("Skipped.")


def test_key_hints_are_readable(live) -> None:
    """U11: the <kbd> on a primary button is dark on light, not white on near-white."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        colour = page.evaluate("getComputedStyle(document.querySelector("
                               "'button[data-choice=\"1\"] kbd')).color")
        assert colour == "rgb(29, 31, 35)"


def test_formatted_or_plain_text_rtl_and_phone_width(live) -> None:
    """U6, U12, U3: line breaks and images stay visible, plain text shows the raw answer (and
    is remembered), Hebrew runs right to left, and long lines do not widen a phone page."""
    with chromium() as browser:
        page = _open(browser, live, "render")
        poem = page.locator(".answer", has_text="Roses")
        formatted = poem.locator(".formatted").inner_text()
        assert "Roses are red\nViolets are blue" in formatted
        assert "[image: chart] https://x.org/c.png" in formatted
        assert not poem.locator(".plain").is_visible()
        page.check("input[name=view][value=plain]")
        page.reload()
        assert page.is_checked("input[name=view][value=plain]")
        assert not poem.locator(".formatted").is_visible()
        assert poem.locator(".plain").is_visible()
        assert poem.locator(".plain").inner_text() == POEM
        hebrew = page.locator(".answer", has_text="שלום")
        assert hebrew.locator(".plain").evaluate("e => getComputedStyle(e).unicodeBidi") == \
            "plaintext"
        page.check("input[name=view][value=formatted]")
        assert hebrew.locator(".formatted p").first.evaluate(
            "e => getComputedStyle(e).direction") == "rtl"
        phone = _open(browser, live, "render", viewport={"width": 390, "height": 844})
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390


def test_a_lost_answer_after_saving_is_not_reported_unsaved(live, sqlite_store) -> None:
    """U7: the first response is lost after the judgment was stored; the page sends the same
    request again, learns it was saved and goes on (one judgment, never "Not saved")."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        lost: list[int] = []

        def lose_first(route) -> None:
            if lost:
                route.continue_()
                return
            lost.append(route.fetch().status)
            route.abort()

        page.route("**/api/judgments", lose_first)
        first = page.get_attribute("#task", "data-task-id")
        page.check("input[name=strength][value=clear]")
        page.keyboard.press("2")
        page.wait_for_function(NEW_TASK, arg=first)
        assert lost == [201]
        assert page.text_content("#status").startswith("Saved.")
        # Another tab holds the same task, which this one then judges: "already saved".
        other = page.context.new_page()
        other.goto(f"{live}/annotate?batch=long")
        second = page.get_attribute("#task", "data-task-id")
        assert other.get_attribute("#task", "data-task-id") == second
        page.keyboard.press("1")
        page.wait_for_function(NEW_TASK, arg=second)
        other.keyboard.press("2")
        other.wait_for_function(NEW_TASK, arg=second)
        assert other.text_content("#status").startswith("This task was already saved.")
    assert [j.strength for j in _judgments(sqlite_store)] == ["clear", None]


def test_an_ended_session_keeps_what_was_typed(live, sqlite_store) -> None:
    """U7: after the session ends, the page says to log in again, links there, and the task
    comes back with the rationale and strength that were typed."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        first = page.get_attribute("#task", "data-task-id")
        page.fill("#rationale", "A cites its source")
        page.check("input[name=strength][value=slight]")
        page.context.clear_cookies()
        page.keyboard.press("1")
        page.wait_for_function("() => /session has ended/.test("
                               "document.getElementById('status').textContent)")
        page.click("#status a")
        page.fill('input[name="password"]', PASSWORD)
        assert page.input_value('input[name="username"]') == ""
        page.fill('input[name="username"]', "ann")
        page.click('button[type="submit"]')
        page.wait_for_url(f"{live}/annotate?batch=long")
        assert page.get_attribute("#task", "data-task-id") == first
        assert page.input_value("#rationale") == "A cites its source"
        assert page.is_checked("input[name=strength][value=slight]")
        page.keyboard.press("1")
        page.wait_for_function(NEW_TASK, arg=first)
    (judgment,) = _judgments(sqlite_store)
    assert judgment.rationale == "A cites its source" and judgment.strength == "slight"


def _clocked_page(browser, live: str):
    """ann's annotate page on a fake clock (lease timers run when the test says)."""
    page = browser.new_context().new_page()
    page.clock.install()
    login(page, live, "ann")
    page.wait_for_url(f"{live}/annotate")
    return page


def _lease_ends_in(store, seconds: int) -> None:
    with store.write() as s:
        lease = s.scalar(select(S.Assignment))
        lease.expires_at = S.utcnow() + S.dt.timedelta(seconds=seconds)


def _lease_left_s(store) -> float:
    with store.read() as s:
        return (s.scalar(select(S.Assignment)).expires_at.replace(tzinfo=S.dt.UTC)
                - S.utcnow()).total_seconds()


def test_lease_is_renewed_while_active_and_warns_when_idle(live, sqlite_store) -> None:
    """U8: an active reader's lease is renewed; an idle one is told before it runs out."""
    with chromium() as browser:
        page = _clocked_page(browser, live)
        assert "Reserved for you until" in page.text_content("#lease")
        _lease_ends_in(sqlite_store, 120)  # as if the page had been open for 8 minutes
        page.mouse.move(50, 50)
        page.mouse.move(80, 90)
        with page.expect_response("**/renew") as renewed:
            page.clock.run_for(130_000)
        assert renewed.value.status == 200
        assert _lease_left_s(sqlite_store) > 500
        page.clock.run_for(8 * 60_000 + 30_000)  # nobody touches the page
        assert "reserved for you only until" in page.text_content("#lease")


def test_a_page_opened_late_in_its_lease_keeps_it(live, sqlite_store) -> None:
    """A page opened (or reloaded) with a minute of its lease left renews it at once, not after
    the 2-minute renewal period (by then the lease would have run out)."""
    with chromium() as browser:
        page = _clocked_page(browser, live)
        _lease_ends_in(sqlite_store, 60)  # the lease has 60 s left when the page is reloaded
        with page.expect_response("**/renew") as renewed:
            page.reload()
        assert renewed.value.status == 200
        assert "Reserved for you until" in page.text_content("#lease")
        assert _lease_left_s(sqlite_store) > 500


def test_ranking_says_what_happened_and_tie_is_cancellable(live) -> None:
    """U13, U15: each pick is announced with its answer; `t` says it waits for a number, and
    Backspace cancels it."""
    with chromium() as browser:
        page = _open(browser, live, "rank")
        page.keyboard.press("2")
        assert page.text_content("#status") == "Answer B ranked 1st."
        page.keyboard.press("t")
        assert page.text_content("#status").startswith("Tie with Answer B")
        page.keyboard.press("Backspace")
        page.keyboard.press("3")
        assert _rank_list(page) == ["Answer B", "Answer C"]
        page.keyboard.press("t")
        page.keyboard.press("1")
        assert _rank_list(page) == ["Answer B", "Answer C = Answer A"]
        assert page.get_attribute("#rank-list", "aria-label") == "Your ranking"


def test_answer_text_can_be_selected(live) -> None:
    """U14: a mouse drag across an answer selects its text (answers are not draggable)."""
    with chromium() as browser:
        page = _open(browser, live, "long")
        box = page.locator(".answer .formatted p").first.bounding_box()
        page.mouse.move(box["x"] + 2, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.move(box["x"] + 150, box["y"] + box["height"] / 2, steps=5)
        page.mouse.up()
        assert len(page.evaluate("String(window.getSelection())")) > 5
