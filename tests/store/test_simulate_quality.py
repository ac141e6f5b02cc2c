"""simulate -> quality end to end on a real store (SQLite and PostgreSQL), and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data import schema as S
from rewardloop.data.store import Store
from rewardloop.feedback import tasks
from rewardloop.feedback.quality import (
    FLAGS,
    annotator_weights,
    annotators_from_db,
    flagged_annotators,
    quality_report,
)
from rewardloop.feedback.simulate import parse_pool, simulate

UNIT_TESTS = Path(__file__).parents[1] / "unit"


def gold(prompts: list, completions: list[str], **kwargs: object) -> list[float]:
    return [float(c.split("q=")[1].split()[0]) for c in completions]


def _fill(store: Store, n_pairs: int = 18, overlap: int = 3, seed: int = 0) -> None:
    """Pairwise tasks (every 3rd one gold), plus two 3-way ranking tasks, in batch 'b1'."""
    rng = np.random.default_rng(seed)
    with store.write() as s:
        batch = tasks.get_or_create_batch(s, "b1", guidelines="be fair", guideline_version="v1")
        for i in range(n_pairs + 2):
            prompt = tasks.get_or_create_prompt(s, text=f"question {i}")
            k = 2 if i < n_pairs else 3
            scores = rng.normal(size=k)
            responses = [tasks.get_or_create_response(
                s, prompt, f"answer {j} q={scores[j]:.3f}" + " more" * int(rng.integers(0, 20)))
                for j in range(k)]
            gold_ranking = None
            if k == 2 and i % 3 == 0:
                order = np.argsort(-scores)
                gold_ranking = [[responses[int(order[0])].id], [responses[int(order[1])].id]]
            tasks.create_task(s, prompt, responses, kind="pairwise" if k == 2 else "ranking",
                              overlap=overlap, batch=batch, gold_ranking=gold_ranking)


POOL = {"annotators": [
    {"name": "honest", "count": 2, "group": "crowd", "temperature": 0.5},
    {"name": "clicker", "group": "bots", "spam": "constant"},
]}


def test_simulate_then_quality(store: Store) -> None:
    _fill(store)
    summary = simulate(store, parse_pool(POOL), gold, batch="b1", seed=3)
    assert summary.judgments == {"honest-1": 20, "honest-2": 20, "clicker": 20}
    with store.read() as s:
        anns = {a.name: a for a in s.scalars(select(S.Annotator))}
        assert {a.kind for a in anns.values()} == {"simulated"}
        assert anns["clicker"].groups == ["bots"] and anns["honest-1"].groups == ["crowd"]
        judgments = list(s.scalars(select(S.Judgment)))
        assert {j.source for j in judgments} == {"simulated"}
        assert {j.guideline_version for j in judgments} == {"v1"}
        assert all(j.time_ms > 0 and j.shown_order for j in judgments)
        assert s.scalar(select(func.count()).where(S.ComparisonTask.done.is_(False))) == 0
        for j in judgments:  # the constant clicker always ranks in the order shown
            if j.annotator_id == anns["clicker"].id:
                assert [g[0] for g in j.ranking] == j.shown_order
    # Nothing left: a second run judges nothing and makes no duplicates.
    assert simulate(store, parse_pool(POOL), gold, batch="b1", seed=3).total == 0

    report = quality_report(store, batch="b1")
    assert report.judgments == 3 * 20
    assert report.fleiss_kappa is not None and report.krippendorff_alpha is not None
    clicker = report.annotators["clicker"]
    assert clicker.bias.position_rate == 1.0 and "position_bias" in clicker.flags
    assert all(not report.annotators[f"honest-{i}"].flags for i in (1, 2))
    assert report.annotators["honest-1"].gold_accuracy > 0.6
    assert report.groups["pairs"]["bots vs crowd"]["units"] == 18 + 2 * 3
    weights = annotator_weights(store, batch="b1")
    assert set(weights) == set(report.annotators)
    assert weights["clicker"] < min(weights[f"honest-{i}"] for i in (1, 2))
    for name, q in report.annotators.items():  # weight = 2p - 1, clipped at 0
        assert weights[name] == pytest.approx(max(0.0, 2 * q.reliability - 1))
    assert flagged_annotators(store) == {"clicker"}
    with store.read() as s:  # an open session works as well as a store
        assert flagged_annotators(s, flags=["gold_fail"]) == set()
    # What reward-model training gets from the store, as plain data.
    groups = {"clicker": ["bots"], "honest-1": ["crowd"], "honest-2": ["crowd"]}
    assert annotators_from_db(store.url, weights=True, flagged=True) == (
        annotator_weights(store), {"clicker"}, groups)
    assert annotators_from_db(store.url, weights=False, flagged=False) == (None, set(), groups)


def test_simulation_is_deterministic_and_respects_the_limit(tmp_path: Path) -> None:
    outcomes = []
    for run in range(2):
        st = Store(f"sqlite:///{tmp_path / f'{run}.db'}")
        _fill(st, n_pairs=6, overlap=2)
        assert simulate(st, parse_pool(POOL), gold, seed=5, max_judgments=10).total == 10
        with st.read() as s:
            outcomes.append([(j.task_id, j.annotator_id, j.ranking, j.shown_order, j.time_ms)
                             for j in s.scalars(select(S.Judgment).order_by(S.Judgment.id))])
        st.dispose()
    assert outcomes[0] == outcomes[1]


# -- CLI -------------------------------------------------------------------------------------


@pytest.fixture
def cli_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(UNIT_TESTS))  # makes "_gold:quality_gold" importable
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    st = Store(url)
    _fill(st, n_pairs=8, overlap=2)
    st.dispose()
    return url


@pytest.fixture
def tiny_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.syspath_prepend(str(UNIT_TESTS))
    url = f"sqlite:///{tmp_path / 'tiny.db'}"
    st = Store(url)
    _fill(st, n_pairs=1, overlap=1)
    st.dispose()
    return url


def test_cli_simulate_and_quality_json(cli_db: str, tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(yaml.safe_dump(POOL))
    runner = CliRunner()
    res = runner.invoke(app, ["simulate", "--db", cli_db, "--pool", str(pool), "--gold",
                              "_gold:quality_gold", "--batch", "b1", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "total\t20" in res.output  # 10 tasks x overlap 2
    res = runner.invoke(app, ["quality", "--db", cli_db, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert set(doc) == {"krippendorff_alpha", "fleiss_kappa", "judgments", "annotators", "groups",
                        "label_ceiling", "label_ceiling_upper", "label_ceiling_judgments",
                        "label_ceiling_pairs"}
    assert doc["judgments"] == 20
    assert doc["label_ceiling_judgments"] > 0  # overlap 2: every strict judgment has another
    assert set(doc["annotators"]) == {"honest-1", "honest-2", "clicker"}
    for entry in doc["annotators"].values():
        assert set(entry) == {"judgments", "agreement", "peer_group", "peer_agreement",
                              "length_peer_group", "reliability", "gold_accuracy",
                              "position_bias_p", "length_bias_p", "flags"}
        assert set(entry["flags"]) <= set(FLAGS)
    assert {"bots", "crowd"} <= set(doc["groups"]["by_group"])
    assert doc["groups"]["by_group"]["bots"]["annotators"] == 1
    assert "agreement" in doc["groups"]["agreement_matrix"]["bots"]["crowd"]
    res = runner.invoke(app, ["quality", "--db", cli_db, "--batch", "b1"])
    assert res.exit_code == 0, res.output
    assert "agreement within (alpha)" in res.output
    assert "Krippendorff" in res.output and "honest-1" in res.output


@pytest.mark.parametrize("pool_text, gold_spec, message", [
    ("annotators: [name: x\n", "_gold:quality_gold", "not valid YAML"),
    ("annotators:\n  - name: a\n    temperature: -2\n", "_gold:quality_gold", "temperature"),
    ("annotators:\n  - name: a\n", "nonexistent_mod_q:fn", "cannot import module"),
    ("annotators:\n  - name: a\n", "no-colon", "package.module:function"),
    ("annotators:\n  - name: a\n", "_gold:wrong_length", "returned 1 scores for 2"),
])
def test_cli_user_errors_exit_2(tiny_db: str, tmp_path: Path, pool_text: str, gold_spec: str,
                                message: str) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text(pool_text)
    res = CliRunner().invoke(app, ["simulate", "--db", tiny_db, "--pool", str(pool),
                                   "--gold", gold_spec])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_cli_unknown_batch_exit_2(tiny_db: str) -> None:
    res = CliRunner().invoke(app, ["quality", "--db", tiny_db, "--batch", "nope"])
    assert res.exit_code == 2 and "no batch named 'nope'" in res.output
