"""Invariants of the DPO/KTO loop on a tiny model (CPU): every loss trains every parameter,
gradient accumulation does not change the update, resume equals an uninterrupted run (across an
epoch boundary), cached reference log-probs equal on-the-fly ones, and LoRA's reference is the
base model with the adapter disabled (no second model loaded)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _crash import crash_after_checkpoint
from safetensors.torch import load_file

from rewardloop.synthetic import corpus_texts, preference_rows
from rewardloop.tiny import build_tiny
from rewardloop.train import dpo, dpo_objectives
from rewardloop.train.dpo import DPOConfig, train_dpo
from rewardloop.train.runtime import Runtime, RuntimeOptions

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo")
    model = build_tiny(root / "model", corpus_texts(100), vocab_size=300, hidden_size=16,
                       num_layers=1, num_heads=2, max_position=64)
    rows = preference_rows(8, seed=5)
    pairs, kto = root / "pairs.jsonl", root / "kto.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kto.write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}) + "\n"
        for r in rows[:4] for key in ("chosen", "rejected")))
    return {"model": model, "pairs": pairs, "kto": kto}


def _cfg(setup: dict[str, Path], out: Path, **kw) -> DPOConfig:
    loss = kw.get("loss", "dpo")
    base = {"model": str(setup["model"]), "out": out, "max_length": MAX_LENGTH,
            "data": setup["kto"] if loss == "kto" else setup["pairs"], "lr": 1e-2,
            "batch_size": 4, "max_steps": 1, "seed": 3, "dtype": "float32", "device": "cpu"}
    return DPOConfig(**{**base, **kw})


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss, extra", [
    ("dpo", {}), ("cdpo", {"label_smoothing": 0.1}), ("ipo", {"length_normalize": True}),
    ("robust", {"label_smoothing": 0.1}), ("kto", {}), ("dpo", {"nll_coef": 1.0}),
    ("simpo", {"beta": 2.0}), ("orpo", {}),
])
def test_every_trainable_parameter_changes(setup, tmp_path: Path, loss: str, extra: dict
                                           ) -> None:
    cfg = _cfg(setup, tmp_path / "run", loss=loss, **extra)
    train_dpo(cfg)
    before, after = _weights(setup["model"]), _weights(tmp_path / "run" / "model")
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{loss}: parameters that did not move: {unchanged}"
    first = _metrics(tmp_path / "run")[0]
    if dpo_objectives.OBJECTIVES[loss].reference:
        # Before the update the policy IS the reference: every implicit reward is exactly 0.
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    else:  # β x the mean log-prob per token: below 0, and logged as such
        assert first["rewards/chosen"] == pytest.approx(cfg.beta * first["logps/chosen"])
        assert first["rewards/chosen"] < 0
    assert first["loss"] > 0


@pytest.mark.parametrize("loss, extra", [("dpo", {"nll_coef": 0.5}), ("kto", {}),
                                         ("ipo", {"length_normalize": True}), ("orpo", {}),
                                         ("simpo", {"beta": 2.0})])
def test_gradient_accumulation_gives_the_same_gradient_and_step(setup, tmp_path: Path,
                                                                loss: str, extra: dict) -> None:
    full = _cfg(setup, tmp_path / "full", loss=loss, batch_size=8, lr=1e-4, **extra)
    micro = replace(full, out=tmp_path / "micro", grad_accum=8)
    # The accumulated gradient of 8 micro-batches of 1 == the gradient of one batch of 8.
    tokenizer = dpo.load_tokenizer(full.model)
    objective = dpo_objectives.OBJECTIVES[loss]
    examples = dpo.load_examples(full.data, full, objective, tokenizer)
    grads = []
    rt = Runtime(RuntimeOptions())
    for cfg in (full, micro):
        model = dpo.load_model(cfg, tokenizer, rt)
        ref = dpo_objectives.score_all(model, examples, tokenizer.pad_token_id,
                                       cfg.mean_logps, 8)
        result = dpo.train_step(rt, model, objective, examples, ref, cfg,
                                tokenizer.pad_token_id)
        grads.append((result.loss, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
    # And through the whole loop: the same parameters after one optimizer step.
    train_dpo(full)
    train_dpo(micro)
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "micro" / "model")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_resume_equals_uninterrupted_across_an_epoch_boundary(setup, tmp_path: Path,
                                                              monkeypatch) -> None:
    # 8 pairs, batch 4: 2 steps per epoch; the crash comes right after step 2, the boundary.
    straight = _cfg(setup, tmp_path / "straight", max_steps=5, save_every=1, lr=3e-3)
    train_dpo(straight)
    crashed = replace(straight, out=tmp_path / "resumed")
    crash_after_checkpoint(monkeypatch, dpo, 2, lambda: train_dpo(crashed))
    calls = []
    monkeypatch.setattr(dpo, "score_all", lambda *a, **k: calls.append(1) or None)
    train_dpo(replace(crashed, resume=True))
    assert not calls, "the resumed run must read the cached reference log-probs, not rescore"
    a, b = _weights(tmp_path / "straight" / "model"), _weights(tmp_path / "resumed" / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_load_and_score_no_reference(setup, tmp_path: Path, monkeypatch,
                                                           loss: str) -> None:
    def no_reference(*args, **kwargs):
        raise AssertionError(f"{loss} must not build a reference scorer")

    monkeypatch.setattr(dpo, "_reference_scorer", no_reference)
    cfg = _cfg(setup, tmp_path / "run", loss=loss, max_steps=2, eval_data=setup["pairs"])
    summary = train_dpo(cfg)
    assert summary["reference"] == "none"
    assert not (tmp_path / "run" / dpo.REF_CACHE).exists()
    assert 0.0 <= summary["eval_accuracy"] <= 1.0


def test_orpo_is_the_odds_ratio_term_plus_the_chosen_nll(setup, tmp_path: Path) -> None:
    cfg = _cfg(setup, tmp_path / "run", loss="orpo", beta=0.3)
    tokenizer = dpo.load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id
    examples = dpo.load_examples(cfg.data, cfg, dpo_objectives.OBJECTIVES["orpo"], tokenizer)
    model = dpo.load_model(cfg, tokenizer, Runtime(RuntimeOptions()))
    ref = torch.zeros(len(examples), 2)
    result = dpo.train_step(Runtime(RuntimeOptions()), model, dpo_objectives.OBJECTIVES["orpo"],
                            examples, ref, cfg, pad)
    with torch.no_grad():
        mean = dpo_objectives.score(model, examples, pad, average=True)  # (B, 2) mean log-probs
        total = dpo_objectives.score(model, examples, pad, average=False)[:, 0]  # summed, chosen
    tokens = sum(sum(e.first.completion_mask) for e in examples)
    odds = (mean[:, 0] - mean[:, 1]) - (torch.log1p(-mean[:, 0].exp())
                                         - torch.log1p(-mean[:, 1].exp()))
    expected = -0.3 * torch.nn.functional.logsigmoid(odds).mean() - total.sum() / tokens
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.metrics["nll"], -total.sum() / tokens, rtol=1e-5,
                               atol=1e-6)


def test_cached_reference_equals_on_the_fly(setup, tmp_path: Path) -> None:
    cached = _cfg(setup, tmp_path / "cached", max_steps=3, lr=3e-3, eval_data=setup["pairs"])
    fly = replace(cached, out=tmp_path / "fly", precompute_ref=False)
    s_cached, s_fly = train_dpo(cached), train_dpo(fly)
    assert not (tmp_path / "fly" / dpo.REF_CACHE).exists()
    for key in ("eval_loss", "eval_accuracy", "eval_rewards/margins"):
        assert s_cached[key] == pytest.approx(s_fly[key], abs=1e-5)
    for m_cached, m_fly in zip(_metrics(tmp_path / "cached"), _metrics(tmp_path / "fly"),
                               strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert m_cached[key] == pytest.approx(m_fly[key], abs=1e-5)
    # The cache holds exactly the reference model's scores of (chosen, rejected).
    tokenizer = dpo.load_tokenizer(cached.model)
    model = dpo.load_model(cached, tokenizer, Runtime(RuntimeOptions()))
    examples = dpo.load_examples(cached.data, cached, dpo_objectives.OBJECTIVES["dpo"], tokenizer)
    want = dpo_objectives.score_all(model, examples, tokenizer.pad_token_id, False, 3)
    saved = torch.load(tmp_path / "cached" / dpo.REF_CACHE, weights_only=True)
    torch.testing.assert_close(saved["train"], want, rtol=1e-5, atol=1e-5)


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(setup, tmp_path: Path,
                                                                     monkeypatch) -> None:
    loads = []
    real_load = dpo.load_policy
    monkeypatch.setattr(dpo, "load_policy", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    cached = _cfg(setup, tmp_path / "cached", lora_r=4, max_steps=2, lr=1e-2,
                  eval_data=setup["pairs"])
    s_cached = train_dpo(cached)
    s_fly = train_dpo(replace(cached, out=tmp_path / "fly", precompute_ref=False))
    assert len(loads) == 2, "one model per run: the reference is the policy, adapter disabled"
    assert s_cached["eval_loss"] == pytest.approx(s_fly["eval_loss"], abs=1e-5)
    assert (tmp_path / "cached" / "model" / "adapter_config.json").is_file()
    # The trained adapter moved the policy away from the base: the rewards are no longer 0,
    # while the cached reference equals the plain base model's scores.
    assert s_cached["eval_rewards/margins"] != 0.0
    tokenizer = dpo.load_tokenizer(cached.model)
    base = dpo.load_model(replace(cached, lora_r=None), tokenizer,
                          Runtime(RuntimeOptions()))
    examples = dpo.load_examples(cached.data, cached, dpo_objectives.OBJECTIVES["dpo"], tokenizer)
    want = dpo_objectives.score_all(base, examples, tokenizer.pad_token_id, False, 8)
    saved = torch.load(tmp_path / "cached" / dpo.REF_CACHE, weights_only=True)
    torch.testing.assert_close(saved["train"], want, rtol=1e-5, atol=1e-5)
