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
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


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

ROUNDS_QUESTION = "Does each round's policy beat the starting one?"
CALIBRATION_QUESTION = "Are the reward model's probabilities right? (calibration)"


class Drawn(NamedTuple):
    """A rendered figure."""

    uri: str
    """The PNG as a data URI."""
    points: int
    """How many values it plots (0 would be an empty figure)."""
    summary: str
    """Those values in words, for the alt text: a reader who cannot see the image gets the
    numbers (first → last, min and max) too."""


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


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number; None for null, NaN, text or a bool."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of every finite number logged under ``key``."""
    return [(r["step"], v) for r in rows if (v := finite(r.get(key))) is not None]


def describe_curve(name: str, pts: Sequence[tuple[float, float]], over: str = "steps") -> str:
    """A curve in words: "reward/mean 0.1 → 0.6 over steps 1–6 (min 0.1, max 0.6)"."""
    ys = [y for _, y in pts]
    return (f"{name} {ys[0]:.3g} → {ys[-1]:.3g} over {over} {pts[0][0]:g}–{pts[-1][0]:g} "
            f"(min {min(ys):.3g}, max {max(ys):.3g})")


def describe_bars(labels: Sequence[str], values: Sequence[float | None]) -> str:
    """Bars in words: the lowest and the highest, and which have no figure (n/a)."""
    known = sorted((v, lbl) for lbl, v in zip(labels, values, strict=True) if v is not None)
    missing = [lbl for lbl, v in zip(labels, values, strict=True) if v is None]
    parts = []
    if len(known) == 1:
        parts.append(f"{known[0][1]} {known[0][0]:.3g}")
    elif known:
        (lo, lo_name), (hi, hi_name) = known[0], known[-1]
        parts.append(f"{len(known)} bars from {lo:.3g} ({lo_name}) to {hi:.3g} ({hi_name})")
    if missing:
        parts.append("n/a (no figure): " + ", ".join(missing))
    return "; ".join(parts)


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


def chart_figure(chart: Chart, rows: Sequence[dict[str, Any]]) -> Drawn | None:
    """``chart`` drawn for a run's metrics; None when no series has two points (one point makes
    no curve: such figures are left out, not drawn empty)."""
    if chart.unless and series(rows, chart.unless):
        return None
    panels = [(p, s) for p in chart.panels if (s := _panel_series(p, rows))]
    if not any(len(pts) >= 2 for _, found in panels for pts in found.values()):
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 0.6, 2.9),
                             squeeze=False)
    points, said = 0, []
    for ax, (panel, found) in zip(axes[0], panels, strict=True):
        for key, pts in found.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) < 30 else "-",
                    markersize=3, linewidth=1.4, label=key)
            points += len(pts)
            said.append(describe_curve(key, pts))
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
    return Drawn(_figure_png(fig), points, "; ".join(said))


def rounds_figure(per_round: Sequence[dict[str, Any]]) -> Drawn | None:
    """Win rate of each round's policy against the start, per judge (a loop's summary)."""
    judges = [j for j in ("gold", "proxy", "human")
              if sum(isinstance(r.get(j), int | float) for r in per_round) >= 2]
    if not judges:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5.5, 2.9))
    points, said = 0, []
    for judge in judges:
        pts = [(r["round"], r[judge]) for r in per_round if isinstance(r.get(judge), int | float)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=judge)
        points += len(pts)
        said.append(describe_curve(judge, pts, over="rounds"))
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(*SHARE)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("win rate vs the start")
    ax.set_title(ROUNDS_QUESTION, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return Drawn(_figure_png(fig), points, "; ".join(said))


def calibration_figure(bins: Sequence[dict[str, float]]) -> Drawn:
    """Reliability diagram: accuracy against confidence per bin, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
    pts = [(b["confidence"], b["accuracy"]) for b in bins]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    ax.set_xlabel("predicted P(chosen wins)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(textwrap.fill(CALIBRATION_QUESTION, 24), fontsize=10)
    return Drawn(_figure_png(fig), len(bins),
                 describe_curve("observed accuracy", pts, over="predicted P(chosen wins)"))


def bar_figure(title: str, labels: Sequence[str], values: Sequence[float | None],
               lows: Sequence[float] | None = None, highs: Sequence[float] | None = None,
               ref: float | None = None) -> Drawn:
    """A horizontal bar chart, first label on top, with optional confidence intervals and a
    reference line; a None value (no figure) gets no bar but "n/a", so it cannot read as 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.4 * len(labels)))
    known = [(i, v) for i, v in enumerate(values) if v is not None]
    err = None
    if lows is not None and highs is not None:
        err = [[v - lows[i] for i, v in known], [highs[i] - v for i, v in known]]
    # Numeric positions with tick labels: given the labels themselves, matplotlib draws equal
    # strings at one position, and two judges both named "rm" were one bar.
    ax.barh([i for i, _ in known], [v for _, v in known], xerr=err, color="#4c72b0", capsize=3)
    for i, v in enumerate(values):
        if v is None:
            ax.text(0, i, " n/a", va="center", color="grey")
    ax.set_yticks(range(len(labels)), list(labels))
    ax.invert_yaxis()
    if ref is not None:
        ax.axvline(ref, color="grey", linestyle="--", linewidth=1)
    ax.set_title(title)
    return Drawn(_figure_png(fig), len(known), describe_bars(labels, values))


def heatmap_figure(title: str, labels: Sequence[str], matrix: Sequence[Sequence[float | None]]
                   ) -> Drawn:
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
    cells = sorted((v, f"{labels[i]} with {labels[j]}") for i, row in enumerate(grid)
                   for j, v in enumerate(row) if not math.isnan(v))
    said = (f"{len(labels)} groups, agreement from {cells[0][0]:.3g} ({cells[0][1]}) to "
            f"{cells[-1][0]:.3g} ({cells[-1][1]})" if cells else "no agreement figure")
    return Drawn(_figure_png(fig), len(cells), said)
