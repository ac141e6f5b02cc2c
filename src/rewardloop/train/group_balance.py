"""Balancing annotator groups in preference training (``--group-balance``), pure numpy.

Pooled training minimises the average loss, so the largest group's taste wins wherever groups
disagree. Two remedies, chosen by name:

- ``equal``: reweigh the comparisons once so every group carries the same total weight,
  whatever its size (within a group the relative weights, e.g. reliability, stay).
- ``minmax``: group DRO (Sagawa et al. 2020, "Distributionally Robust Neural Networks", Alg. 1;
  cf. MaxMin-RLHF, Chakraborty et al. 2024, and GRPO, Ramesh et al. 2024, for DPO). It
  minimises max_g E[loss | g] by keeping a distribution q over groups, raising the weight of a
  group whose loss is high by exponentiated gradient, q_g <- q_g exp(eta * loss_g), and
  training on Σ_g q_g loss_g. Here the update uses the group losses the step measured in its
  own forward pass and weighs the next step with them, so it costs no second forward pass.

A comparison belongs to one group (``metrics.primary_group``). ``UNGROUPED`` (annotators with
no group, or none named) is no group of people: it is neither balanced nor given a DRO weight.
Its comparisons keep the share of the weight they have in pooled training, and the groups
share the rest (equally under ``equal``, by q under ``minmax``).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rewardloop.errors import UserError
from rewardloop.metrics import UNGROUPED, accuracy_by_group, weight_shares, worst_group
from rewardloop.train.data import read_json_mapping

log = logging.getLogger(__name__)

LOSS_KEY = "group_loss_sum/"
COUNT_KEY = "group_count/"


def read_groups_file(path: Path) -> dict[str, list[str]]:
    """--annotator-groups: JSON {annotator: [group, ...]} (a single string is one group)."""
    data = read_json_mapping(path, "groups")
    return {str(name): [g] if isinstance(g, str) else [str(x) for x in g]
            for name, g in data.items()}


def balanced_group_names(group_ids: Sequence[str], balance: str, what: str, hint: str, *,
                         flag: str | None = None) -> tuple[str, ...]:
    """The sorted group names of ``group_ids``, ``UNGROUPED`` left out; balancing (``balance``
    other than none) needs two or more of them, else a UserError naming the option (``flag``,
    else ``--group-balance BALANCE``), the ``what`` (pairs, comparisons) and how to give
    groups (``hint``)."""
    names = tuple(sorted(set(group_ids) - {UNGROUPED}))
    if balance != "none" and len(names) < 2:
        without = " (annotators with no group are not one)" if UNGROUPED in group_ids else ""
        raise UserError(f"{flag or f'--group-balance {balance}'} needs {what} from 2 or more "
                        f"annotator groups{without}, got {list(names)}: {hint}")
    return names


def warn_lost_groups(before: Sequence[str], after: Sequence[str], weights: Sequence[float],
                     why: str) -> None:
    """Warn, naming them, about the groups that lost half or more of their training weight
    between ``before`` (each read comparison's group, all weighing 1) and ``after`` (the kept
    ones' groups and ``weights``): dropping flagged annotators, or weighing by reliability,
    can silence a group whose own taste looks like noise to the others."""
    read: dict[str, int] = defaultdict(int)
    for g in before:
        read[g] += 1
    kept: dict[str, float] = defaultdict(float)
    for g, w in zip(after, weights, strict=True):
        kept[g] += float(w)
    mean_kept = sum(kept.values()) / max(len(after), 1)  # weights as a share of the average
    lost = {g: 1.0 - kept.get(g, 0.0) / (n * mean_kept) if mean_kept > 0 else 1.0
            for g, n in read.items() if g != UNGROUPED}
    named = sorted(g for g, share in lost.items() if share >= 0.5)
    if named and len(read) > 1:
        log.warning("%s took half or more of the training weight of annotator group(s) %s "
                    "(%s); a group's own taste can look like noise to the others: check "
                    "`rewardloop quality` (groups.pairs, by_group) before leaving it out",
                    why, ", ".join(named),
                    ", ".join(f"{g}: {lost[g]:.0%}" for g in named))


HEAVY_FACTOR = 10.0
"""``equal`` warns when it multiplies a group's comparisons by this much or more."""


def equal_weights(group_ids: Sequence[str], weights: Sequence[float]) -> list[float]:
    """Weights rescaled so each group with weight carries T / G of the groups' total T (G: such
    groups); ``UNGROUPED`` comparisons keep theirs."""
    totals: dict[str, float] = defaultdict(float)
    for g, w in zip(group_ids, weights, strict=True):
        totals[g] += float(w)
    live = [g for g, t in totals.items() if t > 0 and g != UNGROUPED]
    if not live:
        return [float(w) for w in weights]
    total = sum(totals[g] for g in live)
    factors = {g: total / (len(live) * totals[g]) for g in live}
    heavy = sorted(g for g, f in factors.items() if f >= HEAVY_FACTOR)
    if heavy:
        log.warning("--group-balance equal weighs each comparison of %s %s times a pooled one: "
                    "a few judgments then steer the reward; collect more from the group "
                    "(generate --for-groups) or read its accuracy interval before trusting it",
                    ", ".join(heavy), "/".join(f"{factors[g]:.0f}" for g in heavy))
    return [float(w) if g == UNGROUPED else float(w) * factors.get(g, 0.0)
            for g, w in zip(group_ids, weights, strict=True)]


def group_metric_sums(sums: Mapping[str, float], counts: Mapping[str, int],
                      groups: Sequence[str]) -> dict[str, float]:
    """A micro-batch's loss sum and row count per group as metric sums, with keys for EVERY
    group in ``groups`` (zeros when absent), so all ranks sum the same keys."""
    return ({f"{LOSS_KEY}{g}": float(sums.get(g, 0.0)) for g in groups}
            | {f"{COUNT_KEY}{g}": float(counts.get(g, 0)) for g in groups})


def split_group_sums(sums: Mapping[str, float]
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """(other metric sums, mean loss per group that had rows) of a step's summed metrics."""
    rest = {k: v for k, v in sums.items() if not k.startswith((LOSS_KEY, COUNT_KEY))}
    means = {k[len(LOSS_KEY):]: v / sums[f"{COUNT_KEY}{k[len(LOSS_KEY):]}"]
             for k, v in sums.items()
             if k.startswith(LOSS_KEY) and sums.get(f"{COUNT_KEY}{k[len(LOSS_KEY):]}", 0) > 0}
    return rest, means


@dataclass
class GroupDRO:
    """Exponentiated-gradient group weights q (a distribution over ``groups``)."""

    groups: tuple[str, ...]
    step_size: float
    """eta: how fast weight moves to the groups with the higher loss."""
    q: np.ndarray = field(init=False)
    q_sum: np.ndarray = field(init=False)
    steps: int = 0

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("group DRO needs at least one group")
        if not self.step_size > 0 or math.isinf(self.step_size):
            raise ValueError(f"step_size must be a positive number, got {self.step_size}")
        self.q = np.full(len(self.groups), 1.0 / len(self.groups))
        self.q_sum = np.zeros(len(self.groups))

    def weight_of(self, group: str) -> float:
        return float(self.q[self.groups.index(group)])

    def item_weights(self, group_ids: Sequence[str], weights: Sequence[float]) -> list[float]:
        """Weights of one step's comparisons: w_i q_g / W_g, W_g the summed weight of group g
        in the step, so Σ_i w'_i loss_i = Σ_g q_g (weighted mean loss of g); the loss divides by
        Σ_i w'_i = Σ_{g in step} q_g, i.e. q renormalised over the groups the step holds.
        ``UNGROUPED`` comparisons get w_i Q / W_grouped (Q = Σ_{g in step} q_g), which keeps
        their pooled share of the step's weight."""
        totals: dict[str, float] = defaultdict(float)
        for g, w in zip(group_ids, weights, strict=True):
            totals[g] += float(w)
        grouped = sum(t for g, t in totals.items() if g != UNGROUPED)
        present = sum(self.weight_of(g) for g, t in totals.items() if g != UNGROUPED and t > 0)
        ungrouped = present / grouped if grouped > 0 else 1.0
        return [float(w) * ungrouped if g == UNGROUPED else
                float(w) * self.weight_of(g) / totals[g] if totals[g] > 0 else 0.0
                for g, w in zip(group_ids, weights, strict=True)]

    def update(self, mean_losses: Mapping[str, float]) -> None:
        """q_g <- q_g exp(eta loss_g) for the groups measured, then renormalise (in log space,
        so a long run cannot overflow)."""
        self.q_sum += self.q
        self.steps += 1
        logq = np.log(np.maximum(self.q, 1e-300))
        for g, loss in mean_losses.items():
            if g in self.groups and math.isfinite(loss):
                logq[self.groups.index(g)] += self.step_size * float(loss)
        logq -= logq.max()
        q = np.exp(logq)
        self.q = q / q.sum()

    def shares(self) -> dict[str, float]:
        """Mean q over the steps taken: the share of training weight each group received."""
        mean = self.q_sum / self.steps if self.steps else self.q
        return {g: float(v) for g, v in zip(self.groups, mean, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"groups": list(self.groups), "q": self.q.tolist(), "q_sum": self.q_sum.tolist(),
                "steps": self.steps}

    def restore(self, sampler_state: Mapping[str, Any] | None) -> None:
        """Load q from a checkpoint's sampler state (where the trainers save it)."""
        if not sampler_state or "group_dro" not in sampler_state:
            raise UserError("the checkpoint holds no group weights (it was written without "
                            "--group-balance minmax): resume with the settings it was made with")
        self.load_state_dict(sampler_state["group_dro"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["groups"]) != list(self.groups):
            raise ValueError(f"checkpoint has groups {state['groups']} but this run has "
                             f"{list(self.groups)}; resume with the same data and groups")
        self.q = np.asarray(state["q"], dtype=float)
        self.q_sum = np.asarray(state["q_sum"], dtype=float)
        self.steps = int(state["steps"])


def group_summary(balance: str, group_ids: Sequence[str], annotators: Sequence[str | None],
                  weights: Sequence[float], dro: GroupDRO | None,
                  eval_correct: Sequence[float], eval_groups: Sequence[str],
                  eval_units: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``groups`` section of a training summary: per group its training comparisons and
    annotators (by each comparison's one balancing group, ``primary_group``), the share of
    training weight it received (mean q under minmax), and the model's held-out accuracy on
    its members' judged pairs with a 95% interval over judgments; plus the worst group.
    ``eval_*``: one entry per held-out ordered answer pair and group of its annotator (a pair
    judged by someone in two groups counts for both; empty without eval data): its credit
    (``metrics.pair_credit``), that group, and the judgment it came from."""
    shares = weight_shares(group_ids, weights)
    if dro is not None:  # the groups share what UNGROUPED's pooled share leaves, by mean q
        rest = 1.0 - shares.get(UNGROUPED, 0.0)
        shares = {g: q * rest for g, q in dro.shares().items()} | (
            {UNGROUPED: shares[UNGROUPED]} if UNGROUPED in shares else {})
    members: dict[str, set[str]] = defaultdict(set)
    comparisons: dict[str, int] = defaultdict(int)
    for g, name in zip(group_ids, annotators, strict=True):
        comparisons[g] += 1
        if name is not None:
            members[g].add(name)
    accuracy = accuracy_by_group(eval_correct, eval_groups,
                                 judgment_of_pair=eval_units) if eval_correct else {}
    by_group = {}
    for g in sorted(set(group_ids) | set(accuracy)):
        held = accuracy.get(g, {})
        by_group[g] = {"train_comparisons": comparisons.get(g, 0),
                       "annotators": len(members.get(g, ())),
                       "weight_share": shares.get(g, 0.0),
                       "accuracy": held.get("accuracy"), "accuracy_ci": held.get("accuracy_ci"),
                       "eval_pairs": held.get("pairs", 0)}
    worst = worst_group(by_group)
    return {"balance": balance, "by_group": by_group,
            "worst_group": worst[0] if worst else None,
            "worst_group_accuracy": worst[1] if worst else None}
