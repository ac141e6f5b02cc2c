"""The admin page's per-annotator agreement: judgments without an annotator (imported) are
counted but have no agreement of their own (several of them are not one person)."""

from __future__ import annotations

from rewardloop.app.stats import UNKNOWN, _agreement


def test_anonymous_judgments_have_no_agreement_but_count_for_the_known() -> None:
    unit = (1, 2)
    by_task = {7: [(UNKNOWN, {unit: 1}), (UNKNOWN, {unit: 1}), ("ann", {unit: 0})]}
    per, total = _agreement(by_task)
    assert UNKNOWN not in per
    assert per["ann"] == [0, 2]  # disagreed with both imported votes
    assert total == [1, 3]  # every pair of votes still counts overall
