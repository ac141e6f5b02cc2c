"""Evaluation statistics: win rates with bootstrap intervals, Bradley–Terry arena ratings,
calibration, and per-annotator-group figures of a trained model (accuracy with intervals,
training-weight shares). Pure numpy/scipy, no models, so every figure here is unit-tested by
hand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rewardloop.errors import UserError

ELO_SCALE = 400.0 / np.log(10.0)  # logit units -> Elo points (Chatbot Arena's convention)
ELO_BASE = 1000.0


@dataclass(frozen=True)
class WinRate:
    """How often A beats B on paired items; ties count half (Chatbot Arena's convention)."""

    rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {"win_rate": self.rate, "win_rate_ci": [self.ci_low, self.ci_high],
                "wins": self.wins, "ties": self.ties, "losses": self.losses, "n": self.n}


def bootstrap_ci(values: np.ndarray, stat: Callable[[np.ndarray], float], *, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over resampled rows of ``values``."""
    values = np.asarray(values)
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    stats = np.array([stat(values[i]) for i in idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(rate: float, n: float, *, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``rate`` over ``n`` units (ties as half a
    success). Unlike a percentile bootstrap it does not shrink to a point when every unit
    agrees: 8 wins of 8 give [0.68, 1], not [1, 1]."""
    if n <= 0:
        return 0.0, 1.0
    rate = min(max(rate, 0.0), 1.0)
    centre = rate + z * z / (2 * n)
    spread = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    return float(max(0.0, (centre - spread) / scale)), float(min(1.0, (centre + spread) / scale))


def rate_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05,
            seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-unit outcomes in [0, 1] (1 win, 0.5 tie, 0 loss): the
    percentile bootstrap over units, never narrower than Wilson's interval at as many units
    (the bootstrap alone collapses to a point when all units agree, or there is one)."""
    values = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(values, np.mean, n_boot=n_boot, alpha=alpha, seed=seed)
    w_low, w_high = wilson_interval(float(values.mean()), len(values))
    return min(low, w_low), max(high, w_high)


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float], tie_eps: float = 0.0
             ) -> np.ndarray:
    """Per-item outcome for A: 1 win, 0.5 tie (|a - b| <= tie_eps), 0 loss."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"scores differ in length: {a.shape} vs {b.shape}")
    diff = a - b
    return np.where(np.abs(diff) <= tie_eps, 0.5, (diff > 0).astype(float))


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], *, tie_eps: float = 0.0,
             n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> WinRate:
    """Win rate of A over B on paired items (same prompt), with a 95% interval over items
    (``rate_ci``: bootstrap, at least Wilson's)."""
    out = outcomes(scores_a, scores_b, tie_eps)
    if len(out) == 0:
        raise ValueError("win_rate needs at least one paired item")
    low, high = rate_ci(out, n_boot=n_boot, alpha=alpha, seed=seed)
    return WinRate(rate=float(out.mean()), ci_low=low, ci_high=high,
                   wins=int((out == 1).sum()), ties=int((out == 0.5).sum()),
                   losses=int((out == 0).sum()))


Battle = tuple[str, str, float]  # (model_a, model_b, outcome for a: 1 win, 0.5 tie, 0 loss)


def _bt_fit(a_idx: np.ndarray, b_idx: np.ndarray, y: np.ndarray, n: int, l2: float,
            weight: np.ndarray | None = None) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry strengths θ (logit units), mean-zero.

    P(a beats b) = σ(θ_a − θ_b); a tie contributes half a win each way (y = 0.5), which is the
    same as a fractional label in the logistic likelihood; ``weight`` weighs each battle (1).
    ``l2`` is a tiny ridge that fixes the scale of models no battle connects.
    """
    w = np.ones(len(y)) if weight is None else weight

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[a_idx] - theta[b_idx]
        # log σ(d) = -logaddexp(0, -d); stable for large |d|
        ll = w * (y * -np.logaddexp(0, -d) + (1 - y) * -np.logaddexp(0, d))
        p = 1.0 / (1.0 + np.exp(-d))
        g_d = -w * (y - p)
        grad = np.zeros(n)
        np.add.at(grad, a_idx, g_d)
        np.add.at(grad, b_idx, -g_d)
        return float(-ll.sum() + l2 * theta @ theta), grad + 2 * l2 * theta

    # scipy.optimize takes over a second to import; only arena ratings need it, while the
    # reward-model trainer and the loop import this module for win rates and ECE.
    from scipy.optimize import minimize

    res = minimize(nll, np.zeros(n), jac=True, method="L-BFGS-B")
    theta = res.x
    return theta - theta.mean()


PRIOR_TIES = 1.0
"""Virtual tied battles added between every two models that met (a prior that the two are
even): without it a model that won every battle has no maximum-likelihood rating, and its
rating (and interval) would be set by the ridge's size, not by the data. One tie moves a 38-2
record's gap from ln 19 to ln(38.5 / 2.5) logits; 10-0 becomes ln 21 (529 Elo) instead of
infinite."""


def bradley_terry_ratings(battles: Sequence[Battle], *, prior_ties: float = PRIOR_TIES,
                          l2: float = 1e-6) -> dict[str, float]:
    """Elo-scaled Bradley–Terry ratings (mean 1000) from pairwise battles, by maximum likelihood
    with ``prior_ties`` virtual ties between every two models that met (``PRIOR_TIES``)."""
    names = sorted({m for a, b, _ in battles for m in (a, b)})
    if len(names) < 2:
        raise ValueError("arena ratings need battles between at least two models")
    y = np.array([float(o) for _, _, o in battles])
    if not np.all(np.isin(y, (0.0, 0.5, 1.0))):
        raise ValueError("battle outcomes must be 1 (a wins), 0.5 (tie) or 0 (b wins)")
    met = sorted({tuple(sorted((a, b))) for a, b, _ in battles if a != b})
    index = {m: i for i, m in enumerate(names)}
    a_idx = np.array([index[a] for a, _, _ in battles] + [index[a] for a, _ in met])
    b_idx = np.array([index[b] for _, b, _ in battles] + [index[b] for _, b in met])
    y = np.concatenate([y, np.full(len(met), 0.5)])
    weight = np.concatenate([np.ones(len(battles)), np.full(len(met), prior_ties)])
    theta = _bt_fit(a_idx, b_idx, y, len(names), l2, weight)
    return {m: float(ELO_BASE + ELO_SCALE * theta[i]) for m, i in index.items()}


def arena_ratings(battles: Sequence[Battle], *, n_boot: int = 200, alpha: float = 0.05,
                  seed: int = 0) -> dict[str, dict[str, float]]:
    """Ratings with percentile bootstrap intervals (battles resampled with replacement).

    Only rating differences are identified, so each resample is aligned with the point
    estimate on the models it holds (the same mean over those): a resample that happens to
    miss a rarely seen model does not move every other model's rating."""
    point = bradley_terry_ratings(battles)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in point}
    for _ in range(n_boot):
        pick = rng.integers(0, len(battles), size=len(battles))
        resampled = [battles[i] for i in pick]
        if len({m for a, b, _ in resampled for m in (a, b)}) < 2:
            continue
        boot = bradley_terry_ratings(resampled)
        shift = float(np.mean([point[m] for m in boot]) - np.mean(list(boot.values())))
        for m, r in boot.items():
            samples[m].append(r + shift)
    out = {}
    for m, r in point.items():
        s = np.array(samples[m]) if samples[m] else np.array([r])
        out[m] = {"rating": r, "ci_low": float(np.quantile(s, alpha / 2)),
                  "ci_high": float(np.quantile(s, 1 - alpha / 2)), "battles": int(
                      sum(1 for a, b, _ in battles if m in (a, b)))}
    return out


def expected_calibration_error(probs: Sequence[float] | np.ndarray,
                               labels: Sequence[float] | np.ndarray, n_bins: int = 10
                               ) -> tuple[float, list[dict[str, float]]]:
    """ECE of predicted probabilities that the label is 1, with equal-width bins.

    For a reward model, ``probs`` = σ(r_chosen − r_rejected) and ``labels`` = 1 (the human
    preference). Predicting both orientations (p for the pair, 1 − p for the swapped pair with
    label 0) makes the reliability diagram symmetric; callers decide. Returns the ECE (weighted
    mean |accuracy − confidence| over bins) and per-bin rows for a reliability diagram.
    """
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=float)
    if p.shape != y.shape or p.size == 0:
        raise ValueError("probs and labels must be non-empty and of equal length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    ece, rows = 0.0, []
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        conf, acc, frac = float(p[sel].mean()), float(y[sel].mean()), float(sel.mean())
        ece += frac * abs(acc - conf)
        rows.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                     "confidence": conf, "accuracy": acc, "count": int(sel.sum())})
    return float(ece), rows


# -- annotator groups (trained models' figures per group; see feedback/groups.py) ----------------

UNGROUPED = "(none)"
"""The group of judgments whose annotator is unknown or has no group."""
GROUP_N_BOOT = 200
"""Bootstrap resamples per group interval: enough for a 95% percentile interval to +-0.01."""


def check_group_name(group: str) -> str:
    """``group`` if a reward mix (``--reward RUN@group=w,group=w``) and a metric key can name
    it, else a UserError: 1 to 120 printable characters, no outer spaces, none of ``, = @ /``."""
    if not group or group != group.strip() or not group.isprintable() or len(group) > 120 \
            or any(c in group for c in ",=@/"):
        raise UserError(f"group {group!r}: a group name needs 1 to 120 printable characters, "
                        "no outer spaces and none of , = @ / (reward mixes name groups as "
                        "RUN@group=w,group=w)")
    return group


def primary_group(annotator: str | None, groups: Mapping[str, Sequence[str]]) -> str:
    """The one group a judgment counts for when groups are balanced: its annotator's first
    group, else ``UNGROUPED``."""
    if annotator is None:
        return UNGROUPED
    listed = groups.get(annotator) or ()
    return str(listed[0]) if listed else UNGROUPED


def annotator_groups(annotator: str | None, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Every group a judgment counts for when a model is measured per group: all of its
    annotator's groups (a judgment of someone in two groups speaks for both), else
    ``UNGROUPED``."""
    listed = (groups.get(annotator) or ()) if annotator is not None else ()
    return [str(g) for g in listed] or [UNGROUPED]


def ratio_ci(num: np.ndarray, den: np.ndarray, *, n_boot: int = GROUP_N_BOOT, seed: int = 0
             ) -> list[float]:
    """95% interval of a proportion Σ num / Σ den (num <= den), resampling units (rows; a
    unit is what was judged independently: a judgment with all its answer pairs): the
    percentile bootstrap, never narrower than Wilson's interval at as many units."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if len(num) == 0:
        raise ValueError("ratio_ci needs at least one unit")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):  # one resample at a time: memory stays O(units) on big stores
        idx = rng.integers(0, len(num), size=len(num))
        total = den[idx].sum()
        if total > 0:
            stats.append(num[idx].sum() / total)
    whole = den.sum()
    w_low, w_high = wilson_interval(float(num.sum() / whole) if whole > 0 else 0.5,
                                    int((den > 0).sum()))
    if not stats:
        return [w_low, w_high]
    return [min(float(np.quantile(stats, 0.025)), w_low),
            max(float(np.quantile(stats, 0.975)), w_high)]


def pair_credit(margins: Any) -> np.ndarray:
    """Credit for ordering each pair by its signed margin (the judged better side's score minus
    the worse side's): 1 when > 0, 0.5 when exactly 0 (no side taken: a coin flip), 0 when < 0.

    The one rule of a reward model's pairwise accuracy and of the label ceiling (whose margin is
    the other annotators' balance), so that "accuracy X of a ceiling of Y" compares like with
    like (docs/sft-rm.md).
    """
    return (np.sign(np.asarray(margins, dtype=float)) + 1.0) / 2.0


def accuracy_by_group(correct: Sequence[float], group_of_pair: Sequence[str], *,
                      judgment_of_pair: Sequence[Any] | None = None,
                      n_boot: int = GROUP_N_BOOT, seed: int = 0) -> dict[str, dict[str, Any]]:
    """A reward model's accuracy on each group's judged answer pairs, with a 95% interval
    (``correct[i]``: the credit of pair i, ``pair_credit``; True/False count 1/0). The interval
    resamples judgments (``judgment_of_pair[i]``: which judgment pair i came from; a k-way
    ranking gives k(k-1)/2 pairs that stand or fall together), or pairs when not given."""
    units = judgment_of_pair if judgment_of_pair is not None else range(len(correct))
    by: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for ok, g, unit in zip(correct, group_of_pair, units, strict=True):
        by[g][unit].append(float(ok))
    out = {}
    for g, per_unit in sorted(by.items()):
        num = np.array([sum(v) for v in per_unit.values()])
        den = np.array([len(v) for v in per_unit.values()], dtype=float)
        out[g] = {"accuracy": float(num.sum() / den.sum()),
                  "accuracy_ci": ratio_ci(num, den, n_boot=n_boot, seed=seed),
                  "pairs": int(den.sum())}
    return out


def weight_shares(group_ids: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    """Share of the summed training weight that went to each group (sums to 1)."""
    total = float(sum(weights))
    sums: dict[str, float] = defaultdict(float)
    for g, w in zip(group_ids, weights, strict=True):
        sums[g] += float(w)
    return {g: (s / total if total > 0 else 0.0) for g, s in sorted(sums.items())}


def worst_group(by_group: Mapping[str, Mapping[str, Any]], key: str = "accuracy"
                ) -> tuple[str, float] | None:
    """(group, value) with the lowest ``key`` (ties: the first name), or None when empty.
    ``UNGROUPED`` is no group of people and never the worst group."""
    scored = [(float(v[key]), g) for g, v in by_group.items()
              if v.get(key) is not None and g != UNGROUPED]
    if not scored:
        return None
    value, g = min(scored)
    return g, value


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def group_table(section: Mapping[str, Any]) -> str:
    """A training summary's ``groups`` section as a plain-text table, worst group last."""
    lines = [f"{'group':<16} {'comparisons':>11} {'annotators':>10} {'weight':>7} "
             f"{'accuracy':>8}  95% CI"]
    for g, row in section["by_group"].items():
        ci = row.get("accuracy_ci")
        lines.append(f"{g:<16} {row['train_comparisons']:>11} {row['annotators']:>10} "
                     f"{row['weight_share']:>7.3f} {_fmt(row['accuracy']):>8}  "
                     + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"))
    if section.get("worst_group") is not None:
        lines.append(f"worst group: {section['worst_group']} "
                     f"(accuracy {section['worst_group_accuracy']:.3f}; "
                     f"balance: {section['balance']})")
    return "\n".join(lines)
