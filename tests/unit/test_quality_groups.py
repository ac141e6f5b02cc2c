"""The agreement and length flags against hand-built judgments: systematic disagreement is
`contrarian`, not `spam`, and a group's consistent taste is no flag.

Every pool judges the same pairwise tasks; task t compares responses 2t+1 and 2t+2. The
majority taste prefers the smaller id on even tasks and the larger on odd ones, and the
preferred answer is always the longer one. An annotator's noise is a set of residues of t mod 8
on which they answer against their own taste, so every figure below can be counted by hand.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rewardloop.feedback import flags as F
from rewardloop.feedback import quality as Q
from rewardloop.feedback.quality import JudgmentRecord, QualityReport

N_TASKS = 120  # 15 blocks of 8


def _judge(t: int, name: str, group: str | None, lo_wins: bool) -> JudgmentRecord:
    lo, hi = 2 * t + 1, 2 * t + 2
    # The majority's winner is the longer answer (60 characters against 20).
    liked = lo if t % 2 == 0 else hi
    return JudgmentRecord(
        judgment_id=0, annotator=name, groups=(group,) if group else (), task_id=t,
        kind="pairwise", ranking=[[lo], [hi]] if lo_wins else [[hi], [lo]],
        lengths={liked: 60, lo + hi - liked: 20})


def analyze(records: list[JudgmentRecord]) -> QualityReport:
    return Q.analyze([replace(r, judgment_id=i) for i, r in enumerate(records)])


def _annotator(name: str, group: str | None, *, inverted: bool = False,
               noise: frozenset[int] = frozenset()) -> list[JudgmentRecord]:
    """The majority taste (or its opposite when ``inverted``), reversed on tasks t with
    t % 8 in ``noise``."""
    return [_judge(t, name, group, (t % 2 == 0) ^ inverted ^ (t % 8 in noise))
            for t in range(N_TASKS)]


def _clicker(name: str, group: str | None) -> list[JudgmentRecord]:
    """Picks the smaller id on tasks 0, 1 mod 4, the larger on 2, 3 mod 4: independent of the
    majority taste (even/odd), so it agrees with it on exactly half the tasks."""
    return [_judge(t, name, group, t % 4 < 2) for t in range(N_TASKS)]


def _crowd(group: str | None = "crowd", size: int = 4) -> list[JudgmentRecord]:
    """Honest annotators of the majority taste, each wrong on one residue of its own (0, 1,
    ...): at most one of them is wrong on any task, so their majority is the taste."""
    return [r for i in range(size)
            for r in _annotator(f"crowd-{i}", group, noise=frozenset({i}))]


def test_random_clicker_is_still_spam() -> None:
    report = analyze(_crowd() + _clicker("clicker", None))
    clicker = report.annotators["clicker"]
    # Chance: own shares 1/2 each, times the others' majority (always clear): 1/2.
    assert clicker.agreement == pytest.approx(0.5)
    assert clicker.chance_agreement == pytest.approx(0.5)
    assert clicker.flags == ["spam"]
    assert clicker.peer_group is None  # no group: compared with everyone


def test_honest_noisy_annotator_is_not_flagged() -> None:
    """75% agreement (wrong on two residues of eight) is ordinary human noise."""
    report = analyze(_crowd() + _annotator("noisy", "crowd", noise=frozenset({4, 5})))
    noisy = report.annotators["noisy"]
    assert noisy.agreement == pytest.approx(0.75)
    assert noisy.flags == []
    assert all(not q.flags for q in report.annotators.values())


@pytest.mark.parametrize("group", ["crowd", None])
def test_inverted_annotator_is_contrarian_not_spam(group: str | None) -> None:
    """Agreement 1/8 against chance 1/2 is systematic disagreement, far outside "within 0.15
    of chance": not noise. In the crowd's group it is measured against its group-mates,
    without a group against everyone: here the same people."""
    report = analyze(_crowd() + _annotator("inverted", group, inverted=True,
                                           noise=frozenset({4})))
    inverted = report.annotators["inverted"]
    assert inverted.agreement == pytest.approx(1 / 8)
    assert inverted.chance_agreement == pytest.approx(0.5)
    assert inverted.peer_group == group
    # Length: it prefers the longer answer 1 time in 8, the crowd 7 in 8.
    assert inverted.flags == ["contrarian", "length_bias"]


def _two_groups() -> list[JudgmentRecord]:
    """Five of the crowd (wrong on residues 0-4), and three critics of the opposite taste,
    wrong on residues 5, 6, 7."""
    critics = [r for i in (5, 6, 7)
               for r in _annotator(f"critic-{i}", "critics", inverted=True,
                                   noise=frozenset({i}))]
    return _crowd(size=5) + critics


def test_a_consistent_minority_taste_is_no_flag() -> None:
    """Pooled, everyone reads as noise or bias: a critic agrees with the majority of the other
    seven on 1/8 of the tasks, a crowd member on 3/8 (on residues 1-4 one crowd-mate is wrong
    and the three critics outvote the rest), and each group's longer-wins rate (7/8, 1/8) is
    far from everyone else's. Against their own group each agrees well: no flags."""
    report = analyze(_two_groups())
    assert report.annotators["critic-5"].agreement == pytest.approx(1 / 8)
    assert report.annotators["crowd-0"].agreement == pytest.approx(3 / 8)
    # critic-5 against critic-6 and critic-7: wrong on 5, a tie (1/2) on 6 and 7.
    assert report.annotators["critic-5"].peer_agreement == pytest.approx(6 / 8)
    assert report.annotators["crowd-0"].peer_agreement == pytest.approx(7 / 8)
    for name, q in report.annotators.items():
        assert q.flags == [], (name, q)
        group = "critics" if name.startswith("critic") else "crowd"
        assert q.peer_group == q.length_peer_group == group
    doc = report.to_json()["annotators"]["critic-5"]
    assert doc["peer_group"] == doc["length_peer_group"] == "critics"
    assert doc["peer_agreement"] == pytest.approx(6 / 8)


def test_without_groups_the_same_minority_is_flagged() -> None:
    """The judgments of the test above with no groups: the pooled reference is all there is,
    and the critics disagree with it systematically (as a lone member would)."""
    report = analyze([replace(r, groups=()) for r in _two_groups()])
    for i in (5, 6, 7):
        assert report.annotators[f"critic-{i}"].flags == ["contrarian", "length_bias"]
        assert report.annotators[f"critic-{i}"].peer_group is None


def test_a_lone_member_group_that_disagrees_is_contrarian() -> None:
    lone = _annotator("lone", "solo", inverted=True, noise=frozenset({4}))
    report = analyze(_crowd() + lone)
    q = report.annotators["lone"]
    assert q.peer_group is None and q.length_peer_group is None  # a group of one: everyone
    assert "contrarian" in q.flags and "spam" not in q.flags


def test_a_noisy_group_mate_does_not_make_an_honest_annotator_spam() -> None:
    """An honest annotator whose only group-mate is a random clicker agrees with the clicker
    at chance; against everyone else they agree well, so it is not their noise."""
    records = _crowd(None) + _annotator("honest", "pair", noise=frozenset({4, 5})) \
        + _clicker("clicker", "pair")
    report = analyze(records)
    assert report.annotators["honest"].peer_group == "pair"
    assert report.annotators["honest"].peer_agreement == pytest.approx(0.5)
    assert report.annotators["honest"].flags == []
    assert report.annotators["clicker"].flags == ["spam"]


@pytest.mark.parametrize(("credit", "expected"), [
    # 120 units, chance 0.5, margin 0.15; p-values of Binomial(120, p):
    (60, "near"),  # P(X <= 60 | 0.65) = 0.00052: no better than 0.65
    (55, "near"),
    (50, "near"),  # 0.417, and not significantly below 0.35 (P(X <= 50 | 0.35) > 0.9)
    (28, "below"),  # 0.233: P(X <= 28 | 0.35) = 0.0040 (before: called spam)
    (30, "near"),  # 0.25: P(X <= 30 | 0.35) = 0.012, not significantly below 0.35
    (90, None),  # 0.75: above chance + 0.15
])
def test_band_test_around_chance(credit: int, expected: str | None) -> None:
    a = F.Agreement(compared=120, agreement=credit / 120, chance=0.5, credit=credit)
    assert F._versus_chance(a, F.Thresholds()) == expected
    assert F._versus_chance(F.Agreement(19, 0.5, 0.5, 9.5), F.Thresholds()) is None


def test_a_group_with_little_evidence_clears_nobody() -> None:
    """Review s12 H2: a group-mate who shares only 25 of a random clicker's units (a group
    test without enough evidence) cleared the clicker; an inverted labeller beside an honest
    group-mate went unflagged. The group may only clear an annotator it clearly agrees with."""
    mate = [r for r in _annotator("mate", "pair") if r.task_id < 25]
    report = analyze(_crowd(None) + mate + _clicker("clicker", "pair"))
    assert report.annotators["clicker"].peer_group == "pair"
    assert report.annotators["clicker"].flags == ["spam"]
    report = analyze(_crowd(None) + _annotator("mate", "pair", noise=frozenset({0}))
                     + _annotator("inverted", "pair", inverted=True, noise=frozenset({1})))
    flags = report.annotators["inverted"].flags
    assert report.annotators["inverted"].peer_group == "pair"
    assert "contrarian" in flags and "spam" not in flags
