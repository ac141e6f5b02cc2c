"""``rewardloop demo --fast``: the whole pipeline end to end on a tiny model (figures mean little
at this size; the full demo's are in docs/loop.md)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.eval.charts import CALIBRATION_QUESTION
from rewardloop.synthetic import gold_score


def test_fast_demo_writes_report_and_summary(tmp_path: Path) -> None:
    from rewardloop.cli import app

    workdir = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--fast", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "rewardloop serve" in result.output
    # The hint is a command that works as printed: users add needs --role, and the demo's store.
    db = f"--db sqlite:///{workdir / 'loop.db'}"
    assert f"`rewardloop users add NAME --role annotator {db}`" in result.output
    summary = json.loads((workdir / "summary.json").read_text())
    # The headline figures are the ones recomputed from the round's own artefacts: the gold
    # judge re-scores the evaluation samples (ties half), the RM's accuracy is its own k / n.
    samples = [json.loads(line) for line in
               (workdir / "round-1" / "eval" / "samples.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in samples]
    policy = gold_score(prompts, [s["policy"] for s in samples])
    baseline = gold_score(prompts, [s["baseline"] for s in samples])
    expected = sum(1.0 if p > b else 0.5 if p == b else 0.0
                   for p, b in zip(policy, baseline, strict=True)) / len(samples)
    assert summary["gold_win_rate"] == pytest.approx(expected)
    low, high = summary["gold_win_rate_ci"]
    assert low <= summary["gold_win_rate"] <= high
    rm = json.loads((workdir / "round-1" / "rm" / "summary.json").read_text())
    saved = rm.get("best_eval_accuracy", rm["eval_accuracy"])  # model/ is the best step's
    assert summary["rm_accuracy"] == saved
    correct = saved * rm["eval_comparisons"]
    assert rm["eval_comparisons"] > 0 and correct == pytest.approx(round(correct))
    assert summary["kl"] is not None and isinstance(summary["alarms"], list)
    # the reward model's accuracy is shown beside its label ceiling, in the output and report
    ceiling = rm["label_ceiling"]
    assert ceiling is not None and summary["rm_label_ceiling"] == ceiling
    assert f"rm_accuracy: {saved:.3f} of a label ceiling of {ceiling:.3f}" in result.output
    html = (workdir / "report.html").read_text()
    assert f"held-out accuracy {saved:.2f} of a ceiling of {ceiling:.2f}" in html
    for section in ("Headlines", "Win rates", "Annotators", f'alt="{escape(CALIBRATION_QUESTION)}',
                    "moved from the reference (KL)", "does the hidden gold judge agree",
                    "Sample answers"):
        assert section in html, section
    assert html.index("Win rates") < html.index("does the hidden gold judge agree") \
        < html.index("<h3>Summary</h3>")  # headline figures first, then the details
    # the spammer is flagged by the quality report and left out of reward-model training
    quality = json.loads((workdir / "round-1" / "data" / "quality.json").read_text())
    assert set(quality["annotators"]) >= {"spammer", "warm-1", "concise-1"}
    # whose preferences: the pool's two groups are measured, and the report shows them
    assert {"warm", "concise"} <= set(quality["groups"]["agreement_matrix"])
    assert {"warm", "concise"} <= set(rm["groups"]["by_group"])
    assert all(rm["groups"]["by_group"][g]["accuracy"] is not None for g in ("warm", "concise"))
    whose = html[html.index("Whose preferences?"):]
    assert "<td>warm</td>" in whose and "<td>concise</td>" in whose
    assert 'alt="Do the groups agree?' in whose
    # the stages are resumable: a second run redoes nothing and gives the same figures
    again = CliRunner().invoke(app, ["demo", "--fast", "--workdir", str(workdir)])
    assert again.exit_code == 0, again.output
    assert json.loads((workdir / "summary.json").read_text())["per_round"] == summary["per_round"]
