"""ODIN's length head: the pure terms against hand-computed values, and on a simulated pool
with a strong length bias the debiased reward model halves (at least) the reward/length
correlation without losing accuracy against the gold judge."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from rewardloop.tiny import build_tiny
from rewardloop.train.length_debias import (
    drop_length_head,
    odin_correlation_loss,
    orthogonality_loss,
    pearson,
)
from rewardloop.train.reward import RewardConfig, train_rm, warn_small_debias_batches


def test_pearson_and_the_correlation_term_by_hand() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(pearson(x, 2 * x + 1)) == pytest.approx(1.0)
    assert float(pearson(x, -x)) == pytest.approx(-1.0)
    assert float(pearson(x, torch.ones(4))) == 0.0
    # y = (1, -1, -1, 1) is uncorrelated with x: |ρ(r_Q, len)| = 0; ρ(r_L, len) = 1.
    quality = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    assert float(odin_correlation_loss(quality, x, x)) == pytest.approx(-1.0)
    # Two quality heads, one fully length-correlated: mean |ρ| = 0.5, r_L anti-correlated.
    both = torch.stack([x, torch.tensor([1.0, -1.0, -1.0, 1.0])], dim=1)
    assert float(odin_correlation_loss(both, -x, x)) == pytest.approx(0.5 + 1.0)


def test_orthogonality_and_dropping_the_length_head() -> None:
    head = nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
        head.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    # length row (1, 0): cosines with (1, 0) and (1, 1)/√2 -> mean(1, 1/√2)
    assert float(orthogonality_loss(head)) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    kept = drop_length_head(head)
    assert kept.out_features == 2
    assert torch.equal(kept.weight, head.weight[:2]) and torch.equal(kept.bias, head.bias[:2])


GOOD, BAD = ["thanks", "sorry", "glad", "happy"], ["whatever", "no", "later", "nope"]


def _answer(rng: random.Random) -> tuple[str, int, int]:
    """Three words, each good or bad (quality = good ones), then 0-8 filler words: length
    says nothing about quality."""
    words = [rng.choice(GOOD) if rng.random() < 0.5 else rng.choice(BAD) for _ in range(3)]
    pad = rng.randint(0, 8)
    return " ".join(words + ["ok"] * pad), sum(w in GOOD for w in words), pad


def _pairs(n: int, seed: int, length_bias: float | None) -> list[dict]:
    """Simulated people who like quality AND length (Bradley–Terry on 1.5 Δquality +
    length_bias Δfiller); None: the gold judge, quality only, ties skipped."""
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        (a, qa, pa), (b, qb, pb) = _answer(rng), _answer(rng)
        if length_bias is None:
            if qa == qb:
                continue
            win = qa > qb
        else:
            z = 1.5 * (qa - qb) + length_bias * (pa - pb)
            win = rng.random() < 1 / (1 + math.exp(-z))
        rows.append({"prompt": "reply:", "chosen": a if win else b, "rejected": b if win else a})
    return rows


@pytest.mark.slow
def test_length_debias_halves_the_length_correlation_at_the_same_gold_accuracy(
        tmp_path: Path) -> None:
    rng = random.Random(0)
    tiny = build_tiny(tmp_path / "tiny", [_answer(rng)[0] for _ in range(300)] + ["reply:"],
                      vocab_size=300, hidden_size=16, num_layers=1, num_heads=2,
                      max_position=64)
    for name, rows in (("train", _pairs(400, 1, 0.6)), ("gold", _pairs(200, 2, None))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for debias in (False, True):
        runs[debias] = train_rm(RewardConfig(
            model=str(tiny), data=tmp_path / "train.jsonl", eval_data=tmp_path / "gold.jsonl",
            out=tmp_path / f"run-{debias}", device="cpu", max_length=32, batch_size=16,
            lr=3e-3, max_steps=80, schedule="cosine", warmup_steps=5, length_debias=debias))
    plain, odin = runs[False], runs[True]
    assert plain["length_correlation"] > 0.5  # the labels' length bias was learned
    assert abs(odin["length_correlation"]) <= 0.5 * plain["length_correlation"]
    assert odin["eval_accuracy"] >= plain["eval_accuracy"] - 0.02
    # Before the length head is dropped the model still tracks length ("before/after").
    assert odin["length_correlation_with_length_head"] > 0.5
    saved = load_file(str(tmp_path / "run-True" / "model" / "model.safetensors"))
    assert saved["score.weight"].shape == (1, 16)
    config = json.loads((tmp_path / "run-True" / "model" / "config.json").read_text())
    assert len(config["id2label"]) == 1


def test_small_micro_batches_under_length_debias_are_warned_about(caplog) -> None:
    def cfg(**kw):
        return RewardConfig(model="m", data=Path("d.jsonl"), out=Path("o"), length_debias=True,
                            **kw)

    with caplog.at_level("WARNING"):
        assert warn_small_debias_batches(cfg(batch_size=16, grad_accum=4), world_size=1)
    assert "4 comparisons" in caplog.text and "--grad-accum" in caplog.text
    assert not warn_small_debias_batches(cfg(batch_size=16), world_size=2)  # 8 a micro-batch
    assert warn_small_debias_batches(cfg(batch_size=16), world_size=4)
    plain = RewardConfig(model="m", data=Path("d.jsonl"), out=Path("o"), batch_size=2)
    assert not warn_small_debias_batches(plain, world_size=1)
