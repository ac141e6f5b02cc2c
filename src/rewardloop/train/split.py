"""Held-out data when no ``--eval-data`` is given: a seeded split BY PROMPT.

Every judgment of one prompt lands on the same side. Judgments of the same prompt share its
answers (and, with overlap, several annotators judge the very same pair), so a row-level split
would let the model see the held-out answers while training and flatter its held-out accuracy.

When annotator groups are known, the split is stratified: each group with judgments on at least
two prompts gets about ``fraction`` of its judgments held out (at least one prompt), so per-group
accuracy is measured for every group, not only for the largest.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from rewardloop.ceiling import text_key
from rewardloop.errors import UserError


class _Holdout:
    """The prompts held out so far, and how many rows (in all and per group) they hold."""

    def __init__(self, rows_of: Mapping[str, list[int]],
                 in_group: Mapping[str, Mapping[str, int]]) -> None:
        self.rows_of, self.in_group = rows_of, in_group
        self.keys: set[str] = set()
        self.rows = 0
        self.of_group: dict[str, int] = defaultdict(int)

    def hold(self, key: str) -> None:
        """Hold out ``key``'s rows, unless that would leave no prompt to train on."""
        if key in self.keys or len(self.keys) + 1 >= len(self.rows_of):
            return
        self.keys.add(key)
        self.rows += len(self.rows_of[key])
        for g, counts in self.in_group.items():
            self.of_group[g] += counts.get(key, 0)


def split_by_prompt(prompts: Sequence[str], annotators: Sequence[str | None],
                    groups: Mapping[str, Sequence[str]], fraction: float, seed: int
                    ) -> tuple[list[int], list[int]]:
    """(train row indices, held-out row indices) of rows with these prompt keys and annotators.

    About ``fraction`` of the rows are held out, whole prompts at a time, chosen by a seeded
    shuffle of the prompts. First every annotator group (``groups``: annotator -> its groups)
    that spans two or more prompts gets its quota, round(fraction x its rows) and at least 1,
    rarest group first; then prompts are added in shuffled order until the overall quota is met.
    At least one prompt stays on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if len(prompts) != len(annotators):
        raise ValueError("one annotator (or None) per row is needed")
    rows_of: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(prompts):
        rows_of[key].append(i)
    if len(rows_of) < 2:
        raise UserError(f"--eval-fraction needs rows of at least 2 different prompts (the split "
                        f"is by prompt); the data has {len(rows_of)}. Give --eval-data instead")
    order = sorted(rows_of)
    random.Random(seed).shuffle(order)
    in_group: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))  # g -> key -> n
    for i, name in enumerate(annotators):
        for g in groups.get(name, ()) if name is not None else ():
            in_group[g][prompts[i]] += 1
    held = _Holdout(rows_of, in_group)
    for g in sorted(in_group, key=lambda g: (sum(in_group[g].values()), g)):
        quota = max(1, round(fraction * sum(in_group[g].values())))
        mine = [k for k in order if k in in_group[g]] if len(in_group[g]) >= 2 else []
        for key in mine:
            if held.of_group[g] >= quota:
                break
            held.hold(key)
    target = max(1, round(fraction * len(prompts)))
    for key in order:
        if held.rows >= target:
            break
        held.hold(key)
    eval_rows = sorted(i for k in held.keys for i in rows_of[k])
    train_rows = sorted(i for k in order if k not in held.keys for i in rows_of[k])
    return train_rows, eval_rows


def split_records(records: Sequence[Any], groups: Mapping[str, Sequence[str]],
                  fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) records (each with ``prompt`` and ``annotator``) by ``split_by_prompt``."""
    train, held = split_by_prompt([text_key(r.prompt) for r in records],
                                  [getattr(r, "annotator", None) for r in records], groups,
                                  fraction, seed)
    return [records[i] for i in train], [records[i] for i in held]

