"""The arena per annotator group: a policy that wins overall but loses for one group raises the
group alarm (store_arena on a real store)."""

from __future__ import annotations

import pytest

from rewardloop.data import schema as S
from rewardloop.eval.alarms import group_win_rate_alarms
from rewardloop.eval.arena import battles_by_group, create_arena_tasks, judged_battles
from rewardloop.eval.evaluate import store_arena
from rewardloop.feedback import queue as Q
from rewardloop.metrics import UNGROUPED


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


def _arena(store, dissenter: str, groups: list[str]) -> None:
    """Batch ``arena``: 6 prompts, rlhf against sft, overlap 4; three ``warm`` annotators prefer
    rlhf, ``dissenter`` (of ``groups``) prefers sft."""
    prompts = [f"p{i}" for i in range(6)]
    outputs = {"rlhf": [f"r{i}" for i in range(6)], "sft": [f"s{i}" for i in range(6)]}
    with store.write() as s:
        create_arena_tasks(s, prompts, outputs, batch_name="arena", overlap=4)
    for k in range(3):
        _judge(store, f"warm-{k}", ["warm"], prefer="rlhf")
    _judge(store, dissenter, groups, prefer="sft")


def test_group_arena_and_alarm(store) -> None:
    _arena(store, "concise-0", ["concise"])
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


def test_the_arena_counts_annotators_of_no_group_under_none_without_an_alarm(store) -> None:
    """Audit s12 F5: their battles are reported under (none), as training reports them, but
    (none) is no group of people: no alarm for it."""
    _arena(store, "loner", [])
    result = store_arena(store.url, "arena", policy="rlhf", baseline="sft", n_boot=20)
    assert result["by_group"][UNGROUPED]["win_rate"] == 0.0
    assert result["by_group"][UNGROUPED]["n"] == 6 and result["group_alarms"] == []


def test_group_alarm_only_when_the_policy_wins_overall() -> None:
    assert group_win_rate_alarms(0.6, {"a": (0.7, 0.9), "b": (0.3, 0.45)}) == [
        "the policy wins overall (0.60) but loses for group 'b' (win rate 0.30, 95% interval "
        "up to 0.45 < 0.5)"]
    assert group_win_rate_alarms(0.45, {"a": (0.7, 0.9), "b": (0.2, 0.3)}) == []
    assert group_win_rate_alarms(None, {"b": (0.2, 0.3)}) == []
    assert group_win_rate_alarms(0.6, {"a": (0.5, 0.7)}) == []
    # losing one battle is not a finding: its interval reaches far above 0.5
    assert group_win_rate_alarms(0.6, {"tiny": (0.0, 0.79)}) == []


def test_eval_arena_out_is_what_the_report_shows(sqlite_store, tmp_path) -> None:
    """Audit s12 F6: `eval arena --out DIR` writes DIR/eval.json, and `report DIR` shows the
    win rate per group with the alarm; an eval.json of another kind is never replaced."""
    from typer.testing import CliRunner

    from rewardloop.cli import app

    _arena(sqlite_store, "concise-0", ["concise"])
    argv = ["eval", "arena", "--db", sqlite_store.url, "--batch", "arena", "--policy", "rlhf",
            "--baseline", "sft", "--out", str(tmp_path / "arena")]
    for _ in range(2):  # the second run replaces its own result
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["report", str(tmp_path / "arena"), "--out",
                                      str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    doc = (tmp_path / "r.html").read_text()
    assert "Does the policy win for every group?" in doc and "A group the policy loses" in doc
    other = tmp_path / "eval-run"
    other.mkdir()
    (other / "eval.json").write_text('{"win_rate": 0.6}')
    result = CliRunner().invoke(app, [*argv[:-1], str(other)])
    assert result.exit_code == 2 and "not an earlier `eval arena` result" in result.output
    assert (other / "eval.json").read_text() == '{"win_rate": 0.6}'
