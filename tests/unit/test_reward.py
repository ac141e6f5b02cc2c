"""The reward-model loop: every parameter trained, weighted loss against a hand-computed mean,
gradient-accumulation invariance, Plackett–Luce rankings with per-annotator/group figures,
annotator policy, held-out accuracy above chance, CLI errors. Resume is in
tests/invariants/test_sft_rm_invariants.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.losses import preference_accuracy
from rewardloop.synthetic import corpus_texts, preference_rows, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.tokenize import Encoded
from rewardloop.train.comparisons import (
    OBJECTIVES,
    Comparison,
    annotator_info,
    apply_annotator_policy,
    read_comparisons,
    score_comparisons,
)
from rewardloop.train.data import rank_micro_batches
from rewardloop.train.reward import (
    RewardConfig,
    comparison_loss,
    group_figures,
    load_model,
    load_tokenizer_for,
    micro_loss,
    step_metrics,
    train_rm,
)
from rewardloop.train.reward_eval import pair_deltas, pair_figures
from rewardloop.train.runtime import Runtime, RuntimeOptions
from rewardloop.train.step import accumulate


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, corpus_texts(200), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=128)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny_dir: Path, out: Path, data: Path, **kw) -> RewardConfig:
    base = {"lr": 1e-2, "max_length": 64, "batch_size": 4, "device": "cpu"}
    base.update(kw)
    return RewardConfig(model=str(tiny_dir), data=data, out=out, **base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_every_parameter_changes(tiny_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "pairs.jsonl", preference_rows(12, seed=1))
    summary = train_rm(_cfg(tiny_dir, tmp_path / "run", data, max_steps=3))
    before, after = load_file(str(tiny_dir / "model.safetensors")), _weights(tmp_path / "run")
    trunk = {k: v for k, v in after.items() if not k.startswith("score")}
    assert set(trunk) == set(before) - {"lm_head.weight"}
    assert [k for k in trunk if torch.equal(before[k], trunk[k])] == []
    assert after["score.weight"].shape == (1, 16)
    stats = json.loads((tmp_path / "run" / "model" / "reward_stats.json").read_text())
    assert stats["source"] == "train" and stats["n"] == 24 and stats["ensemble"] == 1
    assert summary["steps"] == 3 and summary["objective"] == "bradley-terry"


def test_without_eval_data_the_stats_come_from_a_bounded_sample(tiny_dir: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Without held-out data reward_stats.json scored every training pair after training: a
    2-step run on 10k pairs spent 4 minutes there (audit s14, scale 1). Now a seeded sample."""
    from rewardloop.train import reward

    monkeypatch.setattr(reward, "STATS_SAMPLE", 5)
    data = _write(tmp_path / "pairs.jsonl", preference_rows(12, seed=1))
    summary = train_rm(_cfg(tiny_dir, tmp_path / "run", data, max_steps=1))
    stats = json.loads((tmp_path / "run" / "model" / "reward_stats.json").read_text())
    assert stats["source"] == "train" and stats["n"] == 10  # 5 pairs, 2 answers each
    assert summary["train_comparisons"] == 12
    picked = reward.stats_sample(list(range(12)), seed=0)
    assert picked == reward.stats_sample(list(range(12)), seed=0) and len(set(picked)) == 5
    assert reward.stats_sample(list(range(4)), seed=0) == [0, 1, 2, 3]


def _enc(n: int) -> Encoded:
    return Encoded(list(range(1, n + 1)), [0] + [1] * (n - 1), 1, True)


def test_weighted_loss_is_the_weighted_mean_of_pair_losses(tmp_path: Path) -> None:
    scores = torch.tensor([[[2.0], [0.5]], [[0.0], [1.0]], [[1.0], [1.0]]])  # (B=3, K=2, H=1)
    ranks = torch.tensor([[0, 1], [0, 1], [0, 0]])  # the third pair is a tie
    items = [Comparison((_enc(3), _enc(3)), (0, 1), weight=0.5),
             Comparison((_enc(3), _enc(3)), (0, 1), weight=1.0),
             Comparison((_enc(3), _enc(3)), (0, 0), weight=0.25)]
    cfg = RewardConfig(model="m", data=tmp_path / "d", out=tmp_path / "o")
    loss, _ = comparison_loss(OBJECTIVES["bradley-terry"], scores, ranks, items, cfg,
                              step_weight=1.75, step_count=3)
    per_pair = [-F.logsigmoid(torch.tensor(1.5)), -F.logsigmoid(torch.tensor(-1.0)),
                torch.log(torch.tensor(2.0))]  # a tie at Δ=0: -½logσ(0) - ½logσ(0) = log 2
    want = (0.5 * per_pair[0] + 1.0 * per_pair[1] + 0.25 * per_pair[2]) / 1.75
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_annotator_info_merges_files_with_what_the_caller_read_from_the_store(
        tmp_path: Path) -> None:
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"a0": ["north"], "a1": "south"}))
    stored = ({"a0": 0.5, "a1": 1.0}, {"a1"}, {"a0": ["north", "east"], "a2": ["west"]})
    cfg = _cfg(Path("m"), tmp_path / "run", tmp_path / "d.jsonl", db="sqlite:///unused.db",
               weighting="reliability", exclude_flagged=True, annotator_groups=groups)
    weights, flagged, by_name = annotator_info(cfg, stored)
    assert weights == {"a0": 0.5, "a1": 1.0} and flagged == {"a1"}
    assert by_name == {"a0": ["north", "east"], "a1": ["south"], "a2": ["west"]}
    # The trainer does not open the store: with --db set, the caller must have read it.
    with pytest.raises(ValueError, match="annotators_from_db"):
        annotator_info(cfg, None)
    plain = _cfg(Path("m"), tmp_path / "run", tmp_path / "d.jsonl", db="sqlite:///unused.db")
    assert annotator_info(plain, stored) == (None, set(), {"a0": ["north", "east"],
                                                           "a2": ["west"]})


def test_annotator_policy_drops_flagged_and_weighs_the_rest() -> None:
    items = [Comparison((_enc(2), _enc(2)), (0, 1), annotator=a) for a in ("a", "b", "c", None)]
    kept = apply_annotator_policy(items, {"a": 0.9, "c": 0.4}, {"b"})
    assert [(c.annotator, c.weight) for c in kept] == [("a", 0.9), ("c", 0.4), (None, 1.0)]


@pytest.mark.parametrize("extra", [{}, {"ensemble": 3, "center_rewards_coef": 0.1}])
def test_grad_accumulation_gives_the_one_batch_gradient(tiny_dir: Path, tmp_path: Path,
                                                         extra: dict) -> None:
    """Batch 8 in one pass == 8 micro-batches of 1, gradient by gradient, with annotator
    weights, margins, an ensemble and centering (Adam's first step is scale-free, so comparing
    updated weights would miss a wrong normaliser)."""
    rows = preference_rows(8, seed=4)
    for i, row in enumerate(rows):
        row["annotator"] = f"a{i % 3}"
    data = _write(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tiny_dir, tmp_path / "run", data, batch_size=8, use_margin=True, **extra)
    tokenizer = load_tokenizer_for(cfg)
    rt = Runtime(RuntimeOptions())
    model = load_model(cfg, tokenizer, rt)
    name, items = read_comparisons(data, tokenizer, cfg)
    items = apply_annotator_policy(items, {"a0": 0.9, "a1": 0.3}, set())
    grads, losses = {}, {}
    batch = list(range(8))
    for accum in (1, 8):
        micro = rank_micro_batches(batch, [c.n_tokens for c in items], accum, 0, 1)
        losses[accum], _ = accumulate(rt, model, micro, micro_loss(
            model, OBJECTIVES[name], items, batch, cfg, tokenizer.pad_token_id, rt.device))
        grads[accum] = {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}
        model.zero_grad(set_to_none=True)
    assert float(losses[1]) == pytest.approx(float(losses[8]), rel=1e-6)
    assert grads[1].keys() == grads[8].keys() and "score.weight" in grads[1]
    for key, value in grads[1].items():
        torch.testing.assert_close(grads[8][key], value, atol=1e-6, rtol=1e-5)


def test_the_step_accuracy_does_not_depend_on_the_micro_batches(tiny_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Accuracy is a share of the step's non-tie pairs however the step is split: a
    micro-batch of ties only holds no pairs (it once made the step's accuracy NaN), and
    micro-batches with different numbers of pairs weigh by their pairs."""
    rows = preference_rows(8, seed=4)
    for i in (0, 1, 2):  # with accumulation 4, micro-batches of 2 -> one holds only ties
        rows[i]["tie"] = True
    data = _write(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(tiny_dir, tmp_path / "run", data, batch_size=8)
    tokenizer = load_tokenizer_for(cfg)
    rt = Runtime(RuntimeOptions())
    model = load_model(cfg, tokenizer, rt)
    name, items = read_comparisons(data, tokenizer, cfg)
    batch = list(range(8))
    logged = {}
    for accum in (1, 2, 4, 8):
        micro = rank_micro_batches(batch, [c.n_tokens for c in items], accum, 0, 1)
        _, sums = accumulate(rt, model, micro, micro_loss(
            model, OBJECTIVES[name], items, batch, cfg, tokenizer.pad_token_id, rt.device))
        model.zero_grad(set_to_none=True)
        logged[accum] = step_metrics(sums, len(batch))
    with torch.no_grad():
        scores, ranks = score_comparisons(model, items, tokenizer.pad_token_id, rt.device)
    assert int((ranks[:, 0] == ranks[:, 1]).sum()) == 3
    mean = scores.mean(-1)
    expected = float(preference_accuracy(mean[:, 0], mean[:, 1], ranks[:, 0] == ranks[:, 1]))
    for accum, figures in logged.items():
        assert figures["accuracy"] == pytest.approx(expected, abs=1e-6), accum
        assert figures["margin"] == pytest.approx(logged[1]["margin"], abs=1e-5), accum
    only_ties = micro_loss(model, OBJECTIVES[name], items, batch, cfg, tokenizer.pad_token_id,
                           rt.device)([0, 1])[1]
    assert "accuracy" not in step_metrics(only_ties, 2)


def test_group_accuracy_counts_a_judgment_for_every_group_of_its_annotator() -> None:
    """x is in north and south: x's judgments speak for both groups, in the groups section as
    in accuracy_by_group (once only the first group, north, got them: south looked 0.0)."""
    def answer(*ids: int) -> Encoded:
        return Encoded([7, *ids], [0] + [1] * len(ids), 1, True)

    groups = {"x": ["north", "south"], "y": ["south"], "z": ["north"]}
    held = [Comparison((answer(1), answer(2)), (0, 1), annotator="x"),  # the model is right
            Comparison((answer(3), answer(4)), (0, 1), annotator="x"),  # right
            Comparison((answer(5), answer(6)), (0, 1), annotator="y"),  # wrong
            Comparison((answer(8), answer(9)), (0, 1), annotator="z")]  # wrong
    scores = [torch.tensor([[2.0], [1.0]])] * 2 + [torch.tensor([[0.0], [1.0]])] * 2
    deltas, who = pair_deltas(held, torch.stack([s.mean(-1) for s in scores]))
    flat = pair_figures(np.asarray(deltas), who, groups)["accuracy_by_group"]
    cfg = RewardConfig(model="m", data=Path("d.jsonl"), out=Path("o"))
    section = group_figures(cfg, held, ["north", "north", "south", "north"], groups, None, held,
                            scores)["by_group"]
    for g in ("north", "south"):
        assert section[g]["accuracy"] == pytest.approx(2 / 3) == flat[g]["accuracy"]
        assert section[g]["eval_pairs"] == 3 == flat[g]["pairs"]
    # balancing keeps one group per comparison: x's comparisons train as north's
    assert (section["north"]["train_comparisons"], section["south"]["train_comparisons"]) == (3, 1)


def test_rankings_train_with_plackett_luce_and_report_annotators(tiny_dir: Path,
                                                                 tmp_path: Path) -> None:
    prompts = sft_rows(6, seed=5)
    rows = [{"prompt": p["prompt"], "responses": [p["completion"], "No.", "Read the help page."],
             "ranking": [[0], [1, 2]] if i % 2 else [[0], [1], [2]], "annotator": f"a{i % 2}"}
            for i, p in enumerate(prompts)]
    data = _write(tmp_path / "rank.jsonl", rows)
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"a0": ["north"], "a1": "south"}))
    summary = train_rm(_cfg(tiny_dir, tmp_path / "run", data, eval_data=data, max_steps=2,
                            annotator_groups=groups))
    assert summary["objective"] == "plackett-luce"
    assert set(summary["accuracy_by_annotator"]) == {"a0", "a1"}
    assert set(summary["accuracy_by_group"]) == {"north", "south"}
    # a0 ranks 3 strict levels (3 ordered pairs), a1 ties two answers (2 ordered pairs)
    assert summary["accuracy_by_annotator"]["a0"]["pairs"] == 9
    assert summary["accuracy_by_annotator"]["a1"]["pairs"] == 6
    assert sum(b["count"] for b in summary["calibration_bins"]) == 2 * 15
    assert -1.0 <= summary["length_correlation"] <= 1.0


def test_held_out_accuracy_is_clearly_above_chance(tiny_dir: Path, tmp_path: Path) -> None:
    rows = preference_rows(260, seed=7, min_gap=1.0)
    train, held = _write(tmp_path / "t.jsonl", rows[:200]), _write(tmp_path / "e.jsonl", rows[200:])
    summary = train_rm(_cfg(tiny_dir, tmp_path / "run", train, eval_data=held, epochs=2,
                            batch_size=8, lr=3e-3))
    assert summary["eval_accuracy"] >= 0.7, summary["eval_accuracy"]
    stats = json.loads((tmp_path / "run" / "model" / "reward_stats.json").read_text())
    assert stats["source"] == "eval" and stats["n"] == 120


def test_cli_refuses_wrong_kinds_and_impossible_options(tiny_dir: Path, tmp_path: Path) -> None:
    sft = _write(tmp_path / "sft.jsonl", sft_rows(2))
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(2))
    base = ["train", "rm", "--model", str(tiny_dir), "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, [*base, "--data", str(sft)])
    assert res.exit_code == 2 and "looks like sft rows" in res.output
    assert not (tmp_path / "run").exists()
    res = CliRunner().invoke(app, [*base, "--data", str(pairs), "--weighting", "reliability"])
    assert res.exit_code == 2 and "--annotator-weights" in res.output
    res = CliRunner().invoke(app, [*base, "--data", str(pairs), "--exclude-flagged"])
    assert res.exit_code == 2 and "--db" in res.output
    res = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
    res = CliRunner().invoke(app, ["train", "rm", "--help"])
    for flag in ("--use-margin", "--label-smoothing", "--center-rewards-coef", "--ensemble",
                 "--weighting", "--exclude-flagged", "--annotator-weights", "--annotator-groups",
                 "--db", "--lora-r", "--resume"):
        assert flag in res.output


def _answer(*ids: int) -> Encoded:
    return Encoded([7, *ids], [0] + [1] * len(ids), 1, True)


def test_held_out_pairs_leave_out_what_the_label_ceiling_leaves_out() -> None:
    """r_better - r_worse of every strictly ordered pair, but not of a judged tie nor of a pair
    of one answer twice (no model can order it; the ceiling skips it too)."""
    a, b, c = _answer(1), _answer(2), _answer(3, 4)
    items = [Comparison((a, b, c), (0, 1, 2), annotator="x"),    # 0 > 1, 0 > 2, 1 > 2
             Comparison((a, b), (0, 0), annotator="y"),           # judged tie
             Comparison((a, _answer(1)), (0, 1), annotator="y"),  # the same answer twice
             Comparison((c, b), (1, 0))]                          # 1 > 0
    mean = torch.tensor([[2.0, 1.0, 1.0], [1.0, 3.0, 0.0], [4.0, 4.0, 0.0], [5.0, 5.0, 0.0]])
    assert pair_deltas(items, mean) == ([1.0, 1.0, 0.0, 0.0], ["x", "x", "x", None])


def test_held_out_accuracy_gives_a_tie_of_rewards_half_credit(tmp_path: Path) -> None:
    """Hand count: right, equal rewards, wrong, equal rewards: (1 + 0.5 + 0 + 0.5) / 4 = 0.5,
    as the label ceiling credits an even split of the other annotators (counting a tie of
    rewards wrong gave 0.25); the same rule per annotator, per group and in the groups
    section."""
    figures = pair_figures(np.array([1.0, 0.0, -1.0, 0.0]), ["x", "x", "x", None],
                           {"x": ["north"]})
    assert figures["eval_accuracy"] == pytest.approx(0.5)
    assert figures["accuracy_by_annotator"] == {"x": {"accuracy": pytest.approx(0.5),
                                                      "pairs": 3}}
    assert figures["accuracy_by_group"] == {"north": {"accuracy": pytest.approx(0.5),
                                                      "pairs": 3}}
    cfg = RewardConfig(model="m", data=tmp_path / "d", out=tmp_path / "o")
    held = [Comparison((_answer(1), _answer(2)), (0, 1), annotator="x"),
            Comparison((_answer(1), _answer(3)), (0, 1), annotator="x")]
    scores = [torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [1.0]])]  # tie, right
    section = group_figures(cfg, held, ["north", "north"], {"x": ["north"]}, None, held,
                            scores)
    assert section["by_group"]["north"]["accuracy"] == pytest.approx(0.75)


def test_answers_cut_at_max_length_are_counted_in_a_warning(tiny_dir: Path, tmp_path: Path,
                                                            caplog) -> None:
    data = _write(tmp_path / "pairs.jsonl", preference_rows(4, seed=4))
    roomy = _cfg(tiny_dir, tmp_path / "run", data, max_length=256)
    tokenizer = load_tokenizer_for(roomy)
    with caplog.at_level("WARNING"):
        read_comparisons(data, tokenizer, roomy)
    assert "were cut" not in caplog.text
    with caplog.at_level("WARNING"):
        _, items = read_comparisons(data, tokenizer, replace(roomy, max_length=8))
    cut = sum(not e.has_eos for c in items for e in c.responses)
    assert cut > 0 and f"{cut} of 8 answers were cut at max_length=8" in caplog.text
