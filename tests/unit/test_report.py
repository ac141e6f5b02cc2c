"""The HTML report from fixture run directories: one question per figure, readable scales,
headlines first, no empty figure, untrusted text escaped."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.eval.report import build_report, read_metrics

FIGURE = re.compile(r'<figure data-points="(\d+)"><img alt="([^"]*)" '
                    r'src="data:image/png;base64,([^"]+)">')


def figures(doc: str) -> list[tuple[int, str, bytes]]:
    return [(int(n), alt, base64.b64decode(data)) for n, alt, data in FIGURE.findall(doc)]


def drawn_pixels(png: bytes) -> int:
    """Pixels in the colours matplotlib gives the first two series (blue, orange) and bars."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    colours = np.array([[0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.298, 0.447, 0.690]])
    close = np.abs(rgb[:, :, None, :] - colours[None, None]).max(-1) < 0.08
    return int(close.any(-1).sum())


def test_report_figures_are_headlines_first_one_question_and_never_empty(
        tmp_path: Path, report_runs: list[Path]) -> None:
    doc = build_report(report_runs, tmp_path / "r.html").read_text()
    found = figures(doc)
    alts = [alt for _, alt, _ in found]
    # Headlines: win rates, then reward vs gold, then reward-model accuracy; details after.
    assert alts[:3] == ["win rates",
                        "Is the policy earning more reward, and does the hidden gold judge agree?",
                        "Does the reward model rank the preferred answer first (training, "
                        "held out)?"]
    assert doc.index("Headlines") < doc.index("Over-optimisation alarms") < doc.index("Summary")
    for points, alt, png in found:
        assert points >= 1, alt
        assert drawn_pixels(png) > 30, alt  # something is drawn, not just axes
    # Three KL estimators are logged; one is drawn (six steps = six points).
    kl = [p for p, alt, _ in found if "KL" in alt]
    assert kl == [6]
    # Entropy near 0 and lengths near 40 are separate figures, not one axis.
    assert "Is the policy still exploring?" in alts
    assert "Are the answers getting longer, or cut off?" in alts
    # The RL surrogate loss (~0 by construction) is not drawn; the reward model's loss is.
    assert alts.count("Is the loss going down?") == 1
    assert {a for a in alts if alts.count(a) > 1} == {"Are the updates stable?"}  # rm and rl
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in doc and "<script>" not in doc
    assert "0.41" in doc and "[0.500, 0.700]" in doc


def test_a_run_with_single_points_only_draws_no_curve(tmp_path: Path) -> None:
    d = tmp_path / "short"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5, "entropy": 0.1,
                                                 "completion_length_mean": 12.0}) + "\n")
    doc = build_report([d], tmp_path / "r.html").read_text()
    assert figures(doc) == [] and "Headlines" not in doc


def test_read_metrics_skips_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_report_cli(tmp_path: Path, report_runs: list[Path]) -> None:
    run = report_runs[1]
    res = CliRunner().invoke(app, ["report", str(run), "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.html").is_file()


def test_report_missing_dir_is_user_error(tmp_path: Path, report_runs: list[Path]) -> None:
    run = report_runs[1]
    res = CliRunner().invoke(app, ["report", str(run), str(tmp_path / "nope"),
                                   "-o", str(tmp_path / "x.html")])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == f"error: not a run directory: {tmp_path / 'nope'}"
    assert not (tmp_path / "x.html").exists()


def test_report_puts_reward_model_accuracy_beside_its_label_ceiling(tmp_path: Path) -> None:
    from rewardloop.eval.report import ceiling_line

    summary = {"objective": "bradley-terry", "eval_accuracy": 0.55, "best_eval_accuracy": 0.591,
               "label_ceiling": 0.702, "label_ceiling_upper": 0.75,
               "label_ceiling_judgments": 120, "best_step": 40, "steps": 70}
    line = ceiling_line(summary)
    assert line is not None and line.startswith(
        "Reward model: held-out accuracy 0.59 of a ceiling of 0.70 (up to 0.75), estimated "
        "from 120 held-out judgments")
    assert "step 40 of 70" in line
    assert "no label ceiling" in (ceiling_line({"objective": "x", "eval_accuracy": 0.6}) or "")
    assert ceiling_line({"loss_name": "dpo", "eval_accuracy": 0.6}) is None
    run = tmp_path / "rm"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(summary))
    html_text = build_report([run], tmp_path / "r.html").read_text()
    assert "0.59 of a ceiling of 0.70" in html_text


def test_names_with_dollar_signs_are_drawn_as_text(tmp_path: Path) -> None:
    """Annotator names may hold "$": matplotlib must not read them as mathtext (it failed)."""
    from rewardloop.eval.charts import bar_figure

    uri = bar_figure(r"agreement of bob$\frac$", [r"bob$\frac$", "$x$"], [0.5, 0.7])
    assert uri.startswith("data:image/png;base64,")
