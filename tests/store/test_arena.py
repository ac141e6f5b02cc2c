"""Arena tasks from several policies' answers, judged, read back as battles and rated."""

from __future__ import annotations

import pytest

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


def test_arena_needs_two_policies_and_matching_lengths(store) -> None:
    with store.write() as s, pytest.raises(ValueError):
        create_arena_tasks(s, ["p"], {"only": ["a"]}, batch_name="x")
    with store.write() as s, pytest.raises(ValueError):
        create_arena_tasks(s, ["p", "q"], {"a": ["x"], "b": ["y", "z"]}, batch_name="x")
