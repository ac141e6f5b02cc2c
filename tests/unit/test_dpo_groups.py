"""train dpo --group-balance: the weighted loss against a hand-computed per-pair sum, the group
coefficients, a minmax run that moves weight to the group the policy serves worse (with
per-group figures in the summary and q restored on resume), and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.feedback.simulate import judge_offline, opposed_groups_pool
from rewardloop.synthetic import candidate_rows, corpus_texts, style_components
from rewardloop.tiny import build_tiny
from rewardloop.train import dpo, dpo_objectives
from rewardloop.train.dpo import DPOConfig, step_coefficients, weighted_loss
from rewardloop.train.group_balance import GroupDRO
from rewardloop.train.split import split_by_prompt


def _pool_files(d: Path, corpus: int, n_train: int, n_eval: int) -> dict[str, Path]:
    """A tiny model, the groups file and train/eval pairs judged by the opposed-groups pool of
    tests/unit/test_group_balance.py (6 majority, 2 minority annotators)."""
    tiny = build_tiny(d / "model", corpus_texts(corpus), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=256)
    pool = opposed_groups_pool({"polite": 1.0, "brief": 2.0}, "brief")
    out = {"tiny": tiny, "groups": d / "groups.json"}
    out["groups"].write_text(json.dumps({a.name: [a.group] for a in pool}))
    for name, n, seed in (("train", n_train, 0), ("eval", n_eval, 1000)):
        rows = judge_offline(pool, candidate_rows(n, seed=seed), style_components, seed)
        out[name] = d / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _pool_files(tmp_path_factory.mktemp("dpo-groups"), 100, 96, 48)


def test_weighted_loss_is_the_coefficient_weighted_sum_of_pair_losses() -> None:
    torch.manual_seed(0)
    policy, ref = torch.randn(5, 2), torch.randn(5, 2)
    labels, z0 = torch.ones(5), torch.zeros(())
    cfg = DPOConfig(model="m", data=Path("d"), out=Path("o"), beta=0.5)
    objective = dpo_objectives.OBJECTIVES["dpo"]
    coefs = torch.tensor([0.5, 0.5, 2.0, 2.0, 0.0])
    per_pair = [float(objective.loss(policy[i:i + 1], ref[i:i + 1], labels[i:i + 1], z0, cfg,
                                     1.0)[0]) for i in range(5)]
    expected = sum(c * v for c, v in zip(coefs.tolist(), per_pair, strict=True)) / 8.0
    got = weighted_loss(objective, policy, ref, labels, z0, cfg, 8.0, coefs)
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_step_coefficients_weigh_group_means_by_q_and_pairs_by_weight() -> None:
    dro = GroupDRO(("a", "b"), 1.0)
    dro.q = torch.tensor([0.2, 0.8]).numpy()
    c = step_coefficients(dro, ["a", "a", "a", "b"], None)
    # loss = Σ c_i l_i / 4 = 0.2 mean(a) + 0.8 mean(b): c_a = 4 * 0.2 / 3, c_b = 4 * 0.8
    assert c is not None and c.tolist() == pytest.approx([0.8 / 3] * 3 + [3.2])
    # Reliability weights alone: Σ c_i l_i / 4 = Σ w_i l_i / Σ w_i.
    w = step_coefficients(None, None, [1.0, 0.5, 0.5, 0.0])
    assert w is not None and w.tolist() == pytest.approx([2.0, 1.0, 1.0, 0.0])
    # Both: group a's mean is weighted within a (0.2 (1 l1 + 0.5 l2 + 0.5 l3) / 2), b keeps 0.8.
    both = step_coefficients(dro, ["a", "a", "a", "b"], [1.0, 0.5, 0.5, 2.0])
    assert both is not None and both.tolist() == pytest.approx([0.4, 0.2, 0.2, 3.2])
    assert step_coefficients(None, ["a"], None) is None
    assert step_coefficients(None, None, [0.0, 0.0]).tolist() == [0.0, 0.0]  # type: ignore[union-attr]


def _train(files: dict[str, Path], out: Path, **kw) -> dict:
    cfg = {"max_length": 256, "batch_size": 8, "lr": 1e-3, "max_steps": 6, "device": "cpu",
           "beta": 0.5, "group_step_size": 5.0, **kw}
    return dpo.train_dpo(DPOConfig(model=str(files["tiny"]), data=files["train"],
                                   eval_data=files["eval"], out=out,
                                   annotator_groups=files["groups"], **cfg))


def test_minmax_moves_weight_and_reports_groups(files: dict[str, Path], tmp_path: Path) -> None:
    none = _train(files, tmp_path / "none")
    assert none["groups"]["by_group"]["minority"]["weight_share"] == pytest.approx(0.25,
                                                                                   abs=0.02)
    assert none["groups"]["by_group"]["majority"]["annotators"] == 6
    equal = _train(files, tmp_path / "equal", group_balance="equal")
    assert equal["groups"]["by_group"]["minority"]["weight_share"] == pytest.approx(0.5)
    whole = _train(files, tmp_path / "minmax", group_balance="minmax", save_every=3)
    shares = whole["groups"]["by_group"]
    assert shares["majority"]["weight_share"] + shares["minority"]["weight_share"] == \
        pytest.approx(1.0)
    assert shares["minority"]["weight_share"] != pytest.approx(0.5)  # q moved
    for g in ("majority", "minority"):
        assert 0.0 <= shares[g]["accuracy"] <= 1.0 and shares[g]["eval_pairs"] > 0
    metrics = [json.loads(line) for line in
               (tmp_path / "minmax" / "metrics.jsonl").read_text().splitlines()]
    assert {"group_loss/minority", "group_weight/majority"} <= set().union(*metrics)
    # resume restores q: 3 + 3 steps end where 6 uninterrupted steps end (a constant learning
    # rate, so the first part's shorter schedule does not differ)
    whole = _train(files, tmp_path / "whole", group_balance="minmax", schedule="constant")
    _train(files, tmp_path / "part", group_balance="minmax", max_steps=3, save_every=3,
           schedule="constant")
    resumed = _train(files, tmp_path / "part", group_balance="minmax", save_every=3,
                     resume=True, schedule="constant")
    shares = whole["groups"]["by_group"]
    assert resumed["groups"]["by_group"]["minority"]["weight_share"] == pytest.approx(
        shares["minority"]["weight_share"], abs=1e-6)


def test_eval_fraction_holds_out_pairs_of_every_group(files: dict[str, Path],
                                                      tmp_path: Path) -> None:
    """--eval-fraction without --eval-data: the minority judged only 3 prompts of ~75, which a
    plain split by prompt (seed 0) leaves all in training; DPO's split is stratified by group
    (``train.split``, as train rm's), so the minority's accuracy is measured on held-out pairs."""
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    minor = [r for r in rows if r["annotator"].startswith("minor")][:3]
    rows = [r for r in rows if r["annotator"].startswith("major")] + minor
    data = tmp_path / "few-minority.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, names = [r["prompt"] for r in rows], [r["annotator"] for r in rows]
    _, plain = split_by_prompt(prompts, names, {}, 0.1, 0)
    assert not {names[i] for i in plain} & {r["annotator"] for r in minor}  # the precondition
    summary = dpo.train_dpo(DPOConfig(
        model=str(files["tiny"]), data=data, eval_fraction=0.1, out=tmp_path / "run",
        annotator_groups=files["groups"], max_length=256, batch_size=8, max_steps=1,
        device="cpu"))
    by_group = summary["groups"]["by_group"]
    assert by_group["minority"]["eval_pairs"] >= 1
    assert by_group["minority"]["train_comparisons"] == 3 - by_group["minority"]["eval_pairs"]
    assert by_group["majority"]["eval_pairs"] >= 1


def test_refusals(files: dict[str, Path], tmp_path: Path) -> None:
    base = ["train", "dpo", "--model", str(files["tiny"]), "--data", str(files["train"]),
            "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, [*base, "--group-balance", "minmax"])
    assert res.exit_code == 2 and "--annotator-groups" in res.output and "--db" in res.output
    res = CliRunner().invoke(app, [*base, "--exclude-flagged"])
    assert res.exit_code == 2 and "needs --db" in res.output
    res = CliRunner().invoke(app, [*base, "--loss", "kto", "--weighting", "reliability",
                                   "--annotator-weights", str(files["groups"])])
    assert res.exit_code == 2 and "pairwise loss" in res.output
    lonely = tmp_path / "one.json"
    lonely.write_text(json.dumps({f"{side}-{i}": "everyone" for side in ("major", "minor")
                                  for i in range(1, 7)}))
    res = CliRunner().invoke(app, [*base, "--group-balance", "equal", "--annotator-groups",
                                   str(lonely)])
    assert res.exit_code == 2 and "2 or more annotator groups" in res.output
    res = CliRunner().invoke(app, ["train", "dpo", "--help"])
    assert "--group-balance" in res.output and "--annotator-groups" in res.output


@pytest.mark.slow
def test_dpo_minmax_raises_the_worst_groups_accuracy(tmp_path: Path) -> None:
    """The group-balance proof for DPO: the pool of tests/unit/test_group_balance.py (6 majority
    and 2 minority annotators with the opposite taste for length), 1000 training pairs."""
    paths = _pool_files(tmp_path, 200, 1000, 500)
    opts = {"batch_size": 16, "max_steps": 150, "beta": 0.1, "group_step_size": 1.0}
    none = _train(paths, tmp_path / "none", **opts)["groups"]
    minmax = _train(paths, tmp_path / "minmax", group_balance="minmax", **opts)["groups"]
    # measured: none 0.814 / 0.306 (majority / minority); minmax 0.582 / 0.621
    assert none["worst_group"] == "minority" and none["worst_group_accuracy"] < 0.45
    assert none["by_group"]["majority"]["accuracy"] > 0.7
    assert minmax["worst_group_accuracy"] >= none["worst_group_accuracy"] + 0.15


def _judged_store(d: Path) -> str:
    """A SQLite store whose 24 pairwise tasks (overlap 3) two honest 'crowd' annotators and one
    constant clicker of group 'bots' judged: the quality checks flag the clicker."""
    from rewardloop.data.store import Store
    from rewardloop.feedback import tasks
    from rewardloop.feedback.simulate import parse_pool, simulate

    url = f"sqlite:///{d / 'feedback.db'}"
    store = Store(url)
    try:
        with store.write() as s:
            batch = tasks.get_or_create_batch(s, "b1")
            for i in range(24):
                prompt = tasks.get_or_create_prompt(s, text=f"question {i}")
                answers = [tasks.get_or_create_response(
                    s, prompt, f"answer {j} q={(i * 7 + j * 5) % 11}") for j in range(2)]
                tasks.create_task(s, prompt, answers, kind="pairwise", overlap=3, batch=batch)
        pool = parse_pool({"annotators": [
            {"name": "honest", "count": 2, "group": "crowd", "temperature": 0.2},
            {"name": "clicker", "group": "bots", "spam": "constant"}]})
        simulate(store, pool, lambda prompts, completions, **_: [
            float(c.split("q=")[1]) for c in completions], seed=0)
    finally:
        store.dispose()
    return url


def test_db_gives_groups_flags_and_reliability(tmp_path: Path) -> None:
    """train dpo --db: the store's groups give the per-group figures; --exclude-flagged drops
    the flagged clicker's pairs, held-out ones included; --weighting reliability weighs them
    down (the clicker's reliability is about chance, so its weight about 0)."""
    url = _judged_store(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "export", "--format", "trl", "-o", str(pairs), "--db", url])
    assert res.exit_code == 0, res.output
    tiny = build_tiny(tmp_path / "model", corpus_texts(40), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=128)

    def run(name: str, *flags: str) -> dict:
        res = runner.invoke(app, ["train", "dpo", "--model", str(tiny), "--data", str(pairs),
                                  "--db", url, "--eval-fraction", "0.25", "--max-steps", "2",
                                  "--lr", "0.01", "--batch-size", "4", "--device", "cpu", "--out",
                                  str(tmp_path / name), *flags])
        assert res.exit_code == 0, res.output
        return json.loads((tmp_path / name / "summary.json").read_text())

    plain = run("plain")
    by_group = plain["groups"]["by_group"]
    assert set(by_group) == {"bots", "crowd"} and by_group["crowd"]["annotators"] == 2
    assert by_group["bots"]["eval_pairs"] >= 1 and "dropped_flagged" not in plain
    trusted = run("trusted", "--exclude-flagged")
    assert trusted["dropped_flagged"] == by_group["bots"]["train_comparisons"] > 0
    assert set(trusted["groups"]["by_group"]) == {"crowd"}  # held-out pairs too
    assert trusted["pairs"] == plain["pairs"] - trusted["dropped_flagged"]
    weighted = run("weighted", "--weighting", "reliability")
    assert weighted["pairs"] == plain["pairs"]
    assert weighted["groups"]["by_group"]["bots"]["weight_share"] < \
        0.5 * by_group["bots"]["weight_share"]

    def losses(name: str) -> list[float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line]

    # The same pairs in the same order: only the weights in the loss tell the runs apart (the
    # first step's loss is log 2 for every pair, the policy being its own reference).
    assert losses("weighted")[0] == pytest.approx(losses("plain")[0])
    assert losses("weighted")[1] != pytest.approx(losses("plain")[1], abs=1e-4)


def test_the_nll_term_weighs_each_pair_by_its_coefficient() -> None:
    """RPO's NLL (and ORPO's SFT part) under --weighting/--group-balance: a pair's tokens count
    c_i times, over the step's weighted token count (review s13 M2: it trained every pair at
    weight 1)."""
    from rewardloop.tokenize import Encoded
    from rewardloop.train.dpo import _nll

    def example(n: int) -> dpo_objectives.Example:
        enc = Encoded([0] * (n + 1), [0] + [1] * n, 1, True)
        return dpo_objectives.Example(enc, enc)

    pairs = [example(2), example(4)]
    sums = torch.tensor([-2.0, -8.0])  # 1 nat a token, then 2
    assert float(_nll(sums, pairs, False, 6.0)) == pytest.approx(10 / 6)
    only_first = _nll(sums, pairs, False, 1.0 * 2, torch.tensor([1.0, 0.0]))
    assert float(only_first) == pytest.approx(1.0)
    mixed = _nll(sums, pairs, False, 0.5 * 2 + 1.5 * 4, torch.tensor([0.5, 1.5]))
    assert float(mixed) == pytest.approx((0.5 * 2 + 1.5 * 8) / (0.5 * 2 + 1.5 * 4))
