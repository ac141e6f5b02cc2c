"""The report's figures: which question each chart answers (``CHARTS``), and matplotlib
figures rendered to PNG data URIs.

Each panel of a chart holds series of one unit, so no small quantity is flattened against a
large one on a shared axis; where several metrics estimate the same thing (the KL estimators)
one is drawn. A figure is drawn only when some series has at least two points.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Panel:
    """One axis of a chart: series that share a unit, so one scale reads them all."""

    label: str
    """The y-axis label, with the unit."""
    keys: tuple[str, ...]
    """Metric names drawn on this axis (as metrics.jsonl spells them)."""
    first_only: bool = False
    """Draw only the first key a run has: several estimates of one quantity (the KL
    estimators) would say the same thing five times."""
    limits: tuple[float, float] | None = None
    """Fixed y range, for shares and accuracies (0 to 1)."""


@dataclass(frozen=True)
class Chart:
    """A figure answering one question; each panel has its own scale."""

    question: str
    panels: tuple[Panel, ...]
    headline: bool = False
    """Shown at the top of the report, before the details of each run."""
    unless: str | None = None
    """Left out for runs that log this metric (RL runs' surrogate loss says little)."""


SHARE = (-0.03, 1.03)  # 0 to 1, with room for a line at either end


CHARTS: tuple[Chart, ...] = (
    Chart("Is the policy earning more reward, and does the hidden gold judge agree?",
          (Panel("proxy reward (mean)", ("reward/mean",)),
           Panel("gold reward (mean)", ("gold/mean",))), headline=True),
    Chart("Does the reward model rank the preferred answer first (training, held out)?",
          (Panel("accuracy", ("accuracy", "eval_accuracy"), limits=SHARE),
           Panel("reward", ("rewards/chosen", "rewards/rejected"))), headline=True),
    Chart("How far has the policy moved from the reference (KL)?",
          (Panel("KL to the reference", ("kl_seq_k1", "kl_k1", "kl"), first_only=True),)),
    Chart("Are the answers getting longer, or cut off?",
          (Panel("answer length (tokens)", ("completion_length_mean", "completion_length_max")),
           Panel("share cut at max length", ("truncated_frac",), limits=SHARE))),
    Chart("Is the policy still exploring?", (Panel("entropy (nats per token)", ("entropy",)),)),
    Chart("Is the loss going down?",
          (Panel("training loss", ("loss",)), Panel("held-out loss", ("eval_loss",))),
          unless="reward/mean"),
    Chart("Are the updates stable?",
          (Panel("gradient norm", ("grad_norm",)),
           Panel("share of clipped ratios", ("clip_frac",), limits=SHARE))),
)


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every finite number logged under ``key``."""
    return [(r["step"], float(r[key])) for r in rows
            if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])]


def _panel_series(panel: Panel, rows: Sequence[dict[str, Any]]
                  ) -> dict[str, list[tuple[float, float]]]:
    found = {k: pts for k in panel.keys if (pts := series(rows, k))}
    if panel.first_only and found:
        first = next(iter(found))
        return {first: found[first]}
    return found


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend. Imported here, not at the top: it takes
    about a second, and the loop imports this module for ``read_metrics`` alone."""
    import matplotlib

    matplotlib.use("Agg")
    # Names in figures are users' (annotators, groups, runs): "$" must be a dollar sign, not
    # the start of mathtext that fails to parse ("bob$\frac$" stopped the report).
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def chart_figure(chart: Chart, rows: Sequence[dict[str, Any]]) -> tuple[str, int] | None:
    """(png data URI, points drawn) of ``chart`` for a run's metrics; None when no series has
    two points (one point makes no curve: such figures are left out, not drawn empty)."""
    if chart.unless and series(rows, chart.unless):
        return None
    panels = [(p, s) for p in chart.panels if (s := _panel_series(p, rows))]
    if not any(len(pts) >= 2 for _, found in panels for pts in found.values()):
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 0.6, 2.9),
                             squeeze=False)
    points = 0
    for ax, (panel, found) in zip(axes[0], panels, strict=True):
        for key, pts in found.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-",
                    markersize=3, linewidth=1.4, label=key)
            points += len(pts)
        if panel.limits:
            ax.set_ylim(*panel.limits)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(panel.label)
        ax.grid(alpha=0.3)
        if len(found) > 1 or panel.first_only:
            ax.legend(fontsize=7)
    fig.suptitle(chart.question, fontsize=10)
    fig.tight_layout()
    return _figure_png(fig), points


def rounds_figure(per_round: Sequence[dict[str, Any]]) -> tuple[str, int] | None:
    """Win rate of each round's policy against the start, per judge (a loop's summary)."""
    judges = [j for j in ("gold", "proxy", "human")
              if sum(isinstance(r.get(j), int | float) for r in per_round) >= 2]
    if not judges:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 2.9))
    points = 0
    for judge in judges:
        pts = [(r["round"], r[judge]) for r in per_round if isinstance(r.get(judge), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=judge)
        points += len(pts)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(*SHARE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("win rate vs the start")
    ax.set_title("Does each round's policy beat the starting one?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _figure_png(fig), points


def calibration_figure(bins: Sequence[dict[str, float]]) -> str:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-")
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed accuracy")
    ax.set_title("Are the reward model's\nprobabilities right? (calibration)", fontsize=10)
    return _figure_png(fig)


def bar_figure(title: str, labels: Sequence[str], values: Sequence[float],
               lows: Sequence[float] | None = None, highs: Sequence[float] | None = None,
               ref: float | None = None) -> str:
    """A horizontal bar chart with optional confidence intervals and a reference line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.4 * len(labels)))
    err = None
    if lows is not None and highs is not None:
        err = [[v - lo for v, lo in zip(values, lows, strict=True)],
               [hi - v for v, hi in zip(values, highs, strict=True)]]
    ax.barh(list(labels), list(values), xerr=err, color="#4c72b0", capsize=3)
    if ref is not None:
        ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title)
    return _figure_png(fig)


def heatmap_figure(title: str, labels: Sequence[str], matrix: Sequence[Sequence[float | None]]
                   ) -> str:
    """A square heatmap with the value written in each cell (blank where None)."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * n, 1.2 + 0.8 * n))
    grid = [[math.nan if v is None else float(v) for v in row] for row in matrix]
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), list(labels), rotation=30, ha="right")
    ax.set_yticks(range(n), list(labels))
    for i in range(n):
        for j in range(n):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", color="white")
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=10)
    return _figure_png(fig)
