"""Aiming new comparisons at the annotator groups that fall behind (``generate --for-groups``).

A reward model learns a group's taste from that group's judgments: where a group has few of them,
or noisy ones, the model serves it worst, and pooled collection makes it worse, since a small
group gives a small share of every new batch. The remedy is to ask that group: a task with an
``audience`` is handed only to its annotators (``feedback.queue``).

Each group's *level* is what the store holds for it, counted in one of two ways:

- ``fewest``: its judgments (an annotator in two groups counts for both) plus the labels still
  open on tasks already aimed at it, so two ``generate`` runs in a row do not both fill the same
  gap;
- ``uncertain``: the same count times ``2a - 1``, where ``a`` is the group's agreement with itself
  (the diagonal of ``feedback.groups.agreement_matrix``: two members' verdicts on the same pair).
  If each member reports the group's verdict flipped with probability e, two members agree with
  a = (1 - e)^2 + e^2, so 2a - 1 = (1 - 2e)^2: the factor by which a flipped label's Fisher
  information about the verdict shrinks (its Bradley-Terry gradient shrinks by 1 - 2e). The
  level is thus the number of noise-free judgments the group's are worth. A group whose members
  never judged the same pair has no agreement of its own; that of all annotators pooled stands
  in for it (and the summary says so).

The plan's selected tasks (one label each; overlap and gold tasks stay for everyone: they measure
agreement between groups and check everyone) go, in plan order, to the group with the lowest
level, which rises by the task's labels times the group's weight, while that level is below the
highest group's; the rest go to everyone. Only groups with an active annotator take part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from rewardloop.data.schema import Annotator, ComparisonTask, Judgment
from rewardloop.errors import UserError
from rewardloop.feedback.groups import agreement_matrix, group_counts
from rewardloop.feedback.records import JudgmentRecord, load_records
from rewardloop.feedback.select import Plan
from rewardloop.metrics import UNGROUPED

AIMS = ("fewest", "uncertain")
_POOLED = "(all)"  # every judgment as one group, for the pooled agreement


@dataclass(frozen=True)
class GroupNeed:
    """What the store holds for one annotator group, and how far it falls behind."""

    group: str
    members: int
    """Active annotators of the group (who can judge its aimed tasks)."""
    judgments: int
    """Judgments by its annotators, all batches."""
    open_labels: int = 0
    """Labels still wanted by open tasks already aimed at the group."""
    agreement: float | None = None
    """Within-group agreement (``uncertain``); None: every label counts 1 (``fewest``)."""
    pooled: bool = False
    """``agreement`` is that of all annotators pooled (the group has no pair of its own)."""

    @property
    def weight(self) -> float:
        """What one label of the group is worth: 1, or 2a - 1 (never below 0)."""
        return 1.0 if self.agreement is None else max(0.0, 2.0 * self.agreement - 1.0)

    @property
    def level(self) -> float:
        return (self.judgments + self.open_labels) * self.weight


def group_needs(members: Mapping[str, Sequence[str]], active: set[str],
                judged_by: Sequence[str | None], open_labels: Mapping[str, int],
                agreement: Mapping[str, float] | None = None,
                pooled: float | None = None) -> list[GroupNeed]:
    """Per group with an active annotator (``members``: annotator -> groups; ``active``: names),
    its judgments (``judged_by``: one annotator per judgment), the open labels aimed at it, and
    with ``agreement`` (``uncertain``) its own, else ``pooled``."""
    counts = group_counts(members, judged_by)
    live = {g for name, groups in members.items() if name in active for g in groups}
    out = []
    for g in sorted(live - {UNGROUPED}):
        own = agreement.get(g) if agreement is not None else None
        a = own if own is not None or agreement is None else pooled
        out.append(GroupNeed(
            g, sum(name in active and g in gs for name, gs in members.items()),
            counts[g]["judgments"], open_labels.get(g, 0), a,
            agreement is not None and own is None))
    return out


def within_agreement(records: Sequence[JudgmentRecord]) -> tuple[dict[str, float], float | None]:
    """(each group's agreement with itself, the agreement of all annotators pooled): the share
    of agreeing verdicts of two different annotators on the same pair (``agreement_matrix``);
    a group (or the pool) without such a pair is left out (None)."""
    matrix = agreement_matrix(records, n_boot=1)  # the point estimates only: no interval
    own = {g: float(row[g]["agreement"]) for g, row in matrix.items() if g in row}
    pool = agreement_matrix([dataclasses.replace(r, groups=(_POOLED,)) for r in records],
                            n_boot=1)
    cell = pool.get(_POOLED, {}).get(_POOLED)
    return own, float(cell["agreement"]) if cell is not None else None


def check_audience(session: Session, group: str, overlap: int) -> None:
    """Refuse (one line) tasks for ``group`` that could never be completed: fewer active
    annotators in it than the ``overlap`` each task wants."""
    members = sum(group in (a.groups or ()) for a in session.scalars(
        select(Annotator).where(Annotator.active == true())))
    if members < overlap:
        raise UserError(f"--audience {group}: the store has {members} active annotator(s) in "
                        f"that group, fewer than the {overlap} each task wants (--overlap), so "
                        f"its tasks could never be completed")


def open_aimed_labels(session: Session) -> dict[str, int]:
    """Per group: the labels still wanted by open tasks aimed at it (work waiting for it)."""
    return {str(g): int(n) for g, n in session.execute(
        select(ComparisonTask.audience,
               func.sum(ComparisonTask.overlap - ComparisonTask.n_judgments))
        .where(ComparisonTask.done.is_(False), ComparisonTask.audience.is_not(None))
        .group_by(ComparisonTask.audience))}


def needs_from_store(session: Session, aim: str) -> list[GroupNeed]:
    """``group_needs`` of the store's annotators, judgments and open aimed tasks; refused (one
    line) when fewer than two groups have an active annotator, or when ``uncertain`` finds no
    pair judged by two annotators."""
    if aim not in AIMS:
        raise UserError(f"--for-groups must be one of {list(AIMS)}, got {aim!r}")
    members = {a.name: [str(g) for g in a.groups]
               for a in session.scalars(select(Annotator)) if a.groups}
    active = set(session.scalars(select(Annotator.name).where(Annotator.active == true())))
    judged_by = list(session.scalars(
        select(Annotator.name).join(Judgment, Judgment.annotator_id == Annotator.id)))
    open_labels = open_aimed_labels(session)
    agreement, pooled = None, None
    if aim == "uncertain":
        agreement, pooled = within_agreement(load_records(session))
        if pooled is None:
            raise UserError("--for-groups uncertain needs the agreement of annotators, but no "
                            "pair in the store was judged by two of them yet: use --for-groups "
                            "fewest (with --overlap-share > 0, so agreement gets measured)")
    needs = group_needs(members, active, judged_by, open_labels, agreement, pooled)
    if len(needs) < 2:
        found = ", ".join(repr(n.group) for n in needs) or "none"
        raise UserError(f"--for-groups needs active annotators of 2 or more groups in the store "
                        f"(rewardloop users add NAME --group G, or group: in a simulated pool); "
                        f"found {found}")
    return needs


def aim(needs: Sequence[GroupNeed], plan: Plan) -> Plan:
    """``plan`` with its selected tasks aimed at the groups behind (see the module docstring):
    each, in order, to the lowest group while that is below the highest level."""
    level = {n.group: n.level for n in needs}
    weight = {n.group: n.weight for n in needs}
    target = max(level.values(), default=0.0)
    tasks = []
    for task in plan.tasks:
        lowest = min(level, key=lambda g: (level[g], g)) if level else None
        if task.role != "select" or lowest is None or level[lowest] >= target:
            tasks.append(task)
            continue
        level[lowest] += task.overlap * weight[lowest]
        tasks.append(dataclasses.replace(task, audience=lowest))
    return Plan(tasks)


def describe(needs: Sequence[GroupNeed], plan: Plan, how: str) -> str:
    """One line: how many tasks went to which group, and the levels that decided it."""
    aimed = {n.group: sum(t.audience == n.group for t in plan.tasks) for n in needs}
    shares = ", ".join(f"{g} {k}" for g, k in aimed.items() if k) or "none (no group is behind)"
    if how == "fewest":
        levels = "judgments (+ open aimed labels): " + ", ".join(
            f"{n.group} {n.judgments}" + (f" + {n.open_labels}" if n.open_labels else "")
            for n in needs)
    else:
        levels = "judgments x (2 agreement - 1): " + ", ".join(
            f"{n.group} {n.judgments + n.open_labels} x {n.weight:.2f}"
            f"{' (pooled agreement: none within the group)' if n.pooled else ''}"
            f" = {n.level:.1f}" for n in needs)
    return (f"aimed {sum(aimed.values())} of {len(plan.tasks)} tasks at groups ({how}): "
            f"{shares}; {levels}")
