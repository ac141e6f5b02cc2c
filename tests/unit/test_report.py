"""The HTML report from fixture run directories: one question per figure, readable scales,
headlines first, no empty figure, untrusted text escaped."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.eval import charts
from rewardloop.eval.report import HEAD, build_report, read_metrics

FIGURE = re.compile(r'<figure data-points="(\d+)"><img alt="([^"]*)" '
                    r'src="data:image/png;base64,([^"]+)">')


def figures(doc: str) -> list[tuple[int, str, bytes]]:
    return [(int(n), html.unescape(alt), base64.b64decode(data))
            for n, alt, data in FIGURE.findall(doc)]


def drawn_pixels(png: bytes) -> int:
    """Pixels in the colours matplotlib gives the first two series (blue, orange) and bars."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    colours = np.array([[0.122, 0.467, 0.706], [1.0, 0.498, 0.055], [0.298, 0.447, 0.690]])
    close = np.abs(rgb[:, :, None, :] - colours[None, None]).max(-1) < 0.08
    return int(close.any(-1).sum())


def question(alt: str) -> str:
    """The question an alt text starts with ("question — run: numbers")."""
    return alt.split(" — ")[0]


def test_report_figures_are_headlines_first_one_question_and_never_empty(
        tmp_path: Path, report_runs: list[Path]) -> None:
    doc = build_report(report_runs, tmp_path / "r.html").read_text()
    found = figures(doc)
    alts = [question(alt) for _, alt, _ in found]
    # Headlines: win rates, then reward vs gold, then reward-model accuracy; details after.
    assert alts[:3] == ["Did round-1 beat start? Win rate per judge (95% CI; 0.5 = even)",
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

    drawn = bar_figure(r"agreement of bob$\frac$", [r"bob$\frac$", "$x$"], [0.5, 0.7])
    assert drawn.uri.startswith("data:image/png;base64,")


# -- the audit's R1-R5: equal names, missing figures, attribution, accessibility ------------------


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What each bar chart drew: bar centres (y) and widths, tick labels and texts written."""
    seen: list[dict[str, Any]] = []
    render = charts._figure_png

    def spy(fig: Any) -> str:
        for ax in fig.axes:
            if ax.patches:
                seen.append({
                    "title": ax.get_title(),
                    "y": [p.get_y() + p.get_height() / 2 for p in ax.patches],
                    "widths": [round(p.get_width(), 6) for p in ax.patches],
                    "ticks": [t.get_text() for t in ax.get_yticklabels()],
                    "texts": [t.get_text().strip() for t in ax.texts]})
        return render(fig)

    monkeypatch.setattr(charts, "_figure_png", spy)
    return seen


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path.parent


def cells(doc: str) -> list[list[str]]:
    """The body rows of every table of ``doc``."""
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", doc)
            if "<td>" in row]


def test_equal_labels_are_two_bars(bars: list[dict[str, Any]]) -> None:
    """R1: matplotlib draws equal string categories at one position, one bar over the other."""
    charts.bar_figure("t", ["rm", "rm"], [0.8, 0.3])
    assert len(set(bars[0]["y"])) == 2 and bars[0]["widths"] == [0.8, 0.3]
    assert bars[0]["ticks"] == ["rm", "rm"]


def test_judges_and_runs_that_share_a_name_are_told_apart(
        tmp_path: Path, bars: list[dict[str, Any]]) -> None:
    """R1: two reward-model judges runs/a/rm/model and runs/b/rm/model are both named "rm";
    runs x/exp/rm and y/exp/rm both end in exp/rm."""
    ev = _write(tmp_path / "eval" / "eval.json", {"policy_name": "policy", "comparisons": [
        {"name": "rm", "judge": "runs/a/rm/model", "win_rate": 0.8, "win_rate_ci": [0.7, 0.9],
         "n": 100},
        {"name": "rm", "judge": "runs/b/rm/model", "win_rate": 0.3, "win_rate_ci": [0.2, 0.4],
         "n": 100},
        {"name": "gold", "judge": "pkg.gold:judge", "win_rate": 0.6, "n": 100}]})
    groups = {"balance": "none", "by_group": {"warm": {"accuracy": 0.7,
                                                       "accuracy_ci": [0.6, 0.8]}}}
    rms = [_write(tmp_path / side / "exp" / "rm" / "summary.json", {"groups": groups})
           for side in ("x", "y")]
    doc = build_report([ev, *rms], tmp_path / "r.html").read_text()
    rows = cells(doc)
    assert ["runs/a/rm/model", "0.8", "[0.700, 0.900]", "100"] in rows
    assert ["runs/b/rm/model", "0.3", "[0.200, 0.400]", "100"] in rows
    assert ["gold", "0.6", "–", "100"] in rows  # a unique name stays short
    judges = next(b for b in bars if b["title"].startswith("Did policy beat"))
    assert judges["ticks"] == ["runs/a/rm/model", "runs/b/rm/model", "gold"]
    per_group = next(b for b in bars if b["title"].startswith("Whose judgments"))
    assert per_group["ticks"] == ["warm (none, x/exp/rm)", "warm (none, y/exp/rm)"]
    assert [r[:3] for r in rows if r[2:3] == ["warm"]] == [["x/exp/rm", "none", "warm"],
                                                           ["y/exp/rm", "none", "warm"]]
    assert "<h2>x/exp/rm</h2>" in doc and "<h2>y/exp/rm</h2>" in doc


def test_an_annotator_without_agreement_is_not_drawn_as_zero(
        tmp_path: Path, bars: list[dict[str, Any]]) -> None:
    """R2: agreement null (no pair shared with another annotator) is n/a, not 0, the worst."""
    run = _write(tmp_path / "q" / "quality.json", {"annotators": {
        "alice": {"judgments": 50, "agreement": 0.9, "reliability": 0.8, "flags": []},
        "bob": {"judgments": 3, "agreement": None, "reliability": None, "flags": []},
        "carol": {"judgments": 40, "agreement": 0.0, "reliability": 0.1, "flags": ["spam"]}}})
    doc = build_report([run], tmp_path / "r.html").read_text()
    assert bars[0]["ticks"] == ["alice", "bob", "carol"]
    assert bars[0]["widths"] == [0.9, 0.0]  # alice and carol; bob has no bar
    assert bars[0]["texts"] == ["n/a"]
    assert ["bob", "3", "–", "–", ""] in cells(doc) and "None" not in doc
    (alt,) = [alt for _, alt, _ in figures(doc)]
    assert alt.endswith("2 bars from 0 (carol) to 0.9 (alice); n/a (no figure): bob")


def test_each_reward_model_ceiling_line_names_its_run(tmp_path: Path) -> None:
    """R3: two reward-model runs gave two ceiling lines with nothing to tell them apart."""
    runs = [_write(tmp_path / name / "summary.json", {"objective": "bradley-terry",
                                                       "eval_accuracy": acc})
            for name, acc in (("rm", 0.68), ("rm<b>", 0.9))]
    doc = build_report(runs, tmp_path / "r.html").read_text()
    lines = re.findall(r"<p class='ceiling'>(.*?)</p>", doc)
    assert [line.split(" — ")[0] for line in lines] == [f"{tmp_path.name}/rm",
                                                        f"{tmp_path.name}/rm&lt;b&gt;"]
    assert "held-out accuracy 0.68" in lines[0] and "held-out accuracy 0.90" in lines[1]


def test_report_is_accessible(tmp_path: Path, report_runs: list[Path]) -> None:
    """R4: a language, alt texts that name the run and carry the numbers, a heading per
    detail chart, table captions, and no Python reprs in the summary."""
    _write(report_runs[1] / "summary.json", {"steps": 6, "kl": None, "finished": True,
                                             "resumed": False, "loss_last": float("nan")})
    doc = build_report(report_runs, tmp_path / "r.html").read_text()
    assert doc.startswith('<!doctype html><html lang="en">')
    policy = f"{tmp_path.name}/policy"
    alts = [alt for _, alt, _ in figures(doc)]
    assert (f"How far has the policy moved from the reference (KL)? — {policy}: kl_seq_k1 "
            "0.3 → 1.8 over steps 1–6 (min 0.3, max 1.8)") in alts
    assert (f"Is the policy earning more reward, and does the hidden gold judge agree? — "
            f"{policy}: reward/mean 0.1 → 0.6 over steps 1–6 (min 0.1, max 0.6); gold/mean "
            "0.48 → 0.38 over steps 1–6 (min 0.38, max 0.48)") in alts
    assert (f"Are the reward model's probabilities right? (calibration) — {tmp_path.name}/rm: "
            "observed accuracy 0.55 → 0.75 over predicted P(chosen wins) 0.6–0.8 "
            "(min 0.55, max 0.75)") in alts
    assert all(" — " in alt and ": " in alt for alt in alts), alts
    assert len(set(alts)) == len(alts)  # "Are the updates stable?" twice, each of its run
    for chart in (c for c in charts.CHARTS if not c.headline):
        # each detail figure has a heading of its own, directly above it
        for at in [m.end() for m in re.finditer(re.escape(f"<h3>{chart.question}</h3>"), doc)]:
            assert doc.startswith("<figure", at), chart.question
    assert doc.count("<h3>Are the updates stable?</h3>") == 2
    assert doc.count("<table>") == doc.count("<table><caption>") >= 4
    assert f"<caption>Summary of {policy}</caption>" in doc
    summary = dict(r for r in cells(doc) if len(r) == 2)
    assert (summary["kl"], summary["finished"], summary["resumed"], summary["loss_last"]) == (
        "–", "yes", "no", "–")
    assert not re.search(r"<td>(None|True|False|nan)</td>", doc)


def test_a_report_from_before_lang_is_still_an_earlier_report(tmp_path: Path,
                                                              report_runs: list[Path]) -> None:
    """Adding lang="en" to HEAD must not make reports written before it look like user files."""
    old = tmp_path / "old.html"
    old.write_text(HEAD.replace('<html lang="en">', "<html>") + "<title>x</title>")
    build_report(report_runs[1:2], old)
    assert old.read_text().startswith(HEAD)


def test_a_null_or_non_finite_win_rate_is_left_out(tmp_path: Path,
                                                   bars: list[dict[str, Any]]) -> None:
    """R5: eval.json's win_rate null (by hand, or a comparison without battles) crashed."""
    bare = _write(tmp_path / "bare" / "eval.json", {"win_rate": None, "win_rate_ci": None,
                                                    "n": 0})
    ev = _write(tmp_path / "ev" / "eval.json", '{"comparisons": ['
                '{"name": "gold", "win_rate": null, "n": 0},'
                '{"name": "rm", "win_rate": NaN, "n": 0},'
                '{"name": "proxy", "win_rate": 0.7, "win_rate_ci": [0.6, null], "n": 9}],'
                '"arena": {"by_group": {"warm": {"win_rate": null, "n": 0},'
                '"cold": {"win_rate": Infinity, "n": 0},'
                '"concise": {"win_rate": 0.4, "win_rate_ci": [0.3, 0.5], "n": 12}}}}')
    doc = build_report([bare, ev], tmp_path / "r.html").read_text()
    assert [b["ticks"] for b in bars] == [["proxy"], ["concise"]]
    rows = cells(doc)
    assert ["proxy", "0.7", "–", "9"] in rows and ["concise", "0.4", "[0.300, 0.500]", "12"] in rows
    assert not any(r[0] in ("gold", "rm", "warm", "cold") for r in rows)
