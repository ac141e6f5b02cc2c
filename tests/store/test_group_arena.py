"""The arena per annotator group: a policy that wins overall but loses for one group raises the
group alarm (store_arena on a real store)."""

from __future__ import annotations

import pytest

from rewardloop.data import schema as S
from rewardloop.eval.alarms import group_win_rate_alarms
from rewardloop.eval.arena import battles_by_group, create_arena_tasks, judged_battles
from rewardloop.eval.evaluate import store_arena
from rewardloop.feedback import queue as Q


def _judge(store, name: str, groups: list[str], prefer: str) -> None:
    """Annotator ``name`` judges every task it is offered: ``prefer``'s answer wins."""
    with store.write() as s:
        ann = S.Annotator(name=name, groups=groups)
        s.add(ann)
        s.flush()
        n = 0
        while (lease := Q.next_task(s, ann)) is not None:
            view = Q.task_view(s, lease)
            task = s.get(S.ComparisonTask, view["task_id"])
            by_model = {i.response.model: i.response_id for i in task.items}
            other = next(m for m in by_model if m != prefer)
            Q.submit_judgment(s, ann, view["task_id"], [[by_model[prefer]], [by_model[other]]],
                              idempotency_key=f"{name}-{n}")
            n += 1


def test_group_arena_and_alarm(store) -> None:
    prompts = [f"p{i}" for i in range(6)]
    outputs = {"rlhf": [f"r{i}" for i in range(6)], "sft": [f"s{i}" for i in range(6)]}
    with store.write() as s:
        create_arena_tasks(s, prompts, outputs, batch_name="arena", overlap=4)
    for k in range(3):
        _judge(store, f"warm-{k}", ["warm"], prefer="rlhf")
    _judge(store, "concise-0", ["concise"], prefer="sft")
    with store.read() as s:
        judged = judged_battles(s, "arena")
    assert len(judged) == 24
    by_group = battles_by_group(judged)
    assert (len(by_group["warm"]), len(by_group["concise"])) == (18, 6)
    result = store_arena(store.url, "arena", policy="rlhf", baseline="sft", n_boot=20)
    assert result["win_rate"] == pytest.approx(0.75)
    assert result["by_group"]["warm"]["win_rate"] == 1.0
    assert result["by_group"]["concise"]["win_rate"] == 0.0
    assert result["by_group"]["concise"]["n"] == 6
    assert len(result["group_alarms"]) == 1 and "'concise'" in result["group_alarms"][0]


def test_group_alarm_only_when_the_policy_wins_overall() -> None:
    assert group_win_rate_alarms(0.6, {"a": (0.7, 0.9), "b": (0.3, 0.45)}) == [
        "the policy wins overall (0.60) but loses for group 'b' (win rate 0.30, 95% interval "
        "up to 0.45 < 0.5)"]
    assert group_win_rate_alarms(0.45, {"a": (0.7, 0.9), "b": (0.2, 0.3)}) == []
    assert group_win_rate_alarms(None, {"b": (0.2, 0.3)}) == []
    assert group_win_rate_alarms(0.6, {"a": (0.5, 0.7)}) == []
    # losing one battle is not a finding: its interval reaches far above 0.5
    assert group_win_rate_alarms(0.6, {"tiny": (0.0, 0.79)}) == []
