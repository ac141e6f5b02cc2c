"""Inter-annotator agreement statistics, pure numpy: no store, no I/O.

The unit of agreement is a *pair unit*: one unordered pair of responses inside one task. Every
judgment of the task gives each of its pair units one nominal value, encoded as

- ``0`` (:data:`LO`): the response with the smaller id won,
- ``1`` (:data:`HI`): the response with the larger id won,
- ``2`` (:data:`TIE`): the two tie.

The orientation (smaller id first) is arbitrary but fixed, so two annotators who prefer the same
answer give the same value whatever order each of them was shown.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LO, HI, TIE = 0, 1, 2
N_VALUES = 3
# Ordered position of each value on a "how much did the larger id win" scale, for interval alpha.
_INTERVAL_POSITION = {LO: -1.0, TIE: 0.0, HI: 1.0}


def _distance_matrix(level: str) -> np.ndarray:
    """delta(c, k) for the three pair values: nominal 0/1; interval squared difference."""
    if level == "nominal":
        return 1.0 - np.eye(N_VALUES)
    if level == "interval":
        pos = np.array([_INTERVAL_POSITION[v] for v in range(N_VALUES)])
        return (pos[:, None] - pos[None, :]) ** 2
    raise ValueError(f"level must be 'nominal' or 'interval', got {level!r}")


def value_counts(units: Mapping[object, Sequence[int]]) -> np.ndarray:
    """(n_units, 3) matrix: how many raters gave each value to each unit."""
    counts = np.zeros((len(units), N_VALUES))
    for row, values in enumerate(units.values()):
        for v in values:
            counts[row, v] += 1
    return counts


def krippendorff_alpha(
    units: Mapping[object, Sequence[int]], level: str = "nominal"
) -> float | None:
    """Krippendorff's alpha over pair units (values 0/1/2), from the coincidence matrix.

    ``alpha = 1 - D_o / D_e`` with ``D_o = sum_ck o_ck delta_ck / n`` and
    ``D_e = sum_ck n_c n_k delta_ck / (n (n - 1))`` (Krippendorff 2011, "Computing Krippendorff's
    alpha-reliability"). Units with fewer than two values are not pairable and are left out.
    Returns None when alpha is undefined (fewer than two pairable values, or one value only).
    """
    return krippendorff_alpha_counts(value_counts(units), level)


def krippendorff_alpha_counts(counts: np.ndarray, level: str = "nominal") -> float | None:
    """``krippendorff_alpha`` of a (n_units, 3) value-count matrix (``value_counts``), so a
    bootstrap can resample its rows without rebuilding the units."""
    m = counts.sum(axis=1)
    counts = counts[m >= 2]
    m = m[m >= 2]
    if counts.size == 0:
        return None
    # o_ck = sum_u n_uc (n_uk - [c == k]) / (m_u - 1)
    coincidence = np.einsum("uc,uk->ck", counts / (m - 1)[:, None], counts)
    coincidence -= np.diag((counts / (m - 1)[:, None]).sum(axis=0))
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    delta = _distance_matrix(level)
    expected = float(n_c @ delta @ n_c)
    if expected == 0.0:
        return None
    observed = float((coincidence * delta).sum())
    return 1.0 - (n - 1.0) * observed / expected


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa from a (n_units, n_categories) count matrix.

    With the same number of raters ``n`` on every unit this is exactly Fleiss (1971):
    ``P_i = (sum_j n_ij^2 - n) / (n (n - 1))``, ``P_e = sum_j p_j^2``,
    ``kappa = (mean P_i - P_e) / (1 - P_e)``. Units with unequal counts are handled by the usual
    generalisation: each unit's ``P_i`` uses its own ``n_i`` and the category shares ``p_j`` pool
    all ratings. Units with fewer than two raters carry no agreement and are dropped.
    Returns None when kappa is undefined (no unit with two raters, or ``P_e == 1``).
    """
    counts = np.asarray(counts, dtype=float)
    n_i = counts.sum(axis=1)
    counts, n_i = counts[n_i >= 2], n_i[n_i >= 2]
    if counts.size == 0:
        return None
    p_i = ((counts**2).sum(axis=1) - n_i) / (n_i * (n_i - 1))
    p_j = counts.sum(axis=0) / n_i.sum()
    p_e = float((p_j**2).sum())
    if p_e >= 1.0:
        return None
    return (float(p_i.mean()) - p_e) / (1.0 - p_e)


def binom_test(k: int, n: int, p: float = 0.5, alternative: str = "two-sided") -> float:
    """Exact binomial test p-value, as ``scipy.stats.binomtest(k, n, p).pvalue``.

    Two-sided sums the probabilities of all outcomes no more likely than ``k`` (scipy's
    "minlike" rule, same 1e-7 relative tolerance); ``less``/``greater`` are the tails.
    Written out because importing ``scipy.stats`` costs seconds on every ``quality`` run.
    """
    if not 0 <= k <= n or not 0.0 < p < 1.0:
        raise ValueError(f"need 0 <= k <= n and 0 < p < 1, got k={k}, n={n}, p={p}")
    x = np.arange(n + 1)
    log_fact = np.cumsum(np.log(np.maximum(x, 1)))
    log_pmf = (log_fact[n] - log_fact - log_fact[::-1]
               + x * math.log(p) + (n - x) * math.log1p(-p))
    pmf = np.exp(log_pmf)
    if alternative == "less":
        return float(min(1.0, pmf[: k + 1].sum()))
    if alternative == "greater":
        return float(min(1.0, pmf[k:].sum()))
    if alternative != "two-sided":
        raise ValueError(f"alternative must be two-sided, less or greater, got {alternative!r}")
    if k == p * n:
        return 1.0
    return float(min(1.0, pmf[pmf <= pmf[k] * (1 + 1e-7)].sum()))


def majority_credit(value: int, others: Sequence[int]) -> float | None:
    """Agreement credit of ``value`` with the majority of ``others`` (None when no others).

    A clear majority gives 1 or 0. When several values tie for the majority, the credit is
    ``1/m`` if ``value`` is one of the ``m`` tied values, else 0 — the expected credit of
    breaking the tie at random, so a split panel neither rewards nor punishes anyone.
    """
    if not others:
        return None
    # Plain Python: a unit has a handful of judgments, and this runs for every annotator on
    # every unit (numpy's per-call overhead was a third of `quality` at 200k judgments).
    counts: dict[int, int] = {}
    for other in others:
        counts[other] = counts.get(other, 0) + 1
    top = max(counts.values())
    if counts.get(value, 0) != top:
        return 0.0
    return 1.0 / sum(1 for c in counts.values() if c == top)


@dataclass(frozen=True)
class DawidSkeneResult:
    """Fitted Dawid–Skene model.

    ``confusion[j, k, l]``: probability annotator j says l when the truth is k (classes are the
    values in ``classes``); ``prior[k]``: class shares; ``posterior[u, k]``: per-unit truth;
    ``accuracy[j] = sum_k prior[k] confusion[j, k, k]``; ``iterations`` used.
    """

    classes: tuple[int, ...]
    prior: np.ndarray
    confusion: np.ndarray
    posterior: np.ndarray
    accuracy: np.ndarray
    iterations: int


def _swap_permutation(classes: Sequence[int]) -> np.ndarray:
    """Index permutation that swaps LO and HI (keeps TIE): relabels a unit's orientation."""
    index = {c: i for i, c in enumerate(classes)}
    swapped = {LO: HI, HI: LO, TIE: TIE}
    return np.array([index.get(swapped[c], index[c]) for c in classes])


def dawid_skene(
    annotator: np.ndarray,
    unit: np.ndarray,
    value: np.ndarray,
    *,
    n_annotators: int,
    n_units: int,
    clamp: Mapping[int, int] | None = None,
    smoothing: float = 1.0,
    prior_accuracy: float | None = None,
    max_iter: int = 200,
    tol: float = 1e-7,
) -> DawidSkeneResult:
    """Fit Dawid & Skene (1979) by EM on observations ``(annotator[o], unit[o], value[o])``.

    Classes are the pair values that occur. Because a unit's orientation (which response is "lo")
    is arbitrary, confusion matrices are constrained to be symmetric under swapping LO and HI
    (counts are pooled with their mirror image before normalising); this halves the parameters
    and keeps annotators with few judgments stable. ``smoothing`` is a Dirichlet pseudo-count
    per confusion cell; with ``prior_accuracy`` p the same total pseudo-count per row is spread
    so that its mean accuracy is p (p on the diagonal, the rest evenly off it) instead of
    chance, so that a few units of perfect agreement raise an annotator above the prior rather
    than leave them near chance. ``clamp`` fixes the truth of some units (gold tasks: unit ->
    value).
    Initialisation is the per-unit vote share (soft majority).
    """
    classes = tuple(sorted({int(v) for v in value}))
    idx = {c: i for i, c in enumerate(classes)}
    v = np.array([idx[int(x)] for x in value], dtype=int)
    n_k = len(classes)
    swap = _swap_permutation(classes)
    pseudo = np.full((n_k, n_k), float(smoothing))
    if prior_accuracy is not None and n_k > 1:
        pseudo = np.full((n_k, n_k), smoothing * n_k * (1 - prior_accuracy) / (n_k - 1))
        np.fill_diagonal(pseudo, smoothing * n_k * prior_accuracy)
    clamp_units = np.array(list((clamp or {}).keys()), dtype=int)
    clamp_rows = np.zeros((len(clamp_units), n_k))
    for row, u in enumerate(clamp_units):
        if clamp[u] in idx:  # type: ignore[index]
            clamp_rows[row, idx[clamp[u]]] = 1.0  # type: ignore[index]
    keep = clamp_rows.sum(axis=1) > 0
    clamp_units, clamp_rows = clamp_units[keep], clamp_rows[keep]

    posterior = np.full((n_units, n_k), 1e-9)
    np.add.at(posterior, (unit, v), 1.0)
    posterior /= posterior.sum(axis=1, keepdims=True)
    posterior[clamp_units] = clamp_rows
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        prior = (posterior.sum(axis=0) + 1e-3) / (n_units + n_k * 1e-3)
        counts = np.repeat(pseudo[None], n_annotators, axis=0)
        for k in range(n_k):
            np.add.at(counts[:, k, :], (annotator, v), posterior[unit, k])
        counts = 0.5 * (counts + counts[:, swap][:, :, swap])
        confusion = counts / counts.sum(axis=2, keepdims=True)
        log_post = np.tile(np.log(prior), (n_units, 1))
        np.add.at(log_post, unit, np.log(confusion[annotator, :, v]))
        log_post -= log_post.max(axis=1, keepdims=True)
        new = np.exp(log_post)
        new /= new.sum(axis=1, keepdims=True)
        new[clamp_units] = clamp_rows
        change = float(np.abs(new - posterior).max())
        posterior = new
        if change < tol:
            break
    accuracy = np.einsum("k,jkk->j", prior, confusion)
    return DawidSkeneResult(classes, prior, confusion, posterior, accuracy, iterations)
