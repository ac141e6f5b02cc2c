"""Arena tasks from several policies' answers, judged, read back as battles and rated."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from rewardloop.data import schema as S
from rewardloop.eval.arena import arena_battles, create_arena_tasks
from rewardloop.feedback import queue as Q
from rewardloop.metrics import bradley_terry_ratings


def _judge_all(store, prefer: str, tie_prompt: str | None = None) -> int:
    """Annotator 'ann' judges every task: the answer by ``prefer`` wins (tie on tie_prompt)."""
    n = 0
    with store.write() as s:
        ann = S.Annotator(name="ann")
        s.add(ann)
        s.flush()
        while (lease := Q.next_task(s, ann)) is not None:
            view = Q.task_view(s, lease)
            task = s.get(S.ComparisonTask, view["task_id"])
            by_model = {i.response.model: i.response_id for i in task.items}
            if view["prompt"] == tie_prompt:
                ranking = [list(by_model.values())]
            else:
                other = next(m for m in by_model if m != prefer)
                ranking = [[by_model[prefer]], [by_model[other]]]
            Q.submit_judgment(s, ann, view["task_id"], ranking, idempotency_key=f"k{n}")
            n += 1
    return n


def test_arena_round_trip(store) -> None:
    prompts = ["p1", "p2", "p3"]
    outputs = {"sft": ["a1", "a2", "same"], "rlhf": ["b1", "b2", "same"]}
    with store.write() as s:
        made = create_arena_tasks(s, prompts, outputs, batch_name="arena-1")
    assert (made.tasks, made.identical_pairs_skipped) == (2, 1)
    assert _judge_all(store, prefer="rlhf", tie_prompt="p2") == 2
    with store.read() as s:
        battles = arena_battles(s, "arena-1")
        assert arena_battles(s, "other-batch") == []
    outcomes = sorted((a, b, o) if a == "rlhf" else (b, a, 1 - o) for a, b, o in battles)
    assert outcomes == [("rlhf", "sft", 0.5), ("rlhf", "sft", 1.0)]
    ratings = bradley_terry_ratings(battles)
    assert ratings["rlhf"] > ratings["sft"]
    # made again (a resumed loop's eval stage): nothing doubles, nothing is judged twice
    with store.write() as s:
        again = create_arena_tasks(s, prompts, outputs, batch_name="arena-1")
    assert (again.tasks, again.existing, again.identical_pairs_skipped) == (0, 2, 1)
    # another policy's battles on the same prompts are new ones
    with store.write() as s:
        more = create_arena_tasks(s, prompts, {"sft": outputs["sft"], "round-2": ["c1", "b2",
                                                                                 "x"]},
                                  batch_name="arena-1")
    assert (more.tasks, more.existing) == (3, 0)
    with store.read() as s:
        assert len(arena_battles(s, "arena-1")) == 2


def test_arena_needs_two_policies_and_matching_lengths(store) -> None:
    with store.write() as s, pytest.raises(ValueError):
        create_arena_tasks(s, ["p"], {"only": ["a"]}, batch_name="x")
    with store.write() as s, pytest.raises(ValueError):
        create_arena_tasks(s, ["p", "q"], {"a": ["x"], "b": ["y", "z"]}, batch_name="x")


def test_a_repeated_answer_is_credited_to_the_round_that_gave_it(store) -> None:
    """Round 2 repeats an answer round 1 gave (one stored response, model round-1): round 2's
    arena still credits every battle to round 2."""
    prompts = ["p1", "p2"]
    with store.write() as s:
        create_arena_tasks(s, prompts, {"start": ["s1", "s2"], "round-1": ["x", "y"]},
                           batch_name="arena-1")
        create_arena_tasks(s, prompts, {"start": ["s1", "s2"], "round-2": ["x", "z"]},
                           batch_name="arena-2")
    with store.write() as s:
        ann = S.Annotator(name="ann")
        s.add(ann)
        s.flush()
        batch = s.scalar(select(S.Batch).where(S.Batch.name == "arena-2"))
        while (lease := Q.next_task(s, ann, batch=batch)) is not None:
            task = s.get(S.ComparisonTask, lease.task_id)
            start = next(i.response_id for i in task.items if i.response.text.startswith("s"))
            other = next(i.response_id for i in task.items if i.response_id != start)
            Q.submit_judgment(s, ann, task.id, [[other], [start]], idempotency_key=str(task.id))
    with store.read() as s:
        battles = arena_battles(s, "arena-2")
    wins = sorted((a, b, o) if a != "start" else (b, a, 1 - o) for a, b, o in battles)
    assert wins == [("round-2", "start", 1.0), ("round-2", "start", 1.0)]
