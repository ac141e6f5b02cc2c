"""generate --for-groups: new tasks aimed at the annotator groups that fall behind, by hand-counted
levels, then end to end on a simulated pool (SQLite and PostgreSQL): the aimed tasks reach only
their group's annotators, and the one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data.schema import Annotator, ComparisonTask, Judgment
from rewardloop.data.store import Store
from rewardloop.feedback import audience as A
from rewardloop.feedback import select as S
from rewardloop.feedback import tasks as T
from rewardloop.feedback.records import JudgmentRecord
from rewardloop.feedback.simulate import SimulatedAnnotator, opposed_groups_pool, simulate
from rewardloop.synthetic import candidate_rows, corpus_texts, prompt_rows, style_components
from rewardloop.tiny import build_tiny


def _plan(*roles: str) -> S.Plan:
    return S.Plan([S.PlannedTask(r, i, 0, 1, 3 if r != "select" else 1)
                   for i, r in enumerate(roles)])


def test_aim_fills_the_lowest_group_up_to_the_highest() -> None:
    """majority 10 judgments, minority 4 with 2 labels already aimed at it: the selected tasks
    go to the minority until it reaches 10 (4 + 2 + 4 tasks), the rest to everyone; overlap
    and gold tasks stay for everyone."""
    needs = [A.GroupNeed("majority", 6, 10), A.GroupNeed("minority", 2, 4, open_labels=2)]
    plan = A.aim(needs, _plan("overlap", "select", "gold", *["select"] * 6))
    assert [t.audience for t in plan.tasks] == [None, "minority", None] + ["minority"] * 3 \
        + [None] * 3
    line = A.describe(needs, plan, "fewest")
    assert line == ("aimed 4 of 9 tasks at groups (fewest): minority 4; judgments (+ open aimed "
                    "labels): majority 10, minority 4 + 2")
    even = A.aim([A.GroupNeed("a", 1, 5), A.GroupNeed("b", 1, 5)], _plan("select", "select"))
    assert [t.audience for t in even.tasks] == [None, None]


def _record(i: int, who: str, group: str, unit: int, better_first: bool) -> JudgmentRecord:
    return JudgmentRecord(i, who, (group,), unit, "pairwise",
                          [[1], [2]] if better_first else [[2], [1]])


def test_uncertain_weighs_judgments_by_the_groups_own_agreement() -> None:
    """Hand count: the majority's two members agree on 3 of 4 pairs (a = 0.75, each label worth
    2a - 1 = 0.5); the minority's one member has no pair of its own, so everyone's pooled
    agreement (8 of 12 verdict pairs) stands in. The minority's lower level gets the tasks."""
    recs = []
    for unit in range(4):
        recs.append(_record(len(recs), "m1", "majority", unit, True))
        recs.append(_record(len(recs), "m2", "majority", unit, unit != 3))
        recs.append(_record(len(recs), "x1", "minority", unit, unit % 2 == 0))
    recs.append(_record(len(recs), "m1", "majority", 4, True))  # a pair nobody else judged
    own, pooled = A.within_agreement(recs)
    assert own == {"majority": 0.75}
    # per unit (m1, m2, x1): agreeing pairs of the 3 -> units 0, 2: all agree (3); unit 1:
    # m1 = m2 != x1 (1); unit 3: m1 = x1 != m2 (1): 8 of 12.
    assert pooled == pytest.approx(8 / 12)
    members = {"m1": ["majority"], "m2": ["majority"], "x1": ["minority"], "gone": ["old"]}
    needs = A.group_needs(members, {"m1", "m2", "x1"}, [r.annotator for r in recs], {},
                          own, pooled)
    assert [(n.group, n.members, n.judgments, n.pooled) for n in needs] == [
        ("majority", 2, 9, False), ("minority", 1, 4, True)]  # "old" has nobody active
    assert [n.level for n in needs] == pytest.approx([9 * 0.5, 4 * (2 * 8 / 12 - 1)])
    plan = A.aim(needs, _plan(*["select"] * 12))
    # minority: 4/3 + k/3 >= 4.5 after k = 10 tasks
    assert [t.audience for t in plan.tasks] == ["minority"] * 10 + [None] * 2
    assert "minority 4 x 0.33 (pooled agreement: none within the group) = 1.3" in \
        A.describe(needs, plan, "uncertain")


def _tasks(store: Store, batch: str, n: int, seed: int, overlap: int = 1) -> None:
    """``n`` pairwise tasks for everyone of synthetic replies (two different ones each)."""
    rows = [r for r in candidate_rows(2 * n, seed=seed) if len(set(r["responses"])) == 2][:n]
    assert len(rows) == n
    with store.write() as s:
        b = T.get_or_create_batch(s, batch)
        T.create_tasks_from_candidates(s, rows, overlap=overlap, batch=b)


def test_uncertain_aims_at_the_noisier_group_where_fewest_sees_no_gap(store: Store) -> None:
    """Two groups of 3 judge every pair (equal counts): by count no group is behind, but the
    minority's members flip a third of their verdicts, so it is the less certain one."""
    pool = ([SimulatedAnnotator(f"sure-{i}", group="majority", temperature=0.05)
             for i in range(3)]
            + [SimulatedAnnotator(f"noisy-{i}", group="minority", temperature=0.05, flip=0.35)
               for i in range(3)])
    _tasks(store, "r1", 20, seed=4, overlap=6)
    simulate(store, pool, "rewardloop.synthetic:gold_score", seed=1)
    plan = _plan(*["select"] * 5)
    with store.read() as s:
        fewest = A.needs_from_store(s, "fewest")
        uncertain = A.needs_from_store(s, "uncertain")
    assert [n.judgments for n in fewest] == [60, 60]
    assert [t.audience for t in A.aim(fewest, plan).tasks] == [None] * 5
    sure, noisy = uncertain
    assert sure.agreement > 0.9 > 0.7 > noisy.agreement and not noisy.pooled
    assert [t.audience for t in A.aim(uncertain, plan).tasks] == ["minority"] * 5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "policy", corpus_texts(100),
                      vocab_size=300, hidden_size=16, num_layers=1, num_heads=2,
                      max_position=96)


def _generate(tiny_dir: Path, prompts: Path, db: str, *extra: str) -> object:
    return CliRunner().invoke(app, [
        "generate", "--policy", str(tiny_dir), "--prompts", str(prompts), "-n", "3",
        "--max-new-tokens", "8", "--device", "cpu", "--db", db, "--overlap-share", "0", *extra])


def test_generate_aims_at_the_minority_and_only_it_judges_them(
        store: Store, tiny_dir: Path, tmp_path: Path) -> None:
    """6 majority and 2 minority annotators judge 24 tasks for everyone in turn: 18 judgments
    against 6. generate --for-groups fewest aims all 10 new tasks at the minority (6 + 10 < 18);
    a second run counts those 10 open labels and aims only 2 more (16 -> 18). The simulated
    pool then works the queue: every aimed task is judged, and only by minority annotators."""
    pool = opposed_groups_pool({"polite": 1.0, "brief": 2.0}, "brief")
    _tasks(store, "r1", 24, seed=0)
    simulate(store, pool, style_components, batch="r1", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(5, seed=3)))
    res = _generate(tiny_dir, prompts, store.url, "--budget", "10", "--for-groups", "fewest",
                    "--batch", "r2")
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == (
        "aimed 10 of 10 tasks at groups (fewest): minority 10; judgments (+ open aimed "
        "labels): majority 18, minority 6")
    res = _generate(tiny_dir, prompts, store.url, "--budget", "4", "--for-groups", "fewest",
                    "--batch", "r3", "--seed", "1")
    assert res.exit_code == 0, res.output
    assert "aimed 2 of 4 tasks at groups (fewest): minority 2; judgments (+ open aimed " \
        "labels): majority 18, minority 6 + 10" in res.output
    simulate(store, pool, style_components, seed=1)
    with store.read() as s:
        aimed = s.scalars(select(ComparisonTask).where(ComparisonTask.audience.is_not(None)))
        assert {t.audience for t in aimed} == {"minority"}
        judges = s.execute(select(ComparisonTask.done, Annotator.name)
                           .join(Judgment, Judgment.task_id == ComparisonTask.id)
                           .join(Annotator, Annotator.id == Judgment.annotator_id)
                           .where(ComparisonTask.audience.is_not(None))).all()
        assert len(judges) == 12 and all(done for done, _ in judges)
        assert {name for _, name in judges} == {"minor-1", "minor-2"}
        open_tasks = s.scalars(select(ComparisonTask).where(ComparisonTask.batch.has(name="r3"),
                                                            ComparisonTask.audience.is_(None)))
        assert all(t.done for t in open_tasks)


def _one_line_refusal(args: list[str], tmp_path: Path, message: str) -> None:
    res = CliRunner().invoke(app, ["generate", "--policy", "nowhere", "--prompts",
                                   str(tmp_path / "p.jsonl"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_refused_in_one_line_before_sampling(tmp_path: Path) -> None:
    """No groups in the store, one group only, no agreement to weigh by: exit 2 with one line,
    before the policy is even looked at ("nowhere" does not exist)."""
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    db = f"sqlite:///{tmp_path / 'g.db'}"
    store = Store(db)
    try:
        _one_line_refusal(["--db", db, "--for-groups", "fewest"], tmp_path,
                          "needs active annotators of 2 or more groups in the store")
        with store.write() as s:
            s.add_all([Annotator(name="a", groups=["warm"]), Annotator(name="b", groups=["warm"]),
                       Annotator(name="c", groups=["concise"], active=False)])
        _one_line_refusal(["--db", db, "--for-groups", "fewest"], tmp_path, "found 'warm'")
        with store.write() as s:
            s.add(Annotator(name="d", groups=["concise"]))
        _one_line_refusal(["--db", db, "--for-groups", "uncertain"], tmp_path,
                          "no pair in the store was judged by two of them")
        with store.read() as s:
            assert s.scalars(select(ComparisonTask)).first() is None
    finally:
        store.dispose()
    _one_line_refusal(["--db", db, "--for-groups", "most"], tmp_path, "must be one of")
    _one_line_refusal(["--out", str(tmp_path / "c.jsonl"), "--for-groups", "fewest"], tmp_path,
                      "--for-groups create tasks and need --db URL")
    assert not (tmp_path / "c.jsonl").exists()


def test_tasks_create_for_a_group(store: Store, tmp_path: Path) -> None:
    """tasks create --audience: the file's tasks are for the group (gold ones for everyone);
    more overlap than the group has active annotators is refused in one line."""
    with store.write() as s:
        s.add_all([Annotator(name="n1", groups=["nurses"]), Annotator(name="n2", groups=["nurses"]),
                   Annotator(name="n3", groups=["nurses"], active=False)])
    cand = tmp_path / "cand.jsonl"
    cand.write_text("".join(json.dumps(r) + "\n" for r in (
        {"prompt": "p1", "responses": ["a", "b", "c"]}, {"prompt": "p2", "responses": ["d", "e"]})))
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": "g", "responses": ["x", "y"], "ranking": [[0], [1]]})
                    + "\n")
    base = ["tasks", "create", str(cand), "--db", store.url, "--audience", "nurses"]
    res = CliRunner().invoke(app, [*base, "--overlap", "3"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "2 active annotator(s) in that group, fewer than the 3" in res.output
    res = CliRunner().invoke(app, [*base, "--overlap", "2", "--gold", str(gold)])
    assert res.exit_code == 0, res.output
    assert "created 5 pairwise tasks (1 gold) in batch cand, overlap 2, for group nurses" \
        in res.output
    with store.read() as s:
        made = s.scalars(select(ComparisonTask)).all()
        assert sorted((t.is_gold, t.audience) for t in made) == [(False, "nurses")] * 4 + [
            (True, None)]
