"""An offline HTML report of one or more run directories, figures embedded as PNG data URIs.

Reads what every run writes (DESIGN.md): ``summary.json`` and ``metrics.jsonl``; and, where
present, ``eval.json`` (win rates from ``rewardloop eval``), ``quality.json`` (annotator
agreement from ``rewardloop quality --json``), ``samples.jsonl`` (sample replies) and a
summary's ``calibration_bins`` (reward-model reliability diagram). Each figure is drawn only
when its data exists, so the same builder serves an SFT run, a PPO run or a whole demo.
All text from runs (model answers included) is escaped: it is untrusted.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rewardloop.errors import UserError
from rewardloop.util.files import atomic_write_text

log = logging.getLogger(__name__)

CURVE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Reward", ("reward",)),
    ("KL to the reference", ("kl",)),
    ("Gold vs proxy reward", ("gold", "proxy")),
    ("Loss", ("loss",)),
    ("Accuracy", ("accurac",)),
    ("Entropy and length", ("entropy", "length")),
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s", path, exc)
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend. Imported here, not at the top: it takes
    about a second, and the loop imports this module for ``read_metrics`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _numeric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: set[str] = set()
    for row in rows:
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                if math.isfinite(v):
                    keys.add(k)
    return sorted(keys)


def curve_figures(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, png data URI) for each metric group that has data."""
    plt = _pyplot()
    keys = _numeric_keys(rows)
    figures = []
    for title, needles in CURVE_GROUPS:
        chosen = [k for k in keys if any(n in k.lower() for n in needles)]
        if not chosen:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key in chosen[:8]:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, linewidth=1.4)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        figures.append((title, _figure_png(fig)))
    return figures


def calibration_figure(bins: Sequence[dict[str, float]]) -> str:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-")
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed accuracy")
    ax.set_title("Reward-model calibration")
    return _figure_png(fig)


def bar_figure(title: str, labels: Sequence[str], values: Sequence[float],
               lows: Sequence[float] | None = None, highs: Sequence[float] | None = None,
               ref: float | None = None) -> str:
    """A horizontal bar chart with optional confidence intervals and a reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(labels)))
    err = None
    if lows is not None and highs is not None:
        err = [[v - lo for v, lo in zip(values, lows, strict=True)],
               [hi - v for v, hi in zip(values, highs, strict=True)]]
    ax.barh(list(labels), list(values), xerr=err, color="#4c72b0", capsize=3)
    if ref is not None:
        ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title)
    return _figure_png(fig)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(title: str, uri: str) -> str:
    return f'<figure><img alt="{html.escape(title)}" src="{uri}"></figure>'


def _win_rate_section(ev: dict[str, Any]) -> str:
    comps = ev.get("comparisons") or [ev]
    rows = [c for c in comps if "win_rate" in c]
    if not rows:
        return ""
    labels = [str(c.get("name", c.get("judge", "win rate"))) for c in rows]
    vals = [float(c["win_rate"]) for c in rows]
    ci = [c.get("win_rate_ci") or [v, v] for c, v in zip(rows, vals, strict=True)]
    fig = bar_figure("Win rate vs baseline (95% CI)", labels, vals,
                     [c[0] for c in ci], [c[1] for c in ci], ref=0.5)
    table = _table([(lbl, v, f"[{c[0]:.3f}, {c[1]:.3f}]", r.get("n", ""))
                    for lbl, v, c, r in zip(labels, vals, ci, rows, strict=True)],
                   ["judge", "win rate", "95% CI", "n"])
    return "<h3>Win rates</h3>" + _img("win rates", fig) + table


def _quality_section(q: dict[str, Any]) -> str:
    anns = q.get("annotators") or {}
    if not anns:
        return ""
    names = sorted(anns)
    agree = [float(anns[n].get("agreement") or 0.0) for n in names]
    fig = bar_figure("Annotator agreement with the leave-one-out majority", names, agree)
    rows = [(n, anns[n].get("judgments"), anns[n].get("agreement"), anns[n].get("reliability"),
             ", ".join(anns[n].get("flags") or [])) for n in names]
    alpha = q.get("krippendorff_alpha")
    head = f"<p>Krippendorff's alpha: {alpha:.3f}</p>" if isinstance(alpha, float) else ""
    return ("<h3>Annotators</h3>" + head + _img("agreement", fig)
            + _table(rows, ["annotator", "judgments", "agreement", "reliability", "flags"]))


def _samples_section(path: Path, limit: int = 8) -> str:
    rows = []
    for line in path.read_text().splitlines()[:limit]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        return ""
    header = list(dict.fromkeys(k for r in rows for k in r))
    return "<h3>Sample answers</h3>" + _table([[r.get(k, "") for k in header] for r in rows],
                                               header)


def run_section(run: Path) -> str:
    """The HTML of one run directory."""
    parts = [f"<h2>{html.escape(str(run))}</h2>"]
    summary = _read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    if isinstance(summary, dict):
        flat = [(k, v) for k, v in summary.items() if not isinstance(v, dict | list)]
        parts.append("<h3>Summary</h3>" + _table(flat, ["figure", "value"]))
        if summary.get("calibration_bins"):
            parts.append(_img("calibration", calibration_figure(summary["calibration_bins"])))
    for title, uri in curve_figures(read_metrics(run / "metrics.jsonl")):
        parts.append(_img(title, uri))
    for name, section in (("eval.json", _win_rate_section), ("quality.json", _quality_section)):
        data = _read_json(run / name) if (run / name).is_file() else None
        if isinstance(data, dict):
            parts.append(section(data))
    if (run / "samples.jsonl").is_file():
        parts.append(_samples_section(run / "samples.jsonl"))
    alarms = summary.get("alarms") if isinstance(summary, dict) else None
    if alarms:
        items = "".join(f"<li>{html.escape(str(a))}</li>" for a in alarms)
        parts.append(f'<div class="alarm"><h3>Over-optimisation alarms</h3><ul>{items}</ul></div>')
    return "<section>" + "\n".join(parts) + "</section>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;max-width:420px}
figure{margin:.5em 0} img{max-width:100%} section{border-top:2px solid #ddd;margin-top:2em}
.alarm{background:#fff3f3;border:1px solid #e99;padding:.5em 1em}
"""


def build_report(runs: Sequence[Path], out: Path, title: str = "rewardloop report") -> Path:
    """Write ``out`` (HTML, self-contained) for the given run directories; returns ``out``."""
    missing = [str(r) for r in runs if not Path(r).is_dir()]
    if missing:
        raise UserError(f"not a run directory: {', '.join(missing)}")
    body = "\n".join(run_section(Path(r)) for r in runs)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'>"
           f"<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
           f"img-src data:; style-src 'unsafe-inline'\">"
           f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
           f"<body><h1>{html.escape(title)}</h1>{body}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, doc)
    return out
