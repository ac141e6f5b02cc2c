"""An offline HTML report of one or more run directories, figures embedded as PNG data URIs.

Reads what every run writes (DESIGN.md): ``summary.json`` and ``metrics.jsonl``; and, where
present, ``eval.json`` (win rates from ``rewardloop eval``), ``quality.json`` (annotator
agreement from ``rewardloop quality --json``), ``samples.jsonl`` (sample replies) and a
summary's ``calibration_bins`` (reward-model reliability diagram).

Each figure answers one question (``eval.charts.CHARTS``). The headline figures (alarms, win
rates, rounds, reward against gold, reward-model accuracy) come first, then each run's details.
A figure is drawn only when some series has at least two points, so none is empty, and the same
builder serves an SFT run, a PPO run or a whole demo. All text from runs (model answers
included) is escaped: it is untrusted.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardloop.errors import UserError
from rewardloop.eval.charts import (
    CHARTS,
    bar_figure,
    calibration_figure,
    chart_figure,
    heatmap_figure,
    rounds_figure,
)
from rewardloop.util.files import atomic_write_text, check_output_file, json_objects

log = logging.getLogger(__name__)

RUN_FILES = ("summary.json", "metrics.jsonl", "eval.json", "quality.json", "samples.jsonl")
"""What the report reads from a run directory: a directory holding none of them is no run."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    return [row for _, row in json_objects(path) if "step" in row]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(title: str, uri: str, points: int) -> str:
    """A figure; ``data-points`` (what it plots) lets tests check that no figure is empty."""
    return (f'<figure data-points="{points}"><img alt="{html.escape(title)}" src="{uri}">'
            "</figure>")


def _win_rate_section(ev: dict[str, Any], name: str) -> str:
    comps = ev.get("comparisons") or [ev]
    rows = [c for c in comps if "win_rate" in c]
    if not rows:
        return ""
    labels = [str(c.get("name", c.get("judge", "win rate"))) for c in rows]
    vals = [float(c["win_rate"]) for c in rows]
    ci = [c.get("win_rate_ci") or [v, v] for c, v in zip(rows, vals, strict=True)]
    policy, baseline = ev.get("policy_name", "the policy"), ev.get("baseline_name", "the baseline")
    fig = bar_figure(f"Did {policy} beat {baseline}? Win rate per judge (95% CI; 0.5 = even)",
                     labels, vals,
                     [c[0] for c in ci], [c[1] for c in ci], ref=0.5)
    table = _table([(lbl, v, f"[{c[0]:.3f}, {c[1]:.3f}]", r.get("n", ""))
                    for lbl, v, c, r in zip(labels, vals, ci, rows, strict=True)],
                   ["judge", "win rate", "95% CI", "n"])
    return f"<h3>Win rates ({html.escape(name)})</h3>" + _img("win rates", fig, len(vals)) + table


def _quality_section(q: dict[str, Any]) -> str:
    anns = q.get("annotators") or {}
    if not anns:
        return ""
    names = sorted(anns)
    agree = [float(anns[n].get("agreement") or 0.0) for n in names]
    fig = bar_figure("Which annotators agree with the others? (leave-one-out majority)", names,
                     agree)
    rows = [(n, anns[n].get("judgments"), anns[n].get("agreement"), anns[n].get("reliability"),
             ", ".join(anns[n].get("flags") or [])) for n in names]
    alpha = q.get("krippendorff_alpha")
    head = f"<p>Krippendorff's alpha: {alpha:.3f}</p>" if isinstance(alpha, float) else ""
    return ("<h3>Annotators</h3>" + head + _img("agreement", fig, len(names))
            + _table(rows, ["annotator", "judgments", "agreement", "reliability", "flags"]))


def _group_accuracy_part(runs: Sequence[RunFiles]) -> list[str]:
    """Per-group held-out accuracy of every reward-model/DPO run that has groups, one row per
    (run, group): runs trained with different --group-balance read as before/after."""
    rows, labels, values, lows, highs = [], [], [], [], []
    for run in runs:
        section = (run.summary or {}).get("groups")
        if not isinstance(section, dict):
            continue
        for g, r in (section.get("by_group") or {}).items():
            ci = r.get("accuracy_ci") or [None, None]
            rows.append((run.name, section.get("balance", "none"), g, r.get("accuracy"),
                         f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "-",
                         r.get("weight_share"), r.get("train_comparisons")))
            if r.get("accuracy") is not None:
                labels.append(f"{g} ({section.get('balance', 'none')}, {run.name})")
                values.append(float(r["accuracy"]))
                lows.append(float(ci[0] if ci[0] is not None else r["accuracy"]))
                highs.append(float(ci[1] if ci[1] is not None else r["accuracy"]))
    if not rows:
        return []
    parts = []
    if values:
        parts.append(_img("accuracy per group", bar_figure(
            "Whose judgments does the model get right? Held-out accuracy per group (95% CI)",
            labels, values, lows, highs, ref=0.5), len(values)))
    return parts + [_table(rows, ["run", "balance", "group", "accuracy", "95% CI",
                                  "weight share", "training comparisons"])]


def _group_agreement_part(runs: Sequence[RunFiles]) -> list[str]:
    """The agreement matrix of each run's quality.json as a heatmap."""
    parts = []
    for run in runs:
        matrix = ((run.quality or {}).get("groups") or {}).get("agreement_matrix")
        if not isinstance(matrix, dict) or not matrix:
            continue
        names = sorted(matrix)
        grid = [[(matrix[a].get(b) or {}).get("agreement") for b in names] for a in names]
        parts.append(_img("group agreement", heatmap_figure(
            f"Do the groups agree? Verdict agreement within (diagonal) and between groups "
            f"({run.name})", names, grid), sum(v is not None for row in grid for v in row)))
    return parts


def _group_arena_part(runs: Sequence[RunFiles]) -> list[str]:
    """The policy's win rate per annotator group (eval.json's arena), with its alarms."""
    parts = []
    for run in runs:
        ev = run.eval or {}
        arena: dict[str, Any] = ev["arena"] if isinstance(ev.get("arena"), dict) else ev
        by_group = arena.get("by_group")
        if not isinstance(by_group, dict) or not by_group:
            continue
        names = sorted(by_group)
        vals = [float(by_group[g]["win_rate"]) for g in names]
        ci = [by_group[g].get("win_rate_ci") or [v, v] for g, v in zip(names, vals, strict=True)]
        alarms = arena.get("group_alarms") or []
        if alarms:
            items = "".join(f"<li>{html.escape(str(a))}</li>" for a in alarms)
            parts.append(f'<div class="alarm"><h3>A group the policy loses for '
                         f"({html.escape(run.name)})</h3><ul>{items}</ul></div>")
        parts.append(_img("win rate per group", bar_figure(
            f"Does the policy win for every group? Win rate per group (95% CI; {run.name})",
            names, vals, [c[0] for c in ci], [c[1] for c in ci], ref=0.5), len(vals)))
        parts.append(_table([(g, v, f"[{c[0]:.3f}, {c[1]:.3f}]", by_group[g].get("n"))
                             for g, v, c in zip(names, vals, ci, strict=True)],
                            ["group", "win rate", "95% CI", "battles"]))
    return parts


def whose_preferences_section(runs: Sequence[RunFiles]) -> str:
    """Whose preferences? Per-group reward-model accuracy (before and after balancing), the
    group agreement heatmap and the policy's win rate per group, with the group alarm; empty
    when no run has groups (docs/groups.md)."""
    parts = (_group_accuracy_part(runs) + _group_agreement_part(runs)
             + _group_arena_part(runs))
    if not parts:
        return ""
    return ('<section class="groups"><h2>Whose preferences?</h2>' + "\n".join(parts)
            + "</section>")


def _samples_section(path: Path, limit: int = 8) -> str:
    rows = [row for _, row in json_objects(path, limit)]
    if not rows:
        return ""
    header = list(dict.fromkeys(k for r in rows for k in r))
    return "<h3>Sample answers</h3>" + _table([[r.get(k, "") for k in header] for r in rows],
                                               header)


@dataclass
class RunFiles:
    """What a run directory holds that the report reads (None where absent)."""

    path: Path
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None
    quality: dict[str, Any] | None

    @property
    def name(self) -> str:
        return "/".join(self.path.resolve().parts[-2:])


def read_run(run: Path) -> RunFiles:
    def load(name: str) -> dict[str, Any] | None:
        data = _read_json(run / name) if (run / name).is_file() else None
        return data if isinstance(data, dict) else None

    return RunFiles(run, load("summary.json"), read_metrics(run / "metrics.jsonl"),
                    load("eval.json"), load("quality.json"))


def _detail_charts(run: RunFiles) -> list[str]:
    return [_img(chart.question, *drawn) for chart in CHARTS
            if not chart.headline and (drawn := chart_figure(chart, run.metrics))]


def ceiling_line(summary: dict[str, Any]) -> str | None:
    """A reward model's held-out accuracy beside its label ceiling ("0.59 of a ceiling of
    0.70"): the accuracy of model/ (its best step when it has one), so a reader can tell a weak
    model from noisy labels. None for other runs."""
    acc = summary.get("best_eval_accuracy", summary.get("eval_accuracy"))
    if "objective" not in summary or not isinstance(acc, int | float):
        return None
    text = f"Reward model: held-out accuracy {acc:.2f}"
    ceiling, upper = summary.get("label_ceiling"), summary.get("label_ceiling_upper")
    if isinstance(ceiling, int | float):
        text += f" of a ceiling of {ceiling:.2f}"
        if isinstance(upper, int | float) and upper > ceiling:
            text += f" (up to {upper:.2f})"
        text += (f", estimated from {summary.get('label_ceiling_judgments')} held-out judgments "
                 "of pairs that several annotators judged: no model can agree with people "
                 "more than they agree with each other")
    else:
        text += " (no label ceiling: no held-out pair was judged by two annotators)"
    if summary.get("best_step") is not None:
        text += (f". The saved model is step {summary['best_step']} of {summary.get('steps')}, "
                 "the one with the lowest held-out loss")
    return text + "."


def headline_section(runs: Sequence[RunFiles]) -> str:
    """The top of the report: alarms, win rates, rounds, reward and reward-model accuracy."""
    parts = []
    for run in runs:
        alarms = (run.summary or {}).get("alarms")
        if alarms:
            items = "".join(f"<li>{html.escape(str(a))}</li>" for a in alarms)
            parts.append(f'<div class="alarm"><h3>Over-optimisation alarms '
                         f"({html.escape(run.name)})</h3><ul>{items}</ul></div>")
    for run in runs:
        if line := ceiling_line(run.summary or {}):
            parts.append(f"<p class='ceiling'>{html.escape(line)}</p>")
    for run in runs:
        per_round = (run.summary or {}).get("per_round")
        if isinstance(per_round, list) and (drawn := rounds_figure(per_round)):
            parts.append(_img("rounds", *drawn))
    parts += [_win_rate_section(run.eval, run.name) for run in runs if run.eval is not None]
    for chart in (c for c in CHARTS if c.headline):
        for run in runs:
            if drawn := chart_figure(chart, run.metrics):
                parts.append(f"<h3>{html.escape(run.name)}</h3>" + _img(chart.question, *drawn))
    if not parts:
        return ""
    return '<section class="headlines"><h2>Headlines</h2>' + "\n".join(parts) + "</section>"


def run_section(run: RunFiles) -> str:
    """The details of one run directory: its summary, the other charts, annotators, samples."""
    parts = [f"<h2>{html.escape(run.name)}</h2>"]
    if run.summary is not None:
        flat = [(k, v) for k, v in run.summary.items() if not isinstance(v, dict | list)]
        parts.append("<h3>Summary</h3>" + _table(flat, ["figure", "value"]))
        bins = run.summary.get("calibration_bins")
        if bins:
            parts.append(_img("calibration", calibration_figure(bins), len(bins)))
    parts += _detail_charts(run)
    if run.quality is not None:
        parts.append(_quality_section(run.quality))
    if (run.path / "samples.jsonl").is_file():
        parts.append(_samples_section(run.path / "samples.jsonl"))
    return "<section>" + "\n".join(parts) + "</section>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;max-width:420px}
figure{margin:.5em 0;display:inline-block;vertical-align:top} img{max-width:100%}
section{border-top:2px solid #ddd;margin-top:2em} .headlines{background:#f7f9fc;padding:0 1em}
.alarm{background:#fff3f3;border:1px solid #e99;padding:.5em 1em}
"""


HEAD = ("<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">")
"""How every report starts: an existing file that starts so is an earlier report."""


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(HEAD)) == HEAD.encode()
    except OSError:
        return False


def check_report_paths(runs: Sequence[Path], out: Path, *, overwrite: bool = False) -> None:
    """UserError, before any work, unless every run is a run directory and ``out`` is a file
    that replaces nothing of the user's: a new file or an earlier report; with ``overwrite``,
    any other file outside the runs too. Inside a run, only a new .html file or an earlier
    report, whatever ``overwrite`` says."""
    missing = [str(r) for r in runs if not Path(r).is_dir()]
    if missing:
        raise UserError(f"not a run directory: {', '.join(missing)}")
    empty = [str(r) for r in runs if not any((Path(r) / f).exists() for f in RUN_FILES)]
    if empty:
        raise UserError(f"not a run directory: {', '.join(empty)} (a run directory holds "
                        f"{', '.join(RUN_FILES[:-1])} or {RUN_FILES[-1]})")
    out = check_output_file(out, flag="--out", parents=True)
    target = out.resolve()
    for run in runs:
        if not target.is_relative_to(Path(run).resolve()):
            continue
        if out.exists() and not _is_report(out):
            raise UserError(f"--out {out} is a file of run {run} and no earlier report; write "
                            "the report to a new file")
        if out.suffix.lower() not in (".html", ".htm"):
            raise UserError(f"--out {out} is inside run {run}: give it an .html name, so it "
                            "cannot take the place of a run's own file")
    if out.exists() and not overwrite and not _is_report(out):
        raise UserError(f"--out {out} exists and is not a report rewardloop wrote; pass "
                        "--overwrite to replace it or write the report to a new file")


def build_report(runs: Sequence[Path], out: Path, title: str = "rewardloop report", *,
                 overwrite: bool = False) -> Path:
    """Write ``out`` (HTML, self-contained) for the given run directories; returns ``out``.
    Refuses (``check_report_paths``) a directory that is no run, an ``out`` that would replace
    a run's own file, and one that would replace another file that is no earlier report
    (unless ``overwrite``)."""
    check_report_paths(runs, out, overwrite=overwrite)
    files = [read_run(Path(r)) for r in runs]
    body = (headline_section(files) + whose_preferences_section(files)
            + "\n".join(run_section(r) for r in files))
    doc = (f"{HEAD}<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
           f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, doc)
    return out
