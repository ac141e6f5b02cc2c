"""The annotate page labels answers past Z as AA, AB, ... (a task may have 64)."""

from __future__ import annotations

from rewardloop.app.pages import answer_label


def test_labels_go_on_past_z_like_spreadsheet_columns() -> None:
    labels = [answer_label(i) for i in range(64)]
    assert labels[:3] == ["A", "B", "C"] and labels[25] == "Z"
    assert labels[26:29] == ["AA", "AB", "AC"] and labels[51] == "AZ" and labels[52] == "BA"
    assert len(set(labels)) == 64
    assert answer_label(26 + 26 * 26) == "AAA"


def test_a_task_of_many_answers_shows_each_label_once_and_two_digit_keys(make_server,
                                                                         sqlite_store) -> None:
    from rewardloop.feedback import tasks as T

    server = make_server(sqlite_store, n_tasks=1)
    with sqlite_store.write() as s:
        T.create_tasks_from_candidates(
            s, [{"prompt": "many", "responses": [f"r{i}" for i in range(30)]}], kind="ranking",
            batch=T.get_or_create_batch(s, "wide"))
    client, _ = server.login("ann")
    html = client.get("/annotate?batch=wide").text
    assert 'data-label="AD"' in html and html.count('data-label="A"') == 1
    assert "<kbd>01</kbd> Answer A" in html and "<kbd>30</kbd> Answer AD" in html
