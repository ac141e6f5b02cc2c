"""Loop stages against a real store, without models: a resumed rm stage trains on what it
started with, a round's batch is never another loop's, an arena with nothing to judge is a
result, not an error."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from sqlalchemy import select

from rewardloop.config import load_config
from rewardloop.data import schema as S
from rewardloop.data.formats import write_records
from rewardloop.data.records import CandidatesRecord
from rewardloop.errors import UserError
from rewardloop.feedback import queue as Q
from rewardloop.feedback import tasks as T
from rewardloop.loop import run_loop
from rewardloop.loop_config import LoopConfig, claim_workdir
from rewardloop.loop_stages import RoundContext, _arena, _rm_inputs, stage_tasks


def _config(tmp_path: Path, store, **keys) -> LoopConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "p"}\n')
    return LoopConfig(policy="policy", prompts=prompts, workdir=tmp_path / "loop",
                      db=store.url, **keys)


def _judge(store, batch: str, rows: list[dict], who: str = "ann") -> None:
    """``who`` judges every task of ``rows`` (new tasks in ``batch``): the first answer wins."""
    with store.write() as s:
        made = T.create_tasks_from_candidates(s, rows, batch=T.get_or_create_batch(s, batch))
        ann = s.scalar(select(S.Annotator).where(S.Annotator.name == who))
        if ann is None:
            ann = S.Annotator(name=who)
            s.add(ann)
            s.flush()
        for task in made:
            first, second = (i.response_id for i in sorted(task.items, key=lambda i: i.position))
            Q.submit_judgment(s, ann, task.id, [[first], [second]],
                              idempotency_key=f"{who}-{task.id}", require_lease=False)


def test_a_resumed_rm_stage_trains_on_the_export_it_started_with(sqlite_store,
                                                                 tmp_path: Path) -> None:
    cfg = _config(tmp_path, sqlite_store)
    ctx = RoundContext(cfg, 1)
    _judge(sqlite_store, ctx.batch, [{"prompt": "p1", "responses": ["a", "b"]},
                                     {"prompt": "p2", "responses": ["c", "d"]}])
    data = tmp_path / "data"
    data.mkdir()
    fresh = cfg.rm_config(model="m", data=data / "pairs.jsonl", out=tmp_path / "rm",
                          overwrite=True)
    n, report, (_, flagged, _) = _rm_inputs(ctx, data, fresh)
    assert n == 2 and "annotators" in report and flagged == set()
    exported = (data / "pairs.jsonl").read_text()
    # people judge more while the trainer runs; then it is interrupted and resumed
    _judge(sqlite_store, ctx.batch, [{"prompt": "p3", "responses": ["e", "f"]}], who="late")
    resumed = cfg.rm_config(model="m", data=data / "pairs.jsonl", out=tmp_path / "rm",
                            resume=True)
    n, _, _ = _rm_inputs(ctx, data, resumed)
    assert n == 2 and (data / "pairs.jsonl").read_text() == exported
    assert json.loads((data / "annotators.json").read_text())["flagged"] == []
    # a stage started afresh (no checkpoint yet) exports again, with the late judgment
    n, _, _ = _rm_inputs(ctx, data, fresh)
    assert n == 3


def _candidates(ctx: RoundContext, prompts: list[str], policy: str = "A") -> None:
    out = ctx.dir / "generate"
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "candidates.jsonl", "candidates",
                  [CandidatesRecord(p, [f"{policy}: {p} 1", f"{policy}: {p} 2"],
                                    ["start", "start"], None) for p in prompts])


def test_a_round_batch_of_another_loop_is_refused_and_a_prefix_separates_them(
        sqlite_store, tmp_path: Path) -> None:
    # the same prompts file and seed draw the same prompts: the answers tell the loops apart
    first = RoundContext(_config(tmp_path / "a", sqlite_store), 1)
    _candidates(first, ["the prompt"], policy="A")
    assert stage_tasks(first, first.dir / "tasks")["tasks"] == 1
    assert stage_tasks(first, first.dir / "tasks")["tasks"] == 1  # its own rerun: kept
    other = RoundContext(_config(tmp_path / "b", sqlite_store), 1)
    _candidates(other, ["the prompt"], policy="B")
    with pytest.raises(UserError, match="batch_prefix"):
        stage_tasks(other, other.dir / "tasks")
    prefixed = RoundContext(_config(tmp_path / "b", sqlite_store, batch_prefix="b/"), 1)
    figures = stage_tasks(prefixed, prefixed.dir / "tasks")
    assert figures["batch"] == "b/round-1" and figures["tasks"] == 1
    assert prefixed.arena_batch == "b/arena-round-1"


def test_an_arena_with_nothing_to_judge_is_recorded_not_refused(sqlite_store,
                                                                tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("annotators:\n  - name: sim\n")
    cfg = _config(tmp_path, sqlite_store, pool=pool, gold="rewardloop.synthetic:gold_score",
                  arena=True)
    result = {"policy_name": "round-1", "baseline_name": "start",
              "comparisons": [{"name": "human", "judge": "human", "status": "pending",
                               "tasks": 0, "existing_tasks": 0,
                               "identical_pairs_skipped": 6}]}
    arena = _arena(RoundContext(cfg, 1), tmp_path / "eval", result)
    assert arena["battles"] == 0 and "no battle" in arena["note"]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["comparisons"] == [] and saved["arena"]["identical_pairs_skipped"] == 6


def test_waiting_for_people_stops_with_the_command_that_resumes(sqlite_store,
                                                               tmp_path: Path) -> None:
    """loop.md: after wait_timeout_s the loop stops with a message saying how to resume; the
    command it names must load the config the run started with (a bare `rewardloop loop`
    has no --policy)."""
    cfg = _config(tmp_path, sqlite_store, min_judgments=1, wait_timeout_s=0.01, poll_s=0.01,
                  rm_options={"max_steps": 3})
    ctx = RoundContext(cfg, 1)
    claim_workdir(cfg.workdir, "loop")
    for stage in ("generate", "tasks"):  # done already: the round goes on to wait
        (ctx.dir / stage).mkdir(parents=True)
        (ctx.dir / stage / "DONE.json").write_text('{"figures": {}}')
    with sqlite_store.write() as s:
        T.get_or_create_batch(s, ctx.batch)
    with pytest.raises(UserError, match="0 of 1 judgments arrived") as info:
        run_loop(cfg)
    found = re.search(r"then run `([^`]*)`: it resumes here", str(info.value))
    assert found is not None, str(info.value)
    args = shlex.split(found.group(1))
    assert args[:3] == ["rewardloop", "loop", "--config"] and len(args) == 4
    assert load_config(LoopConfig, Path(args[3])) == cfg
