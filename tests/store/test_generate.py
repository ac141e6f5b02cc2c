"""``rewardloop generate`` end to end with a tiny model, and plans written through feedback.tasks
(SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data.records import CandidatesRecord, RankingRecord
from rewardloop.data.schema import Annotator, ComparisonTask, Response, TaskItem
from rewardloop.feedback import queue as Q
from rewardloop.feedback import select as S
from rewardloop.feedback import tasks as T
from rewardloop.score import heads_of
from rewardloop.synthetic import corpus_texts, preference_rows, prompt_rows
from rewardloop.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "policy"
    return build_tiny(out, corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=96)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(5, seed=3)))
    return path


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _generate(tiny_dir: Path, prompts: Path, *extra: str) -> object:
    return CliRunner().invoke(app, ["generate", "--policy", str(tiny_dir), "--prompts",
                                    str(prompts), "-n", "3", "--max-new-tokens", "8",
                                    "--device", "cpu", *extra])


def test_generate_candidates_and_tasks(store, tiny_dir: Path, prompts_file: Path,
                                       tmp_path: Path) -> None:
    gold = _write(tmp_path / "gold.jsonl", [
        {"prompt": "g", "responses": ["best", "mid", "worst"], "ranking": [[0], [1], [2]]}])
    out = tmp_path / "cand.jsonl"
    res = _generate(tiny_dir, prompts_file, "--out", str(out), "--db", store.url, "--budget",
                    "12", "--overlap-share", "0.2", "--overlap", "2", "--gold", str(gold),
                    "--gold-rate", "0.2", "--batch", "round1", "--seed", "5")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in prompt_rows(5, seed=3)]
    label = rows[0]["models"][0]
    assert label.startswith("policy@") and len(label) == len("policy@") + 12
    assert all(2 <= len(r["responses"]) <= 3 and r["models"] == [label] * len(r["responses"])
               for r in rows)
    with store.read() as s:
        tasks = list(s.scalars(select(ComparisonTask).order_by(ComparisonTask.priority.desc())))
        # Hand count: T=10 -> G=2, rest 8, O=round(1.6)=2 -> (2+2)*2 + 6 = 14 > 12;
        # T=9 -> G=2, rest 7, O=1 -> 3*2 + 6 = 12 labels.
        assert [t.is_gold for t in tasks].count(True) == 2
        assert sum(t.overlap for t in tasks) == 12 and len(tasks) == 9
        assert [t.overlap for t in tasks if not t.is_gold] == [2] + [1] * 6
        assert [i for i, t in enumerate(tasks) if t.is_gold] == [2, 6]  # floor(2.25), (6.75)
        for t in tasks:
            assert t.kind == "pairwise" and t.batch.name == "round1"
            texts = {i.response_id: i.response.text for i in t.items}
            if t.is_gold:  # the better of the pair, by the gold ranking best > mid > worst
                order = ["best", "mid", "worst"]
                better = min(texts.values(), key=order.index)
                assert texts[t.gold_ranking[0][0]] == better
        generated = s.scalars(select(Response).where(Response.model.is_not(None))).all()
        assert generated and all(
            r.model == "policy" and label.endswith(r.model_version)
            and r.gen_settings == {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                                   "seed": 5} for r in generated)
    # The same command again (a retry): the same plan, which the batch already holds.
    res = _generate(tiny_dir, prompts_file, "--out", str(tmp_path / "again.jsonl"), "--db",
                    store.url, "--budget", "12", "--overlap-share", "0.2", "--overlap", "2",
                    "--gold", str(gold), "--gold-rate", "0.2", "--batch", "round1", "--seed", "5")
    assert res.exit_code == 0, res.output
    assert "the batch already held 9 of these comparisons (an earlier run), so 0 tasks were " \
        "created" in res.output
    with store.read() as s:
        assert len(s.scalars(select(ComparisonTask)).all()) == 9


def test_planned_tasks_are_handed_out_in_plan_order(store) -> None:
    rows = [CandidatesRecord("p1", ["a", "b", "c"], ["m1", None, "m3"]),
            CandidatesRecord([{"role": "user", "content": "hi"}], ["x", "y"])]
    gold_rows = [RankingRecord("gp", ["good", "bad"], [[0], [1]])]
    pairs = S.candidate_pairs(rows)  # (0,0,1) (0,0,2) (0,1,2) (1,0,1)
    scores = np.array([0.1, 0.9, 0.5, 0.3])
    cfg = S.SelectionConfig(strategy="uncertainty", budget=4, overlap_share=0.0, gold_rate=0.25)
    planned = S.plan(cfg, pairs, S.gold_pairs(gold_rows), scores)
    # T=2 -> G=round(0.5)=0 (half to even), 2 labels; T=3 -> G=1 (3 labels) + 2 = 5 > 4.
    assert [(t.role, t.row, t.a, t.b) for t in planned.tasks] == [
        ("select", 0, 0, 2), ("select", 0, 1, 2)]
    cfg = S.SelectionConfig(strategy="uncertainty", budget=6, overlap_share=0.0, gold_rate=0.25,
                            overlap=2)
    planned = S.plan(cfg, pairs, S.gold_pairs(gold_rows), scores)
    # T=4 -> G=1 (2 labels), rest 3 -> 5 labels; T=5 -> G=1, rest 4 -> 6 labels: fits.
    assert [t.role for t in planned.tasks] == ["select", "select", "gold", "select", "select"]
    origin = S.Origin("pol", "v1", {"temperature": 0.7})
    with store.write() as s:
        batch = T.get_or_create_batch(s, "b")
        made = S.create_planned_tasks(s, planned, rows, gold_rows, batch=batch, origin=origin)
        ann = Annotator(name="ann")
        s.add(ann)
        s.flush()
        handed = []
        while (lease := Q.next_task(s, ann, batch=batch)) is not None:
            handed.append(lease.task_id)
            Q.skip_task(s, ann, lease.task_id)
        assert handed == [t.id for t in made]
        gold_task = made[2]
        assert gold_task.is_gold and gold_task.overlap == 2
        good = s.scalar(select(Response).where(Response.text == "good"))
        assert gold_task.gold_ranking[0] == [good.id] and good.model is None
        a = s.scalar(select(Response).where(Response.text == "a"))
        b = s.scalar(select(Response).where(Response.text == "b"))
        assert (a.model, a.model_version, a.gen_settings) == ("m1", "v1", {"temperature": 0.7})
        assert b.model == "pol"  # no model named in the row: the origin's
        first = [i.response.text for i in s.scalars(
            select(TaskItem).where(TaskItem.task_id == made[0].id).order_by(TaskItem.position))]
        assert first == ["a", "c"]  # the most uncertain pair (score 0.9)


def test_uncertainty_selects_the_pairs_the_ensemble_disagrees_on(
        tiny_dir: Path, prompts_file: Path, tmp_path: Path) -> None:
    from rewardloop.train.reward import RewardConfig, train_rm

    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(8))
    train_rm(RewardConfig(model=str(tiny_dir), data=pairs, out=tmp_path / "rm", ensemble=3,
                          max_steps=2, batch_size=4, max_length=64, device="cpu"))
    out, db = tmp_path / "cand.jsonl", f"sqlite:///{tmp_path / 'u.db'}"
    res = _generate(tiny_dir, prompts_file, "--out", str(out), "--db", db, "--select",
                    "uncertainty", "--rm", str(tmp_path / "rm"), "--budget", "4",
                    "--overlap-share", "0", "--measure", "std")
    assert res.exit_code == 0, res.output
    rows = [CandidatesRecord(r["prompt"], r["responses"])
            for r in map(json.loads, out.read_text().splitlines())]
    cand = S.candidate_pairs(rows)
    scores = S.uncertainty_scores(rows, cand, heads_of(tmp_path / "rm", device="cpu"), "std")
    top = [cand[i] for i in np.argsort(-scores, kind="stable")[:4]]
    want = [{rows[r].responses[a], rows[r].responses[b]} for r, a, b in top]
    from rewardloop.data.store import Store

    st = Store(db)
    try:
        with st.read() as s:
            got = [{i.response.text for i in t.items} for t in s.scalars(
                select(ComparisonTask).order_by(ComparisonTask.priority.desc()))]
    finally:
        st.dispose()
    assert got == want
    # A single reward model has no disagreement to measure.
    from rewardloop.models import load_reward_model, load_tokenizer

    single = tmp_path / "single"
    tokenizer = load_tokenizer(tiny_dir)
    load_reward_model(tiny_dir, device="cpu", pad_token_id=tokenizer.pad_token_id
                      ).save_pretrained(single, safe_serialization=True)
    tokenizer.save_pretrained(single)
    res = _generate(tiny_dir, prompts_file, "--db", db, "--select", "uncertainty", "--rm",
                    str(single), "--budget", "4")
    assert res.exit_code == 2 and "needs an ensemble" in res.output
    # A language model is no reward model at all.
    res = _generate(tiny_dir, prompts_file, "--db", db, "--select", "uncertainty", "--rm",
                    str(tiny_dir), "--budget", "4")
    assert res.exit_code == 2 and "not a reward model" in res.output


@pytest.mark.parametrize("flags, message", [
    (["--db", "sqlite:///x.db", "--select", "uncertainty"], "needs --rm DIR"),
    (["--db", "sqlite:///x.db", "--budget", "0"], "budget must be a positive"),
    (["--out", "c.jsonl", "--select", "random"], "need --db URL"),
    (["--out", "c.jsonl", "--rm", "rm"], "need --db URL"),
    (["--db", "sqlite:///x.db", "--rm", "rm"], "only by --select uncertainty"),
    ([], "give --out FILE and/or --db URL"),
    (["--out", "c.jsonl", "-n", "1"], "at least 2"),
    (["--db", "sqlite:///x.db", "--gold-rate", "1"], "gold_rate"),
])
def test_cli_user_errors_exit_2(tmp_path: Path, flags: list[str], message: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["generate", "--policy", "nowhere", "--prompts", "p.jsonl",
                                   *flags])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("db, message", [
    ("sqlite:///{tmp}/nodir/x.db", "directory {tmp}/nodir does not exist"),
    ("mysql://a/b", "unsupported database 'mysql'"),
    ("sqlite://bad.db", "did you mean sqlite:///bad.db?"),
])
def test_a_wrong_db_is_refused_before_sampling(tmp_path: Path, db: str, message: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling takes minutes to hours; without --out its answers would be lost to a --db
    typo found only afterwards."""
    import rewardloop.cli.generate as G

    def sample(*_: object) -> None:
        raise AssertionError("sampled before --db was checked")

    monkeypatch.setattr(G, "_sample", sample)
    monkeypatch.chdir(tmp_path)
    prompts = _write(tmp_path / "p.jsonl", prompt_rows(2, seed=1))
    res = CliRunner().invoke(app, ["generate", "--policy", "nowhere", "--prompts", str(prompts),
                                   "--out", "c.jsonl", "--db", db.format(tmp=tmp_path)])
    assert res.exit_code == 2, res.output
    assert message.format(tmp=tmp_path) in res.output
    assert list(tmp_path.iterdir()) == [prompts]


def test_cli_help_explains_every_flag() -> None:
    res = CliRunner().invoke(app, ["generate", "--help"])
    assert res.exit_code == 0
    for flag in ("--policy", "--prompts", "-n", "--out", "--select", "--rm", "--budget", "--db",
                 "--batch", "--overlap-share", "--overlap", "--gold", "--gold-rate",
                 "--max-new-tokens", "--temperature", "--top-p", "--seed", "--measure",
                 "--for-groups"):
        assert flag in res.output


def test_a_second_run_of_a_plan_adds_only_new_comparisons(store) -> None:
    """generate --db run twice into one batch (a retry, or a top-up with the same seed): the
    comparisons the batch holds are not made again."""
    rows = [CandidatesRecord(f"p{i}", ["a", "b", "c"]) for i in range(4)]
    pairs = S.candidate_pairs(rows)
    small = S.plan(S.SelectionConfig(budget=5, overlap_share=0.0, seed=3), pairs)
    larger = S.plan(S.SelectionConfig(budget=9, overlap_share=0.0, seed=3), pairs)
    with store.write() as s:
        batch = T.get_or_create_batch(s, "twice")
        first = S.create_planned_tasks(s, small, rows, batch=batch)
        skipped: list[int] = []
        again = S.create_planned_tasks(s, small, rows, batch=batch, skipped=skipped)
        assert len(first) == 5 and again == [] and sorted(skipped) == sorted(t.id for t in first)
        skipped.clear()
        topped = S.create_planned_tasks(s, larger, rows, batch=batch, skipped=skipped)
        held = {(t.row, t.a, t.b) for t in small.tasks}
        assert len(skipped) == len([t for t in larger.tasks if (t.row, t.a, t.b) in held])
        assert len(topped) == 9 - len(skipped)
        tasks = s.scalars(select(ComparisonTask).where(ComparisonTask.batch_id == batch.id)).all()
        keys = [frozenset(i.response_id for i in t.items) for t in tasks]
        assert len(keys) == len(set(keys)) == len({(t.row, t.a, t.b) for t in
                                                   [*small.tasks, *larger.tasks]})
