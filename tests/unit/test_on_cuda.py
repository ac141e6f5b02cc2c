"""The training runtime on a CUDA GPU (skipped without one; CI has none, the GPU runs are in
docs/distributed.md): the default precision there is bf16 compute over fp32 master weights and
keeps updates bf16 weights would lose; fp16 trains through its gradient scaler; GRPO trains
with the compiled decode step, PPO with its generator under bf16 autocast; DPO's frozen
reference runs in bf16."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def length_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import corpus_texts, preference_rows, prompt_rows, sft_rows
    from rewardloop.tiny import build_tiny

    root = tmp_path_factory.mktemp("cuda")
    build_tiny(root / "tiny", corpus_texts(100), vocab_size=300, hidden_size=32, num_layers=2,
               seed=0)
    for name, rows in (("sft", sft_rows(8, seed=1)), ("prompts", prompt_rows(4)),
                       ("pairs", preference_rows(8, seed=2))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _sft(work: Path, out: Path, **options: Any) -> dict[str, Any]:
    from rewardloop.train.sft import SFTConfig, train_sft

    return train_sft(SFTConfig(model=str(work / "tiny"), data=work / "sft.jsonl", out=out,
                               batch_size=4, max_steps=3, max_length=64, device="cuda",
                               **options))


def test_the_gpu_default_is_bf16_over_fp32_master_weights(work: Path, tmp_path: Path) -> None:
    """--precision auto on a GPU: bf16 compute; lr 1e-7 still moves the fp32 weights."""
    base = _weights(work / "tiny")
    summary = _sft(work, tmp_path / "auto", lr=1e-7, schedule="constant")
    assert summary["precision"] == "bf16"
    trained = _weights(tmp_path / "auto" / "model")
    key = "model.layers.0.mlp.up_proj.weight"
    assert trained[key].dtype == torch.float32
    moved = (trained[key] - base[key]).abs()
    assert 0 < moved.max() < 1e-5 and (moved > 0).float().mean() > 0.5


def test_fp16_trains_through_its_gradient_scaler(work: Path, tmp_path: Path) -> None:
    base = _weights(work / "tiny")
    _sft(work, tmp_path / "fp16", precision="fp16", lr=1e-3)
    losses = [m["loss"] for m in _metrics(tmp_path / "fp16") if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    trained = _weights(tmp_path / "fp16" / "model")
    assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.parametrize(("kind", "decoding", "precision"),
                         [("grpo", "compiled", "fp32"), ("ppo", "dynamic", "auto")])
def test_online_rl_trains_on_the_gpu(work: Path, tmp_path: Path, kind: str, decoding: str,
                                     precision: str) -> None:
    """GRPO with the CUDA-graph decode step (fp32: transformers 5.17's static cache cannot
    hold bf16 autocast values, see test_static_decoding); PPO at the GPU default, bf16, whose
    generator decodes under autocast. Rewards are computed on the CPU and meet the log-probs
    on the GPU."""
    values: dict[str, Any] = {
        "policy": str(work / "tiny"), "prompts": work / "prompts.jsonl", "out": tmp_path / kind,
        "rewards": ("test_on_cuda:length_reward",), "num_generations": 2, "batch_size": 4,
        "max_steps": 3, "max_new_tokens": 8, "device": "cuda", "hf_decoding": decoding,
        "precision": precision, "lr": 1e-4}
    if kind == "ppo":
        from rewardloop.train.ppo import PPOConfig, train

        summary = train(PPOConfig(**values))
    else:
        from rewardloop.train.grpo import GRPOConfig, train

        summary = train(GRPOConfig(**values))
    assert summary["precision"] == ("fp32" if precision == "fp32" else "bf16")
    rows = [m for m in _metrics(tmp_path / kind) if "reward/mean" in m]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in rows)


def test_dpo_scores_its_reference_in_bf16(work: Path, tmp_path: Path) -> None:
    from rewardloop.train.dpo import DPOConfig, train_dpo

    summary = train_dpo(DPOConfig(model=str(work / "tiny"), data=work / "pairs.jsonl",
                                  out=tmp_path / "dpo", batch_size=4, max_steps=3,
                                  max_length=64, device="cuda", eval_fraction=0.0))
    assert summary["precision"] == "bf16"
    losses = [m["loss"] for m in _metrics(tmp_path / "dpo") if "loss" in m]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_the_chunked_head_matches_the_materialised_logits_under_bf16(work: Path) -> None:
    """On the GPU, under bf16 autocast over fp32 weights: the chunked output head gives the
    materialised logits' log-probs and gradients (bf16 products, float32 softmax)."""
    from rewardloop.lm_head import FULL_LOGITS_ATTR
    from rewardloop.models import load_policy
    from rewardloop.tokenize import completion_token_logps

    model = load_policy(str(work / "tiny"), dtype="float32").cuda()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (4, 40), generator=gen).cuda()
    completion = torch.zeros_like(ids)
    completion[:, 10:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "completion_mask": completion}
    results = []
    for full in (False, True):
        setattr(model, FULL_LOGITS_ATTR, full)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps, mask = completion_token_logps(model, batch)
        (logps * mask).sum().backward()
        results.append((logps.detach(), model.lm_head.weight.grad.clone()))
    (chunked, chunked_grad), (full_logps, full_grad) = results
    torch.testing.assert_close(chunked, full_logps, rtol=0, atol=1e-4)
    torch.testing.assert_close(chunked_grad, full_grad, rtol=2e-2, atol=2e-2)
