"""The architecture matrix: tiny random Llama, Qwen2, Qwen3, Mistral, Gemma 2/3, Phi-3, GPT-2,
GPT-NeoX and SmolLM-style (tied embeddings) models, built from configs with no downloads.

Each runs one step of sft, rm, dpo and grpo in-process, then reloads the saved model and
generates. Along the way: chat templates with an end-of-turn token and several EOS ids (the
instruct-style ones), tokenizers without a pad token (GPT-2, GPT-NeoX), sliding windows shorter
than the sequences (Qwen2, Mistral, Gemma 2/3), tied embeddings (SmolLM, GPT-2), and left
padding: a left-padded batch scores like each row alone, and the KV-cached decoding loop samples
what a full forward pass would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from _archs import ARCHS, build_arch

from rewardloop.models import load_policy, load_tokenizer, match_tokenizer
from rewardloop.rollout import HFGenerator, SamplingSettings, completion_forward, encode_prompts
from rewardloop.synthetic import preference_rows, prompt_rows, sft_rows
from rewardloop.train.dpo import DPOConfig, train_dpo
from rewardloop.train.grpo import GRPOConfig
from rewardloop.train.grpo import train as train_grpo
from rewardloop.train.reward import RewardConfig, train_rm
from rewardloop.train.sft import SFTConfig, train_sft

# How each architecture is set up: instruct-style (end-of-turn token + several EOS ids), plain
# chat template, or no chat template and no pad token (base models of the GPT-2 family).
CASES: dict[str, dict[str, bool]] = {
    "llama": {"eot": True}, "qwen2": {"eot": True}, "qwen3": {}, "mistral": {},
    "gemma2": {}, "gemma3": {"eot": True}, "phi3": {"eot": True},
    "gpt2": {"pad": False, "chat": False}, "gpt_neox": {"pad": False, "chat": False},
    "smollm": {"eot": True},
}
assert set(CASES) == set(ARCHS)
COMMON: dict[str, Any] = {"device": "cpu", "seed": 0, "max_length": 96, "batch_size": 2,
                          "max_steps": 1, "lr": 1e-2}


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(root: Path, chat: bool) -> dict[str, Path]:
    """sft, pairs and prompts files: conversations when the model has a chat template."""
    sft, pairs, prompts = sft_rows(4), preference_rows(4), prompt_rows(4)
    if chat:
        sft = [{"messages": [*_user(r["prompt"]), {"role": "assistant",
                                                   "content": r["completion"]}]} for r in sft]
        pairs = [{**r, "prompt": _user(r["prompt"])} for r in pairs]
        prompts = [{"prompt": _user(r["prompt"])} for r in prompts]
    return {"sft": _write(root / "sft.jsonl", sft), "pairs": _write(root / "pairs.jsonl", pairs),
            "prompts": _write(root / "prompts.jsonl", prompts)}


def _embeddings_tied(model: Any) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight \
        .data_ptr()


def _check_left_padding(model: Any, tokenizer: Any, prompts: list[Any]) -> None:
    """Scores of a left-padded batch equal each row's alone; cached decoding samples what a full
    forward pass gives the highest probability (temperature ~ 0)."""
    ids = encode_prompts(tokenizer, prompts[:2], 100)
    assert len(ids[0]) != len(ids[1])  # rows of different lengths: one is padded
    generator = HFGenerator(model, tokenizer)
    torch.manual_seed(0)
    rollout = generator.generate(ids, 1, SamplingSettings(max_new_tokens=8, temperature=1e-4))
    model.eval()
    with torch.no_grad():
        batch = completion_forward(model, rollout, 1.0).logps
        for row in range(2):
            alone = completion_forward(model, rollout.select([row]), 1.0).logps
            mask = rollout.completion_mask[row].bool()
            assert torch.allclose(batch[row][mask], alone[0][mask], atol=1e-4)
            # The sampled token is the arg-max of the full forward pass (up to float noise).
            full = rollout.select([row])
            logits = model(input_ids=full.input_ids, attention_mask=full.attention_mask,
                           position_ids=(full.attention_mask.cumsum(-1) - 1).clamp(min=0)
                           ).logits[0, full.prompt_ids.shape[1] - 1:-1]
            logits[:, tokenizer.pad_token_id] = -float("inf")
            picked = logits.gather(-1, full.completion_ids[0][:, None])[:, 0]
            assert torch.all(logits.max(-1).values[mask] - picked[mask] < 1e-3)


@pytest.mark.parametrize("arch", list(CASES))
def test_architecture_trains_saves_reloads_and_generates(arch: str, tmp_path: Path) -> None:
    case = CASES[arch]
    model_dir = build_arch(tmp_path / "base", arch, **case)
    data = _data(tmp_path, case.get("chat", True))
    add_pad = not case.get("pad", True)
    shared = {**COMMON, "add_pad_token": add_pad}

    sft = train_sft(SFTConfig(model=str(model_dir), data=data["sft"], out=tmp_path / "sft",
                              **shared))
    rm = train_rm(RewardConfig(model=str(model_dir), data=data["pairs"], out=tmp_path / "rm",
                               **shared))
    dpo = train_dpo(DPOConfig(model=str(model_dir), data=data["pairs"], out=tmp_path / "dpo",
                              **shared))
    grpo = train_grpo(GRPOConfig(
        policy=str(tmp_path / "sft" / "model"), prompts=data["prompts"], out=tmp_path / "grpo",
        rewards=(str(tmp_path / "rm"),), num_generations=2, batch_size=4, max_steps=1, lr=1e-2,
        max_new_tokens=6, max_prompt_length=64, device="cpu", sample_every=0))
    for summary in (sft, rm, dpo, grpo):
        assert summary["steps"] == 1
    assert all(abs(v) < float("inf") for v in (sft["tokens_per_s"], rm["tokens_per_s"]))

    # Reload what GRPO saved (a model trained by sft then grpo) and generate from it.
    tokenizer = load_tokenizer(tmp_path / "grpo" / "model", padding_side="left")
    policy = load_policy(tmp_path / "grpo" / "model", device="cpu", trainable=False)
    match_tokenizer(policy, tokenizer)
    assert len(tokenizer) == policy.get_input_embeddings().num_embeddings
    if policy.config.tie_word_embeddings:
        assert _embeddings_tied(policy)
    prompts = [r["prompt"] for r in prompt_rows(2, seed=3)]
    if case.get("chat", True):
        prompts = [_user(p) for p in prompts]
    _check_left_padding(policy, tokenizer, [prompts[0], prompts[1] + [
        {"role": "assistant", "content": "Sure."}, *_user("And the refund?")]]
        if case.get("chat", True) else [prompts[0], prompts[1] + " And the refund, please?"])
    assert (tmp_path / "grpo" / "model" / "README.md").is_file()
