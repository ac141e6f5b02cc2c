"""The report's "Whose preferences?" section, fed by the real producers' output shapes:
group_summary (train rm/dpo), analyze (quality --json) and group_arena (eval's arena)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rewardloop.eval.evaluate import group_arena
from rewardloop.eval.report import build_report
from rewardloop.feedback.quality import analyze
from rewardloop.feedback.records import JudgmentRecord
from rewardloop.train.group_balance import group_summary


def _rm_run(d: Path, balance: str, minority_correct: int) -> Path:
    d.mkdir(parents=True)
    correct = [True] * 8 + [False] * 2 + [True] * minority_correct + [False] * (
        10 - minority_correct)
    groups = ["warm"] * 10 + ["concise"] * 10
    section = group_summary(balance, ["warm"] * 30 + ["concise"] * 10, [None] * 40,
                            [1.0] * 40, None, correct, groups)
    (d / "summary.json").write_text(json.dumps({"steps": 2, "groups": section}))
    return d


def _quality() -> dict:
    records = []
    for task in range(6):
        for name, group, winner in (("w1", "warm", 1), ("w2", "warm", 1), ("c1", "concise", 2)):
            a, b = 10 * task + 1, 10 * task + 2
            records.append(JudgmentRecord(
                judgment_id=len(records), annotator=name, groups=(group,), task_id=task,
                kind="pairwise", ranking=[[a], [b]] if winner == 1 else [[b], [a]]))
    return analyze(records).to_json()


def test_whose_preferences_section(tmp_path: Path) -> None:
    runs = [_rm_run(tmp_path / "rm-none", "none", 3), _rm_run(tmp_path / "rm-minmax", "minmax", 6)]
    ev = tmp_path / "eval"
    ev.mkdir()
    battles = {"warm": [("rlhf", "sft", 1.0)] * 9 + [("rlhf", "sft", 0.0)],
               "concise": [("rlhf", "sft", 0.0)] * 12 + [("rlhf", "sft", 1.0)]}
    arena = {"win_rate": 0.67, **group_arena(battles, 0.67, "rlhf", "sft")}
    (ev / "eval.json").write_text(json.dumps({"win_rate": 0.67, "win_rate_ci": [0.5, 0.8],
                                              "n": 15, "arena": arena}))
    (ev / "quality.json").write_text(json.dumps(_quality()))
    doc = build_report([*runs, ev], tmp_path / "r.html").read_text()
    section = doc[doc.index("<h2>Whose preferences?</h2>"):doc.index("</section>",
                                                                      doc.index("Whose"))]
    # accuracy per group of both runs, before (none) and after (minmax) balancing
    assert section.count("<td>concise</td>") >= 2
    assert "<td>minmax</td>" in section and "<td>0.3</td>" in section and "<td>0.6</td>" in section
    # three figures (accuracy bars, agreement heatmap, win rates per group), none empty
    points = [int(p) for p in re.findall(r'data-points="(\d+)"', section)]
    assert len(points) == 3 and all(p > 0 for p in points)
    # the alarm: the policy wins overall but loses for the concise group
    assert "A group the policy loses for" in section and "&#x27;concise&#x27;" in section
    # the section comes before the per-run details
    assert doc.index("Whose preferences?") < doc.index("<h2>", doc.index("</section>",
                                                                      doc.index("Whose")))


def test_a_group_heads_run_names_whose_head_scored_each_group(tmp_path: Path) -> None:
    """Audit s12 F4: a --group-heads run's per-group figure is its own head's; the table says
    so and gives the reward's accuracy beside it (a group without a head: the heads' mean)."""
    run = _rm_run(tmp_path / "heads", "none", 7)
    summary = json.loads((run / "summary.json").read_text())
    section = summary["groups"]
    section["group_heads"] = ["concise", "warm"]
    section["by_group"]["concise"] |= {"scored_by": "own head", "reward_accuracy": 0.45}
    section["by_group"]["warm"] |= {"scored_by": "heads' mean", "reward_accuracy": 0.8}
    (run / "summary.json").write_text(json.dumps(summary))
    doc = build_report([run], tmp_path / "r.html").read_text()
    assert "<th>the reward&#x27;s accuracy</th>" in doc
    assert "<td>group heads (own head)</td><td>concise</td><td>0.7</td>" in doc
    assert "<td>0.45</td>" in doc and "group heads (heads&#x27; mean)" in doc


def test_no_groups_no_section(tmp_path: Path, report_runs: list[Path]) -> None:
    doc = build_report(report_runs, tmp_path / "r.html").read_text()
    assert "Whose preferences?" not in doc
