"""Agreement statistics (hand-worked and against the krippendorff package), Dawid–Skene, and
flags on planted annotator pools."""

from __future__ import annotations

import json
from pathlib import Path

import krippendorff
import numpy as np
import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.feedback import agreement as A
from rewardloop.feedback import quality as Q
from rewardloop.feedback.quality import JudgmentRecord, Thresholds, analyze
from rewardloop.feedback.records import pair_values
from rewardloop.feedback.simulate import SimulatedAnnotator


def test_alpha_hand_worked() -> None:
    # Units: {lo, lo}, {lo, hi}, {hi, hi}, {tie, tie}. Coincidences o = [[2,1,0],[1,2,0],[0,0,2]],
    # n_c = (3, 3, 2), n = 8; sum_{c!=k} o_ck = 2, sum_{c!=k} n_c n_k = 64 - 22 = 42.
    # alpha = 1 - (n - 1) * 2 / 42 = 2/3.
    units = {1: [0, 0], 2: [0, 1], 3: [1, 1], 4: [2, 2]}
    assert A.krippendorff_alpha(units) == pytest.approx(2 / 3)
    # A unit with one value is not pairable and changes nothing.
    assert A.krippendorff_alpha({**units, 5: [1]}) == pytest.approx(2 / 3)
    # Perfect agreement: 1; one value everywhere: undefined.
    assert A.krippendorff_alpha({1: [0, 0], 2: [1, 1, 1]}) == pytest.approx(1.0)
    assert A.krippendorff_alpha({1: [0, 0], 2: [0, 0]}) is None
    assert A.krippendorff_alpha({1: [0]}) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alpha_matches_krippendorff_package(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, size=60)
    data = np.where(rng.random((6, 60)) < 0.6, truth, rng.integers(0, 3, size=(6, 60)))
    matrix = data.astype(float)
    matrix[rng.random(matrix.shape) < 0.35] = np.nan  # missing judgments
    units = {u: [int(v) for v in matrix[:, u] if not np.isnan(v)] for u in range(60)}
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal",
                                  value_domain=[0, 1, 2])
    assert A.krippendorff_alpha(units) == pytest.approx(expected, abs=1e-12)
    # Interval level with lo = -1, tie = 0, hi = +1.
    interval = np.select([matrix == 0, matrix == 1, matrix == 2], [-1.0, 1.0, 0.0], np.nan)
    expected = krippendorff.alpha(reliability_data=interval, level_of_measurement="interval")
    assert A.krippendorff_alpha(units, "interval") == pytest.approx(expected, abs=1e-12)


def test_fleiss_kappa_wikipedia_example() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                      [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                      [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    # P-bar = 0.378, P_e = 0.213 (rounded on the page), kappa = 0.210.
    assert A.fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_unequal_counts_hand_worked() -> None:
    # P_i = 1, 0, 1 -> P-bar = 2/3; p_j = (6/7, 1/7, 0) -> P_e = 37/49;
    # kappa = (2/3 - 37/49) / (1 - 37/49) = -13/36. The 1-rater unit is dropped.
    counts = np.array([[2, 0, 0], [1, 1, 0], [3, 0, 0], [0, 1, 0]])
    assert A.fleiss_kappa(counts) == pytest.approx(-13 / 36)
    assert A.fleiss_kappa(np.array([[1, 0, 0]])) is None
    assert A.fleiss_kappa(np.array([[2, 0, 0], [3, 0, 0]])) is None  # P_e = 1


def test_binom_test_hand_worked_and_against_scipy() -> None:
    # n = 10, p = 1/2, k = 2: P(X <= 2) + P(X >= 8) = 2 * (1 + 10 + 45) / 1024.
    assert A.binom_test(2, 10) == pytest.approx(112 / 1024)
    assert A.binom_test(5, 10) == 1.0
    # n = 3, p = 1/4: pmf = (27, 27, 9, 1) / 64; outcomes no likelier than k = 2: {2, 3}.
    assert A.binom_test(2, 3, 0.25) == pytest.approx(10 / 64)
    assert A.binom_test(3, 3, 0.25) == pytest.approx(1 / 64)
    assert A.binom_test(1, 3, 0.25, "less") == pytest.approx(54 / 64)
    assert A.binom_test(1, 3, 0.25, "greater") == pytest.approx(37 / 64)
    from scipy.stats import binomtest

    for k, n, p, alt in [(13, 20, 0.5, "two-sided"), (70, 200, 0.65, "less"),
                         (3, 41, 0.3, "two-sided"), (60, 100, 0.7, "greater")]:
        expected = binomtest(k, n, p, alternative=alt).pvalue
        assert A.binom_test(k, n, p, alt) == pytest.approx(expected, rel=1e-9)


def test_majority_credit_splits_tied_majorities() -> None:
    assert A.majority_credit(0, [0, 0, 1]) == 1.0
    assert A.majority_credit(1, [0, 0, 1]) == 0.0
    assert A.majority_credit(0, [0, 1]) == 0.5
    assert A.majority_credit(2, [0, 1]) == 0.0
    assert A.majority_credit(2, [0, 1, 2]) == pytest.approx(1 / 3)
    assert A.majority_credit(0, []) is None


def test_pair_values_orientation_and_ties() -> None:
    assert pair_values([[12], [10, 11]]) == {(10, 12): A.HI, (11, 12): A.HI, (10, 11): A.TIE}
    assert pair_values([[3], [7]]) == {(3, 7): A.LO}


def test_dawid_skene_recovers_planted_accuracies() -> None:
    rng = np.random.default_rng(7)
    accuracy = np.array([0.95, 0.85, 0.75, 0.6, 0.5])
    truth = rng.integers(0, 2, size=400)
    ann, unit, value = [], [], []
    for j, acc in enumerate(accuracy):
        for u in range(400):
            ann.append(j)
            unit.append(u)
            value.append(truth[u] if rng.random() < acc else 1 - truth[u])
    fit = A.dawid_skene(np.array(ann), np.array(unit), np.array(value),
                        n_annotators=5, n_units=400)
    assert fit.classes == (0, 1)
    assert np.abs(fit.accuracy - accuracy).max() < 0.06
    assert (fit.posterior.argmax(axis=1) == truth).mean() > 0.95
    # Clamping units to a known answer pins their posterior.
    clamped = A.dawid_skene(np.array(ann), np.array(unit), np.array(value), n_annotators=5,
                            n_units=400, clamp={0: int(1 - truth[0])})
    assert clamped.posterior[0, 1 - truth[0]] == 1.0


def test_checking_an_annotator_never_costs_weight_unless_they_disagree() -> None:
    """a and b agree on 3 shared pairs; loner shares none; spam disagrees with both on 6."""
    records = []

    def judge(name: str, task: int, first_wins: bool) -> None:
        ids = [2 * task + 1, 2 * task + 2]
        records.append(JudgmentRecord(judgment_id=len(records), annotator=name, groups=(),
                                      task_id=task, kind="pairwise",
                                      ranking=[[ids[0]], [ids[1]]] if first_wins
                                      else [[ids[1]], [ids[0]]]))

    for t in range(3):
        judge("a", t, True)
        judge("b", t, True)
    for t in range(3, 9):
        judge("c", t, True)
        judge("d", t, True)
        judge("spam", t, False)
    judge("loner", 20, True)
    report = analyze(records)
    weights = Q.report_weights(report)
    assert report.annotators["loner"].reliability is None
    prior = Q.reliability_weight(Q.PRIOR_ACCURACY)
    assert weights["loner"] == pytest.approx(prior) == pytest.approx(0.5)
    assert weights["a"] == weights["b"] > prior  # three checks passed: above the prior
    assert weights["c"] > weights["a"]  # more evidence, more weight
    assert weights["spam"] < 0.2


# -- planted pools -----------------------------------------------------------------------------


def _planted_records(pool: list[SimulatedAnnotator], n_tasks: int, seed: int,
                     gold_every: int = 2) -> list[JudgmentRecord]:
    """Every annotator judges every pairwise task; every ``gold_every``-th task is gold."""
    rng = np.random.default_rng(seed)
    records = []
    for t in range(n_tasks):
        ids = [2 * t + 1, 2 * t + 2]
        texts = ["x" * int(rng.integers(10, 300)) for _ in ids]
        gold = rng.normal(size=2)
        gold_ranking = [[ids[int(np.argmax(gold))]], [ids[int(np.argmin(gold))]]]
        for sim in pool:
            shown = list(rng.permutation(2))
            groups = sim.judge("p", [texts[i] for i in shown], [gold[i] for i in shown], rng)
            records.append(JudgmentRecord(
                judgment_id=len(records), annotator=sim.name,
                groups=(sim.group,) if sim.group else (), task_id=t, kind="pairwise",
                ranking=[[ids[shown[i]] for i in g] for g in groups],
                shown_order=[ids[i] for i in shown],
                gold_ranking=gold_ranking if t % gold_every == 0 else None,
                lengths={ids[i]: len(texts[i]) for i in range(2)}))
    return records


def _pool() -> list[SimulatedAnnotator]:
    honest = [SimulatedAnnotator(f"honest-{i}", group="crowd", temperature=0.7)
              for i in range(4)]
    return [*honest,
            SimulatedAnnotator("tie-prone", group="crowd", temperature=0.7, tie_threshold=0.3),
            SimulatedAnnotator("random", group="spam", spam="random"),
            SimulatedAnnotator("always-left", group="spam", spam="constant"),
            SimulatedAnnotator("left-leaning", group="crowd", temperature=0.7, position_bias=3.0),
            SimulatedAnnotator("verbose", group="crowd", temperature=0.7, length_bias=3.0)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flags_on_planted_pool(seed: int) -> None:
    report = analyze(_planted_records(_pool(), 200, seed))
    flags = {name: set(q.flags) for name, q in report.annotators.items()}
    for name in ("honest-0", "honest-1", "honest-2", "honest-3", "tie-prone"):
        assert flags[name] == set(), (name, report.annotators[name])
    assert {"spam", "gold_fail"} <= flags["random"]
    assert {"spam", "position_bias"} <= flags["always-left"]
    # Strong biases may also cost gold accuracy; the bias flag itself must be the right one.
    assert "position_bias" in flags["left-leaning"] and "length_bias" not in flags["left-leaning"]
    assert "length_bias" in flags["verbose"] and "position_bias" not in flags["verbose"]
    honest = report.annotators["honest-0"]
    assert 0.65 < honest.agreement < 0.9 and 0.7 < honest.reliability < 0.9
    assert report.annotators["random"].reliability < 0.62
    assert report.annotators["always-left"].bias.position_rate == 1.0
    assert 0.0 < report.krippendorff_alpha < 0.6


def test_honest_annotator_with_few_judgments_is_not_flagged() -> None:
    report = analyze(_planted_records(_pool(), 12, 3))
    assert all(not q.flags for n, q in report.annotators.items() if n.startswith("honest"))
    # 12 judgments are too few to flag a random clicker's agreement either.
    assert "spam" not in report.annotators["random"].flags


def _flagged(records: list[JudgmentRecord], th: Thresholds) -> dict[str, set[str]]:
    return {n: set(q.flags) for n, q in analyze(records, th).annotators.items() if q.flags}


def test_thresholds_change_flags() -> None:
    # The same judgments under different thresholds: the defaults flag the planted spammers and
    # biased annotators; raising one threshold removes exactly the flag it governs.
    records = _planted_records(_pool(), 60, 0)
    default = _flagged(records, Thresholds())
    assert default == {"always-left": {"spam", "position_bias"}, "random": {"gold_fail"},
                       "left-leaning": {"position_bias"}, "verbose": {"length_bias"}}
    assert _flagged(records, Thresholds(gold_min=1000)) == {
        n: f - {"gold_fail"} for n, f in default.items() if f - {"gold_fail"}}
    assert _flagged(records, Thresholds(position_gap=0.6)) == {
        "always-left": {"spam"}, "random": {"gold_fail"}, "verbose": {"length_bias"}}
    assert _flagged(records, Thresholds(min_judgments=1000)) == {"random": {"gold_fail"}}
    assert _flagged(records, Thresholds(min_judgments=1000, min_compared=1000,
                                        gold_min=1000)) == {}


def test_group_view_finds_disagreeing_groups() -> None:
    pool = [SimulatedAnnotator(f"a{i}", group="fans", temperature=0.3) for i in range(3)]
    pool += [SimulatedAnnotator(f"b{i}", group="critics", temperature=0.3, weights={"score": -1})
             for i in range(3)]
    pool += [SimulatedAnnotator(f"c{i}", group="agreeers", temperature=0.3) for i in range(3)]
    report = analyze(_planted_records(pool, 40, 0, gold_every=1000))
    pairs = report.groups["pairs"]
    assert pairs["agreeers vs fans"]["agreement"] > 0.8
    assert pairs["critics vs fans"]["agreement"] < 0.2
    assert pairs["critics vs fans"]["mean_abs_win_rate_diff"] > 0.6
    assert len(pairs["critics vs fans"]["top_disagreements"]) == 5
    assert report.groups["members"]["fans"] == {"annotators": ["a0", "a1", "a2"],
                                                "judgments": 40 * 3}


def test_json_shape() -> None:
    doc = analyze(_planted_records(_pool()[:3], 10, 0)).to_json()
    assert set(doc) == {"krippendorff_alpha", "fleiss_kappa", "judgments", "annotators", "groups",
                        "label_ceiling", "label_ceiling_upper", "label_ceiling_judgments",
                        "label_ceiling_pairs"}
    assert set(doc["annotators"]["honest-0"]) == {
        "judgments", "agreement", "peer_group", "peer_agreement", "length_peer_group",
        "reliability", "gold_accuracy", "position_bias_p", "length_bias_p", "flags"}
    assert doc["judgments"] == 30


def test_the_length_reference_leaves_out_the_annotators_own_judgments() -> None:
    """verbose picks the longer answer 30 times of 30, two others 5 of 10 each: verbose's
    reference is the others' 10 of 20, theirs include verbose's 30."""
    from rewardloop.feedback.bias import bias_stats

    def rec(name: str, k: int, longer_wins: bool) -> JudgmentRecord:
        ranking = [[2], [1]] if longer_wins else [[1], [2]]
        return JudgmentRecord(judgment_id=k, annotator=name, groups=(), task_id=k,
                              kind="pairwise", ranking=ranking, lengths={1: 10, 2: 50})

    by_name = {"verbose": [rec("verbose", k, True) for k in range(30)],
               "x": [rec("x", 100 + k, k < 5) for k in range(10)],
               "y": [rec("y", 200 + k, k < 5) for k in range(10)]}
    stats = bias_stats(by_name, min_reference=5)
    assert stats["verbose"].length_rate == 1.0
    assert stats["verbose"].length_reference == pytest.approx(10 / 20)
    assert stats["x"].length_reference == pytest.approx(35 / 40)


# -- the tables off a terminal (a pipe, a file, CI) ---------------------------------------------


def test_quality_table_prints_every_figure_in_full_when_piped(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 's.db'}"
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": [
        f"a q={i % 3}", f"b q={i * 7 % 5}", "c q=1.5"]}) + "\n" for i in range(8)))
    pool = tmp_path / "pool.yaml"
    pool.write_text("annotators:\n  - name: annotator-with-a-long-name-{i}\n    count: 3\n"
                    "    group: crowd-of-simulated-people\n")
    runner = CliRunner()
    for args in (["tasks", "create", str(cands), "--overlap", "3"],
                 ["simulate", "--pool", str(pool), "--gold", "_gold:quality_gold"]):
        assert runner.invoke(app, [*args, "--db", db]).exit_code == 0
    figures = json.loads(runner.invoke(app, ["quality", "--db", db, "--json"]).output)
    res = runner.invoke(app, ["quality", "--db", db])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    assert "first wins (p)" in res.output and "longer wins (p)" in res.output
    for name, q in figures["annotators"].items():
        (line,) = [ln for ln in res.output.splitlines() if name in ln]
        assert "crowd-of-simulated-people" in line
        assert f"{q['agreement']:.3f}" in line and f"{q['reliability']:.3f}" in line


def test_loop_status_table_prints_every_figure_in_full_when_piped(tmp_path: Path) -> None:
    from rewardloop.loop_config import MARKER

    figures = {"generate": {"rows": 320}, "tasks": {"tasks": 320},
               "feedback": {"judgments": 960}, "rm": {"eval_accuracy": 0.8125},
               "policy": {"reward_last": -0.125}, "eval": {"gold_win_rate": 0.625}}
    for stage, figure in figures.items():
        (tmp_path / "round-1" / stage).mkdir(parents=True)
        (tmp_path / "round-1" / stage / MARKER).write_text(json.dumps({"figures": figure}))
    res = CliRunner().invoke(app, ["loop", "status", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output
    for cell in ("done rows=320", "done tasks=320", "done judgments=960",
                 "done eval_accuracy=0.812", "done reward_last=-0.125",
                 "done gold_win_rate=0.625"):
        assert cell in res.output
