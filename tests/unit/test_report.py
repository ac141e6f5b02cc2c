"""The HTML report from fixture run directories."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.eval.report import build_report, read_metrics


def _fixture_run(d: Path) -> Path:
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({
        "steps": 3, "wall_s": 1.5, "eval_accuracy": 0.7,
        "calibration_bins": [{"confidence": 0.6, "accuracy": 0.55, "count": 5,
                              "bin_low": 0.5, "bin_high": 0.6}],
        "alarms": ["proxy reward rose while gold fell at step 3"],
    }))
    rows = [{"step": i, "reward_mean": 0.1 * i, "kl": 0.01 * i, "loss": 1 - 0.1 * i}
            for i in range(1, 4)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{torn")
    (d / "eval.json").write_text(json.dumps({"win_rate": 0.6, "win_rate_ci": [0.5, 0.7],
                                             "n": 40, "judge": "gold"}))
    (d / "quality.json").write_text(json.dumps({"krippendorff_alpha": 0.41, "annotators": {
        "ann-1": {"judgments": 10, "agreement": 0.8, "reliability": 0.9, "flags": []},
        "spam": {"judgments": 10, "agreement": 0.5, "reliability": 0.5, "flags": ["spam"]}}}))
    (d / "samples.jsonl").write_text(json.dumps(
        {"prompt": "hi", "before": "<script>alert(1)</script>", "after": "Hello!"}) + "\n")
    return d


def test_report_has_figures_tables_and_escapes_text(tmp_path: Path) -> None:
    run = _fixture_run(tmp_path / "run")
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    out = build_report([run], tmp_path / "r.html")
    doc = out.read_text()
    assert doc.count("data:image/png;base64,") >= 6  # reward, kl, loss, calibration, win, agreement
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc and "<script>" not in doc
    assert "Over-optimisation alarms" in doc and "0.41" in doc and "[0.500, 0.700]" in doc


def test_report_cli(tmp_path: Path) -> None:
    run = _fixture_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.html").is_file()


def test_report_missing_dir_is_user_error(tmp_path: Path) -> None:
    run = _fixture_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["report", str(run), str(tmp_path / "nope"),
                                   "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: not a run directory: {tmp_path / 'nope'}"
    assert not (tmp_path / "x.html").exists()
