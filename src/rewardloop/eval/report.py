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
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardloop.errors import UserError
from rewardloop.eval.charts import (
    CALIBRATION_QUESTION,
    CHARTS,
    ROUNDS_QUESTION,
    Drawn,
    bar_figure,
    calibration_figure,
    chart_figure,
    finite,
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


def _cell(v: Any) -> str:
    """A table cell as a reader writes it: "–" where there is no figure (null, NaN) and
    yes/no, not Python's None, nan and True."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str], caption: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return (f"<table><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table>")


def _img(question: str, run: str, drawn: Drawn) -> str:
    """A figure whose alt text says what it asks, of which run, and what it shows (the
    numbers); ``data-points`` (what it plots) lets tests check that no figure is empty."""
    alt = html.escape(f"{question} — {run}: {drawn.summary}")
    return f'<figure data-points="{drawn.points}"><img alt="{alt}" src="{drawn.uri}"></figure>'


def _unique(labels: Sequence[str], longer: Sequence[str] | None = None) -> list[str]:
    """``labels`` made distinct, so that no two bars share a row and no two table rows read
    alike: a label that several share becomes its ``longer`` form (a judge's full spec), and
    one still shared gets " #2", " #3"."""
    if longer is not None:
        labels = [long if labels.count(lbl) > 1 else lbl
                  for lbl, long in zip(labels, longer, strict=True)]
    seen: Counter[str] = Counter()
    out = []
    for lbl in labels:
        seen[lbl] += 1
        out.append(lbl if seen[lbl] == 1 else f"{lbl} #{seen[lbl]}")
    return out


def _ci(record: dict[str, Any]) -> tuple[float, float] | None:
    ci = record.get("win_rate_ci")
    if not (isinstance(ci, list) and len(ci) == 2):
        return None
    lo, hi = finite(ci[0]), finite(ci[1])
    return (lo, hi) if lo is not None and hi is not None else None


def _ci_text(ci: tuple[float, float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "–"


def _win_rates(question: str, run: str, labels: Sequence[str],
               records: Sequence[dict[str, Any]], header: Sequence[str]) -> str:
    """Bars and table of win rates (judges or groups); a record without a finite win rate (a
    pending or battle-less comparison, null in eval.json) is left out."""
    kept = [(lbl, v, _ci(r), r.get("n")) for lbl, r in zip(labels, records, strict=True)
            if isinstance(r, dict) and (v := finite(r.get("win_rate"))) is not None]
    if not kept:
        return ""
    cis = [ci or (v, v) for _, v, ci, _ in kept]
    drawn = bar_figure(question, [k[0] for k in kept], [k[1] for k in kept],
                       [c[0] for c in cis], [c[1] for c in cis], ref=0.5)
    return _img(question, run, drawn) + _table(
        [(lbl, v, _ci_text(ci), n) for lbl, v, ci, n in kept], header, f"{question} ({run})")


def _win_rate_section(ev: dict[str, Any], name: str) -> str:
    comps = [c for c in ev.get("comparisons") or [ev] if isinstance(c, dict)]
    # Two reward-model judges runs/a/rm/model and runs/b/rm/model are both named "rm".
    labels = _unique([str(c.get("name", c.get("judge", "win rate"))) for c in comps],
                     [str(c.get("judge", c.get("name", "win rate"))) for c in comps])
    policy, baseline = ev.get("policy_name", "the policy"), ev.get("baseline_name", "the baseline")
    part = _win_rates(f"Did {policy} beat {baseline}? Win rate per judge (95% CI; 0.5 = even)",
                      name, labels, comps, ["judge", "win rate", "95% CI", "n"])
    return f"<h3>Win rates ({html.escape(name)})</h3>" + part if part else ""


def _quality_section(q: dict[str, Any], run: str) -> str:
    anns = q.get("annotators") or {}
    if not anns:
        return ""
    names = sorted(anns)
    # An annotator who shared no pair with another has no agreement (null): not 0, the worst.
    agree = [finite(anns[n].get("agreement")) for n in names]
    question = "Which annotators agree with the others? (leave-one-out majority)"
    fig = bar_figure(question, names, agree)
    rows = [(n, anns[n].get("judgments"), a, anns[n].get("reliability"),
             ", ".join(anns[n].get("flags") or [])) for n, a in zip(names, agree, strict=True)]
    alpha = q.get("krippendorff_alpha")
    head = f"<p>Krippendorff's alpha: {alpha:.3f}</p>" if isinstance(alpha, float) else ""
    return ("<h3>Annotators</h3>" + head + (_img(question, run, fig) if fig.points else "")
            + _table(rows, ["annotator", "judgments", "agreement", "reliability", "flags"],
                     f"Annotators of {run}"))


def _method(section: dict[str, Any], row: dict[str, Any]) -> str:
    """How a group's accuracy was trained and measured: its --group-balance, or under
    --group-heads whose head scored it (its own, or the heads' mean for a group without one)."""
    if section.get("group_heads"):
        return f"group heads ({row.get('scored_by') or 'own head'})"
    return str(section.get("balance", "none"))


def _group_accuracy_part(runs: Sequence[RunFiles]) -> list[str]:
    """Per-group held-out accuracy of every reward-model/DPO run that has groups, one row per
    (run, group): runs trained with different --group-balance read as before/after. A
    --group-heads run's rows give each group's own head, and beside it the accuracy of the
    model's reward (the heads' equal mix), what a policy trained on it without a mix sees."""
    rows, labels, values, lows, highs, named = [], [], [], [], [], []
    for run in runs:
        section = (run.summary or {}).get("groups")
        if not isinstance(section, dict):
            continue
        for g, r in (section.get("by_group") or {}).items():
            acc = finite(r.get("accuracy"))
            ci = r.get("accuracy_ci") or [None, None]
            lo, hi = finite(ci[0]), finite(ci[1])
            method = _method(section, r)
            reward_acc = finite(r.get("reward_accuracy")) if section.get("group_heads") else acc
            rows.append((run.name, method, g, acc,
                         _ci_text((lo, hi) if lo is not None and hi is not None else None),
                         reward_acc, r.get("weight_share"), r.get("train_comparisons")))
            if acc is not None:
                labels.append(f"{g} ({method}, {run.name})")
                values.append(acc)
                lows.append(acc if lo is None else lo)
                highs.append(acc if hi is None else hi)
                named.append(run.name)
    if not rows:
        return []
    question = "Whose judgments does the model get right? Held-out accuracy per group (95% CI)"
    parts = []
    if values:
        parts.append(_img(question, ", ".join(dict.fromkeys(named)), bar_figure(
            question, labels, values, lows, highs, ref=0.5)))
    return parts + [_table(rows, ["run", "balance", "group", "accuracy", "95% CI",
                                  "the reward's accuracy", "weight share",
                                  "training comparisons"],
                           "Held-out accuracy per group")]


def _group_agreement_part(runs: Sequence[RunFiles]) -> list[str]:
    """The agreement matrix of each run's quality.json as a heatmap."""
    parts = []
    for run in runs:
        matrix = ((run.quality or {}).get("groups") or {}).get("agreement_matrix")
        if not isinstance(matrix, dict) or not matrix:
            continue
        names = sorted(matrix)
        grid = [[finite((matrix[a].get(b) or {}).get("agreement")) for b in names] for a in names]
        question = "Do the groups agree? Verdict agreement within (diagonal) and between groups"
        drawn = heatmap_figure(f"{question} ({run.name})", names, grid)
        if drawn.points:
            parts.append(_img(question, run.name, drawn))
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
        alarms = arena.get("group_alarms") or []
        if alarms:
            items = "".join(f"<li>{html.escape(str(a))}</li>" for a in alarms)
            parts.append(f'<div class="alarm"><h3>A group the policy loses for '
                         f"({html.escape(run.name)})</h3><ul>{items}</ul></div>")
        names = sorted(by_group)
        parts.append(_win_rates(
            "Does the policy win for every group? Win rate per group (95% CI)", run.name,
            names, [by_group[g] for g in names], ["group", "win rate", "95% CI", "battles"]))
    return [p for p in parts if p]


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


def _samples_section(path: Path, run: str, limit: int = 8) -> str:
    rows = [row for _, row in json_objects(path, limit)]
    if not rows:
        return ""
    header = list(dict.fromkeys(k for r in rows for k in r))
    return "<h3>Sample answers</h3>" + _table([[r.get(k, "") for k in header] for r in rows],
                                               header, f"Sample answers of {run}")


@dataclass
class RunFiles:
    """What a run directory holds that the report reads (None where absent)."""

    path: Path
    name: str
    """How the report names the run (``run_names``)."""
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None
    quality: dict[str, Any] | None


def run_names(runs: Sequence[Path]) -> list[str]:
    """Each run's name: the last two parts of its path, more where two runs would share one
    (x/exp/rm and y/exp/rm), and " #2" for a directory given twice."""
    parts = [Path(r).resolve().parts[1:] for r in runs]
    depth = [2] * len(parts)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth, strict=True)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return _unique(names)
        for i in clash:
            depth[i] += 1


def read_run(run: Path, name: str) -> RunFiles:
    def load(file: str) -> dict[str, Any] | None:
        data = _read_json(run / file) if (run / file).is_file() else None
        return data if isinstance(data, dict) else None

    return RunFiles(run, name, load("summary.json"), read_metrics(run / "metrics.jsonl"),
                    load("eval.json"), load("quality.json"))


def _detail_charts(run: RunFiles) -> list[str]:
    return [f"<h3>{html.escape(chart.question)}</h3>" + _img(chart.question, run.name, drawn)
            for chart in CHARTS
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
            parts.append(f"<p class='ceiling'>{html.escape(f'{run.name} — {line}')}</p>")
    for run in runs:
        per_round = (run.summary or {}).get("per_round")
        if isinstance(per_round, list) and (drawn := rounds_figure(per_round)):
            parts.append(_img(ROUNDS_QUESTION, run.name, drawn))
    parts += [_win_rate_section(run.eval, run.name) for run in runs if run.eval is not None]
    for chart in (c for c in CHARTS if c.headline):
        for run in runs:
            if drawn := chart_figure(chart, run.metrics):
                parts.append(f"<h3>{html.escape(run.name)}</h3>"
                             + _img(chart.question, run.name, drawn))
    if not any(parts):
        return ""
    return '<section class="headlines"><h2>Headlines</h2>' + "\n".join(parts) + "</section>"


def run_section(run: RunFiles) -> str:
    """The details of one run directory: its summary, the other charts, annotators, samples."""
    parts = [f"<h2>{html.escape(run.name)}</h2>"]
    if run.summary is not None:
        flat = [(k, v) for k, v in run.summary.items() if not isinstance(v, dict | list)]
        parts.append("<h3>Summary</h3>" + _table(flat, ["figure", "value"],
                                                 f"Summary of {run.name}"))
        bins = run.summary.get("calibration_bins")
        if bins:
            parts.append(f"<h3>{html.escape(CALIBRATION_QUESTION)}</h3>"
                         + _img(CALIBRATION_QUESTION, run.name, calibration_figure(bins)))
    parts += _detail_charts(run)
    if run.quality is not None:
        parts.append(_quality_section(run.quality, run.name))
    if (run.path / "samples.jsonl").is_file():
        parts.append(_samples_section(run.path / "samples.jsonl", run.name))
    return "<section>" + "\n".join(parts) + "</section>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;max-width:420px}
figure{margin:.5em 0;display:inline-block;vertical-align:top} img{max-width:100%}
section{border-top:2px solid #ddd;margin-top:2em} .headlines{background:#f7f9fc;padding:0 1em}
.alarm{background:#fff3f3;border:1px solid #e99;padding:.5em 1em}
"""


HEAD = ("<!doctype html><html lang=\"en\"><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">")
"""How every report starts: an existing file that starts so is an earlier report."""

EARLIER_HEADS = (HEAD, HEAD.replace('<html lang="en">', "<html>"))
"""HEAD, and how reports started before they named their language."""


def _is_report(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            start = fh.read(max(map(len, EARLIER_HEADS)))
    except OSError:
        return False
    return any(start.startswith(head.encode()) for head in EARLIER_HEADS)


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
    files = [read_run(Path(r), name) for r, name in zip(runs, run_names(runs), strict=True)]
    body = (headline_section(files) + whose_preferences_section(files)
            + "\n".join(run_section(r) for r in files))
    doc = (f"{HEAD}<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
           f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, doc)
    return out
