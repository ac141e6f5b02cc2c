"""A tiny 2-round loop: interrupted after a stage and resumed, it skips finished stages and ends
in the same state as an uninterrupted run; ``loop status`` and the CLI read it back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select
from typer.testing import CliRunner

from rewardloop.data.schema import Annotator, ComparisonTask
from rewardloop.data.store import Store
from rewardloop.loop import STAGE_TABLE, run_loop
from rewardloop.loop_config import STAGES, LoopConfig, loop_status
from rewardloop.loop_stages import check_for_groups

GOLD = "rewardloop.synthetic:gold_score"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    root = tmp_path_factory.mktemp("loop")
    model = build_tiny(root / "tiny", texts=synthetic.corpus_texts(200), vocab_size=300,
                       hidden_size=16, num_layers=1, num_heads=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(24)))
    pool = root / "pool.yaml"
    pool.write_text(yaml.safe_dump({"annotators": [
        {"name": "a-{i}", "count": 2, "temperature": 0.5}]}))
    return {"model": model, "prompts": prompts, "pool": pool}


def _config(setup: dict[str, Path], workdir: Path) -> LoopConfig:
    return LoopConfig(
        policy=str(setup["model"]), prompts=setup["prompts"], workdir=workdir, rounds=2,
        prompts_per_round=10, overlap=1, pool=setup["pool"], gold=GOLD, eval_n=4,
        max_new_tokens=6, seed=3,
        rm_options={"max_steps": 2, "batch_size": 4},
        policy_options={"max_steps": 1, "batch_size": 4, "num_generations": 2, "lr": 1e-4})


class Interrupt(Exception):
    pass


def _markers(workdir: Path) -> dict[str, str]:
    return {str(p.relative_to(workdir)): p.read_text() for p in workdir.glob("round-*/*/DONE.json")}


def _figures(summary: dict) -> list[dict]:
    """Per-round figures without wall-clock timings."""
    drop = ("wall_s", "samples_per_s", "tokens_per_s", "time_", "finished")
    return [{k: v for k, v in r.items() if not any(d in k for d in drop)}
            for r in summary["per_round"]]


def test_interrupted_loop_resumes_where_it_stopped(setup: dict[str, Path],
                                                  tmp_path: Path) -> None:
    straight = run_loop(_config(setup, tmp_path / "straight"))
    workdir = tmp_path / "resumed"
    cfg = _config(setup, workdir)

    def stop_after_round1_rm(n: int, stage: str) -> None:
        if (n, stage) == (1, "rm"):
            raise Interrupt

    with pytest.raises(Interrupt):
        run_loop(cfg, after_stage=stop_after_round1_rm)
    status = loop_status(workdir)
    assert [s for s, state in status[0]["stages"].items() if state == "done"] == \
        ["generate", "tasks", "feedback", "rm"]
    before = _markers(workdir)

    ran: list[tuple[int, str]] = []
    resumed = run_loop(cfg, after_stage=lambda n, s: ran.append((n, s)))
    after = _markers(workdir)
    # finished stages were not redone: their markers are untouched
    assert all(after[k] == v for k, v in before.items())
    assert len(after) == 2 * len(STAGES)
    # the stages ran in the table's order, whose names are the ones `loop status` reads
    assert [name for name, _ in STAGE_TABLE] == list(STAGES)
    assert ran == [(n, s) for n in (1, 2) for s in STAGES]
    assert _figures(resumed) == _figures(straight)
    assert resumed["best"]["round"] in (1, 2)
    assert json.loads((workdir / "best.json").read_text())["round"] == resumed["best"]["round"]
    for key in ("gold_win_rate", "gold_win_rate_ci", "rm_accuracy", "kl", "alarms"):
        assert key in resumed
    # round 2 starts from round 1's policy and warm-starts from its reward model
    rm_cfg = yaml.safe_load((workdir / "round-2" / "rm" / "config.yaml").read_text())
    assert rm_cfg["model"] == str(workdir / "round-1" / "rm" / "model")
    assert (workdir / "round-1" / "eval" / "eval.json").is_file()

    # a finished run started again does nothing
    ran.clear()
    run_loop(cfg, after_stage=lambda n, s: ran.append((n, s)))
    assert _markers(workdir) == after


def test_loop_status_cli(setup: dict[str, Path], tmp_path: Path) -> None:
    from rewardloop.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["loop", "status", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "no rounds yet" in result.output
    (tmp_path / "round-1" / "generate").mkdir(parents=True)
    result = runner.invoke(app, ["loop", "status", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "partial" in result.output and "pending" in result.output


def test_loop_config_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    from rewardloop.cli import app

    bad = tmp_path / "loop.yaml"
    bad.write_text(yaml.safe_dump({"policy": "x", "prompts": "p.jsonl", "algorithm": "magic"}))
    result = CliRunner().invoke(app, ["loop", "--config", str(bad)])
    assert result.exit_code == 2
    assert "algorithm must be one of" in result.output
    with pytest.raises(ValueError, match="arena"):
        LoopConfig(policy="x", prompts=Path("p"), arena=True)


# -- for_groups: the round's tasks aimed at the annotator groups behind ----------------------------


def _group_pool(path: Path, groups: dict[str, int]) -> Path:
    path.write_text(yaml.safe_dump({"annotators": [
        {"name": f"{g}-{{i}}", "count": n, "group": g, "temperature": 0.5}
        for g, n in groups.items()]}))
    return path


def _seeded_store(url: str, pool: Path) -> None:
    """8 tasks for everyone judged in turn by 3 majority and 1 minority annotators: 2 judgments
    each, so the majority holds 6 and the minority 2."""
    from rewardloop.feedback import tasks as T
    from rewardloop.feedback.simulate import load_pool, simulate
    from rewardloop.synthetic import candidate_rows

    rows = [r for r in candidate_rows(16, seed=0) if len(set(r["responses"])) == 2][:8]
    store = Store(url)
    try:
        with store.write() as s:
            T.create_tasks_from_candidates(s, rows, batch=T.get_or_create_batch(s, "before"))
        assert simulate(store, load_pool(pool), GOLD, batch="before").total == 8
    finally:
        store.dispose()


def _round1_tasks(url: str) -> list[tuple[str | None, list[str]]]:
    """Round 1's tasks in hand-out order: (audience, names of who judged it)."""
    store = Store(url)
    try:
        with store.read() as s:
            tasks = s.scalars(select(ComparisonTask).where(ComparisonTask.batch.has(
                name="round-1")).order_by(ComparisonTask.priority.desc()))
            return [(t.audience, sorted(j.annotator.name for j in t.judgments)) for t in tasks]
    finally:
        store.dispose()


@pytest.mark.parametrize("for_groups", [None, "fewest"])
def test_for_groups_aims_the_rounds_tasks_at_the_group_behind(
        setup: dict[str, Path], tmp_path: Path, for_groups: str | None) -> None:
    """The minority holds 2 judgments against the majority's 6: with ``for_groups: fewest`` the
    round's first 4 tasks (one label each) are for the minority, which then stands level, and
    the pool's feedback stage gets them judged by minority annotators only; without it every
    task is for everyone."""
    pool = _group_pool(tmp_path / "groups.yaml", {"majority": 3, "minority": 1})
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    _seeded_store(url, pool)
    cfg = dataclasses.replace(_config(setup, tmp_path / "run"), db=url, pool=pool, rounds=1,
                              for_groups=for_groups)

    def stop_after_feedback(n: int, stage: str) -> None:
        if stage == "feedback":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_loop(cfg, after_stage=stop_after_feedback)
    tasks = _round1_tasks(url)
    assert len(tasks) >= 5
    figures = json.loads((tmp_path / "run" / "round-1" / "tasks" / "DONE.json").read_text())
    if for_groups is None:
        assert [audience for audience, _ in tasks] == [None] * len(tasks)
        assert figures["figures"]["aimed"] == {} and "aiming" not in figures["figures"]
        return
    assert [audience for audience, _ in tasks] == ["minority"] * 4 + [None] * (len(tasks) - 4)
    assert [who for _, who in tasks[:4]] == [["minority-1"]] * 4
    assert figures["figures"]["aimed"] == {"minority": 4}
    assert figures["figures"]["aiming"] == (
        f"aimed 4 of {len(tasks)} tasks at groups (fewest): minority 4; judgments (+ open aimed "
        "labels): majority 6, minority 2")


def test_for_groups_refused_before_sampling(setup: dict[str, Path], tmp_path: Path) -> None:
    """A pool of one group, an unknown rule, uncertain without overlap, a group smaller than
    the overlap: one line, exit 2, before round 1 samples anything. A fresh store with a pool
    of two groups is fine, even for uncertain: the pool is registered, nobody is behind yet."""
    from rewardloop.cli import app

    def refused(message: str, **keys: object) -> None:
        config = tmp_path / "loop.yaml"
        config.write_text(yaml.safe_dump({
            "policy": str(setup["model"]), "prompts": str(setup["prompts"]),
            "workdir": str(tmp_path / "run"), "gold": GOLD, **keys}))
        result = CliRunner().invoke(app, ["loop", "--config", str(config)])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "round-1").exists()

    one = str(_group_pool(tmp_path / "one.yaml", {"majority": 2}))
    refused("needs active annotators of 2 or more groups in the store", pool=one,
            for_groups="fewest")
    refused("for_groups must be one of ['fewest', 'uncertain'], got 'most'", for_groups="most")
    refused("it needs overlap >= 2", for_groups="uncertain")
    two = str(_group_pool(tmp_path / "two.yaml", {"majority": 3, "minority": 1}))
    refused("group 'minority' has 1 active annotator(s), fewer than the 2 each task wants",
            pool=two, for_groups="fewest", overlap=2, db=f"sqlite:///{tmp_path / 'a.db'}")
    even = _group_pool(tmp_path / "even.yaml", {"majority": 2, "minority": 2})
    fresh = dataclasses.replace(_config(setup, tmp_path / "fresh"), pool=even, overlap=2,
                                for_groups="uncertain", db=f"sqlite:///{tmp_path / 'fresh.db'}")
    check_for_groups(fresh)  # no judgment yet: nobody is behind, no agreement is needed
    store = Store(fresh.db_url)
    try:
        with store.read() as s:
            assert sorted(s.scalars(select(Annotator.name))) == [
                "majority-1", "majority-2", "minority-1", "minority-2"]
    finally:
        store.dispose()


def test_a_pool_or_gold_that_cannot_load_is_refused_before_sampling(
        setup: dict[str, Path], tmp_path: Path) -> None:
    """A missing pool file, a gold or pool_gold function that does not import: one line, exit
    2, before round 1 samples anything (the feedback stage found them after the generation)."""
    from rewardloop.cli import app

    def refused(message: str, **keys: object) -> None:
        config = tmp_path / "loop.yaml"
        config.write_text(yaml.safe_dump({
            "policy": str(setup["model"]), "prompts": str(setup["prompts"]),
            "workdir": str(tmp_path / "run"), "gold": GOLD, "pool": str(setup["pool"]),
            **keys}))
        result = CliRunner().invoke(app, ["loop", "--config", str(config)])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "round-1").exists()

    refused("no such pool file", pool=str(tmp_path / "missing.yaml"))
    refused("no_such_gold", gold="rewardloop.synthetic:no_such_gold")
    refused("nowhere_module", pool_gold="nowhere_module:gold")


def test_a_workdir_that_is_not_a_loops_is_refused_and_kept(tmp_path: Path) -> None:
    """--workdir at a project folder must not replace its config.yaml or summary.json (the loop
    and the demo wrote theirs over them); a new, empty or loop-made directory is fine."""
    from rewardloop.demo import run_demo
    from rewardloop.errors import UserError
    from rewardloop.loop_config import WORKDIR_MARKER, claim_workdir

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.yaml").write_text("database: prod\n")
    (proj / "summary.json").write_text('{"mine": 1}\n')
    for claim in (lambda: claim_workdir(proj, "loop"), lambda: run_demo(proj, fast=True)):
        with pytest.raises(UserError, match="not a rewardloop work directory.*config.yaml"):
            claim()
    assert (proj / "config.yaml").read_text() == "database: prod\n"
    assert sorted(p.name for p in proj.iterdir()) == ["config.yaml", "summary.json"]
    claim_workdir(tmp_path / "new", "loop")  # new: created and marked
    assert (tmp_path / "new" / WORKDIR_MARKER).is_file()
    (tmp_path / "new" / "summary.json").write_text("{}")
    claim_workdir(tmp_path / "new", "loop")  # its own: continued
    old = tmp_path / "old"  # a loop's work directory from before the marker
    (old / "round-1").mkdir(parents=True)
    (old / "config.yaml").write_text("policy: p\nprompts: q.jsonl\n")
    claim_workdir(old, "loop")
