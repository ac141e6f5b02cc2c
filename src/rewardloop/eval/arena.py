"""The human arena: policies' answers judged side by side by people, rated by Bradley–Terry.

``create_arena_tasks`` turns answers of several policies to the same prompts into pairwise
tasks; people judge them in the annotation server (or a simulated pool does); ``arena_battles``
reads the judgments back as battles and ``metrics.arena_ratings`` rates the policies with
bootstrap intervals, ties as half wins. Each task item records the ``model`` that wrote its
answer in this arena: a response is stored once per prompt and text and keeps the model that
wrote it first, so an answer a later round repeats must not be credited to the earlier one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from rewardloop.data.schema import Annotator, Batch, ComparisonTask, Judgment, TaskItem
from rewardloop.feedback import tasks as T
from rewardloop.metrics import UNGROUPED, Battle


@dataclass(frozen=True)
class ArenaTasks:
    tasks: int
    identical_pairs_skipped: int
    existing: int = 0
    """Battles the batch already held (the same prompt, answers and models): an arena created
    again (a resumed loop's eval stage, eval run twice) is not doubled."""


def _held_battles(session: Session, batch: Batch) -> set[tuple[int, frozenset[tuple[int, str]]]]:
    """(prompt id, {(response id, model)}) of every task ``batch`` holds."""
    return {(t.prompt_id, frozenset((r, m or "") for r, m in t.items))
            for t in T.held_tasks(session, batch)}


def create_arena_tasks(session: Session, prompts: Sequence[Any],
                       outputs: Mapping[str, Sequence[str]], *, batch_name: str,
                       overlap: int = 1, seed: int = 0) -> ArenaTasks:
    """One pairwise task per prompt and pair of policies (``outputs[name][i]`` answers
    ``prompts[i]``). Identical answers teach nothing and cannot be attributed: skipped, counted.
    The left/right order is randomised by the task service per annotator.
    """
    names = sorted(outputs)
    if len(names) < 2:
        raise ValueError("an arena needs answers from at least two policies")
    for name in names:
        if len(outputs[name]) != len(prompts):
            raise ValueError(f"policy {name!r} has {len(outputs[name])} answers for "
                             f"{len(prompts)} prompts")
    rng = random.Random(seed)
    batch = T.get_or_create_batch(session, batch_name)
    held = _held_battles(session, batch)
    made = skipped = existing = 0
    for i, prompt in enumerate(prompts):
        p = (T.get_or_create_prompt(session, messages=prompt) if isinstance(prompt, list)
             else T.get_or_create_prompt(session, text=str(prompt)))
        pairs = list(itertools.combinations(names, 2))
        rng.shuffle(pairs)
        for a, b in pairs:
            if outputs[a][i] == outputs[b][i]:
                skipped += 1
                continue
            ra = T.get_or_create_response(session, p, outputs[a][i], model=a)
            rb = T.get_or_create_response(session, p, outputs[b][i], model=b)
            if ra.id is None or rb.id is None or p.id is None:
                session.flush()
            key = (p.id, frozenset({(ra.id, a), (rb.id, b)}))
            if key in held:
                existing += 1
                continue
            held.add(key)
            T.create_task(session, p, [ra, rb], kind="pairwise", overlap=overlap, batch=batch,
                          models=[a, b])
            made += 1
    return ArenaTasks(tasks=made, identical_pairs_skipped=skipped, existing=existing)


def _outcome(ranking: list[list[int]], first: int) -> float:
    """1 if response ``first`` is ranked strictly above the other, 0.5 for a tie, else 0."""
    if len(ranking) == 1:
        return 0.5
    return 1.0 if first in ranking[0] else 0.0


def arena_battles(session: Session, batch_name: str | None = None) -> list[Battle]:
    """Battles ``(model_a, model_b, outcome)`` from judged pairwise tasks whose two responses
    come from different named models (in task order): the model a task's item names, else its
    response's."""
    return [battle for battle, _ in judged_battles(session, batch_name)]


def battles_by_group(judged: Sequence[tuple[Battle, Sequence[str]]]
                     ) -> dict[str, list[Battle]]:
    """The arena per annotator group (``judged_battles``' output): each judgment's battle under
    every group of its annotator, under ``UNGROUPED`` for an annotator of none (as training
    and ``quality`` report it); {} when nobody has a group."""
    out: dict[str, list[Battle]] = {}
    for battle, groups in judged:
        for g in groups or (UNGROUPED,):
            out.setdefault(g, []).append(battle)
    return out if set(out) - {UNGROUPED} else {}


def judged_battles(session: Session, batch_name: str | None = None
                   ) -> list[tuple[Battle, tuple[str, ...]]]:
    """(battle, its annotator's groups) of every judged arena task (see ``arena_battles``)."""
    query = (select(Judgment).join(ComparisonTask)
             .where(ComparisonTask.kind == "pairwise")
             .options(selectinload(Judgment.task).selectinload(ComparisonTask.items)
                      .selectinload(TaskItem.response)))
    if batch_name is not None:
        query = query.where(ComparisonTask.batch.has(Batch.name == batch_name))
    groups = {a.id: tuple(str(g) for g in (a.groups or []))
              for a in session.scalars(select(Annotator))}
    battles: list[tuple[Battle, tuple[str, ...]]] = []
    for judgment in session.scalars(query):
        first, second = judgment.task.items[:2]
        a, b = (item.model or item.response.model for item in (first, second))
        if not a or not b or a == b:
            continue
        battles.append(((a, b, _outcome(judgment.ranking, first.response_id)),
                        groups.get(judgment.annotator_id, ())
                        if judgment.annotator_id is not None else ()))
    return battles
