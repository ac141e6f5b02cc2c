"""Rollouts with HF generate: group layout, left-padded prompts, EOS/padding edge cases, and
log-probs that do not depend on how a batch is padded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardloop import ops
from rewardloop.rollout import (
    HFGenerator,
    Rollout,
    SamplingSettings,
    completion_forward,
    encode_prompts,
    sample_records,
    truncate_samples,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from rewardloop.models import load_policy, load_tokenizer
    from rewardloop.tiny import build_tiny, generate_corpus

    path = build_tiny(tmp_path_factory.mktemp("tiny") / "m", generate_corpus(300),
                      vocab_size=320, hidden_size=16, num_layers=1, num_heads=2, max_position=128)
    return load_policy(path, device="cpu"), load_tokenizer(path, padding_side="left")


def _eos_bias(model, eos_id: int, logit: float):
    """A forward hook making EOS's logit ``logit`` and every other 0: a controllable stop rate."""
    def hook(module, args, output):
        forced = torch.zeros_like(output)
        forced[..., eos_id] = logit
        return forced
    return model.lm_head.register_forward_hook(hook)


PROMPTS = ["Hi, my order is late.", "Refund please, it is broken and I am upset."]


def test_groups_are_contiguous_and_prompts_left_padded(tiny) -> None:
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    torch.manual_seed(0)
    model.train()
    rollout = HFGenerator(model, tokenizer).generate(ids, 3, SamplingSettings(max_new_tokens=5))
    assert len(rollout) == 6 and rollout.completion_ids.shape[1] <= 5
    for row in range(6):
        real = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist()
        assert real == ids[row // 3]  # rows 0-2 belong to prompt 0, rows 3-5 to prompt 1
        assert rollout.prompt_mask[row, -1] == 1  # left padding: the prompt ends at the edge
    mask, has_eos = ops.completion_mask(rollout.completion_ids, tokenizer.eos_token_id,
                                        tokenizer.pad_token_id)
    assert torch.equal(mask, rollout.completion_mask) and torch.equal(has_eos, rollout.has_eos)
    assert model.training  # sampled in eval mode, then its train mode restored
    model.eval()


def test_immediate_eos_gives_one_token_and_empty_text(tiny) -> None:
    model, tokenizer = tiny
    handle = _eos_bias(model, tokenizer.eos_token_id, 100.0)
    try:
        rollout = HFGenerator(model, tokenizer).generate(
            encode_prompts(tokenizer, PROMPTS, 64), 2, SamplingSettings(max_new_tokens=4))
    finally:
        handle.remove()
    assert rollout.completion_ids[:, 0].tolist() == [tokenizer.eos_token_id] * 4
    assert rollout.completion_mask.sum(dim=1).tolist() == [1] * 4  # the EOS itself is trained
    assert rollout.has_eos.all() and rollout.texts == [""] * 4


def test_never_ending_answers_are_flagged(tiny) -> None:
    model, tokenizer = tiny
    handle = _eos_bias(model, tokenizer.eos_token_id, -100.0)
    try:
        torch.manual_seed(0)
        rollout = HFGenerator(model, tokenizer).generate(
            encode_prompts(tokenizer, PROMPTS, 64), 2, SamplingSettings(max_new_tokens=6))
    finally:
        handle.remove()
    assert rollout.completion_ids.shape[1] == 6
    assert not rollout.has_eos.any()
    assert rollout.completion_mask.sum(dim=1).tolist() == [6] * 4


def test_mixed_stops_pad_after_eos(tiny) -> None:
    """Some rows stop early: everything after their EOS is pad and masked out."""
    model, tokenizer = tiny
    handle = _eos_bias(model, tokenizer.eos_token_id, 4.0)  # p(EOS) ~ 15% per token
    try:
        torch.manual_seed(1)
        rollout = HFGenerator(model, tokenizer).generate(
            encode_prompts(tokenizer, PROMPTS, 64), 8, SamplingSettings(max_new_tokens=8))
    finally:
        handle.remove()
    lengths = rollout.completion_mask.sum(dim=1)
    assert rollout.has_eos.any() and not rollout.has_eos.all()
    # The pad token is never sampled, so a completion's mask has no holes.
    assert (rollout.completion_mask.cummin(dim=1).values == rollout.completion_mask).all()
    for row in range(len(rollout)):
        n = int(lengths[row])
        if rollout.has_eos[row]:
            assert rollout.completion_ids[row, n - 1] == tokenizer.eos_token_id
            assert (rollout.completion_ids[row, n:] == tokenizer.pad_token_id).all()
        else:
            assert n == rollout.completion_ids.shape[1]


def test_log_probs_do_not_depend_on_padding(tiny) -> None:
    """A row's completion log-probs in a left/right-padded batch equal those of the row alone
    (positions count real tokens only, as generate numbers them)."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    torch.manual_seed(2)
    rollout = HFGenerator(model, tokenizer).generate(ids, 2, SamplingSettings(max_new_tokens=6))
    model.eval()
    with torch.no_grad():
        batched = completion_forward(model, rollout, temperature=0.7, with_entropy=True)
        for row in range(len(rollout)):
            alone = completion_forward(model, rollout.select([row]), temperature=0.7)
            n = int(rollout.completion_mask[row].sum())
            p_real = int(rollout.prompt_mask[row].sum())
            assert rollout.select([row]).prompt_ids.shape[1] == p_real  # padding trimmed
            assert torch.allclose(batched.logps[row, :n], alone.logps[0, :n], atol=1e-5)
    model.train()
    assert batched.entropy is not None and batched.entropy.shape == batched.logps.shape
    assert (batched.entropy >= 0).all()


def test_temperature_scales_log_probs(tiny) -> None:
    model, tokenizer = tiny
    rollout = HFGenerator(model, tokenizer).generate(
        encode_prompts(tokenizer, PROMPTS[:1], 64), 1, SamplingSettings(max_new_tokens=3))
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids).logits[:, -4:-1] / 0.5
        expected = torch.log_softmax(logits, -1).gather(
            -1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
        got = completion_forward(model, rollout, temperature=0.5).logps
    n = int(rollout.completion_mask.sum())
    assert torch.allclose(got[0, :n], expected[0, :n], atol=1e-5)


def test_sampling_settings_and_generator_refuse_bad_input(tiny) -> None:
    model, tokenizer = tiny
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"max_new_tokens": 0}, {"top_k": -1}):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
    with pytest.raises(ValueError, match="at least one token"):
        HFGenerator(model, tokenizer).generate([[]], 1, SamplingSettings())


def test_samples_file_truncates_on_resume(tmp_path: Path) -> None:
    rollout = Rollout(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                      torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long),
                      torch.tensor([True, False]), ["a", "b"])
    path = tmp_path / "samples.jsonl"
    from rewardloop.rollout import append_samples

    for step in (1, 2, 3):
        append_samples(path, sample_records(step, ["p", "q"], rollout, torch.tensor([1., 2.]), 1))
    truncate_samples(path, 2)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0] == {"step": 1, "prompt": "p", "completion": "a", "reward": 1.0,
                       "has_eos": True}


def test_nul_bytes_are_stripped_from_texts(tiny, monkeypatch) -> None:
    """A byte-level model can emit NUL; it would break JSONL readers and PostgreSQL text."""
    model, tokenizer = tiny
    ids = encode_prompts(tokenizer, PROMPTS[:1], 64)
    monkeypatch.setattr(tokenizer, "batch_decode",
                        lambda seqs, **kw: ["a\x00b" for _ in range(len(seqs))])
    rollout = HFGenerator(model, tokenizer).generate(ids, 2, SamplingSettings(max_new_tokens=3))
    assert rollout.texts == ["ab", "ab"]


def test_pad_is_never_sampled_even_when_likely(tiny) -> None:
    """Pad inside an answer would be read as padding: it must never be drawn."""
    model, tokenizer = tiny
    handle = _eos_bias(model, tokenizer.pad_token_id, 20.0)  # pad would win ~always
    try:
        ids = encode_prompts(tokenizer, PROMPTS, 64)
        torch.manual_seed(0)
        rollout = HFGenerator(model, tokenizer).generate(ids, 2, SamplingSettings(max_new_tokens=6))
    finally:
        handle.remove()
    real = rollout.completion_ids[rollout.completion_mask.bool()]
    assert tokenizer.pad_token_id not in real.tolist()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_decoding_loop_chooses_what_hf_generate_chooses(tiny, attention) -> None:
    """With a deterministic choice (top_k=1) the loop and ``model.generate`` (pad suppressed)
    produce the same tokens: same prefill, positions, padding mask, cache steps, stopping."""
    model, tokenizer = tiny
    model.set_attn_implementation(attention)
    ids = encode_prompts(tokenizer, PROMPTS, 64)
    settings = SamplingSettings(max_new_tokens=9, top_k=1)
    ours = HFGenerator(model, tokenizer).generate(ids, 2, settings)
    from rewardloop.tokenize import pad

    prompt_ids = pad(ids, tokenizer.pad_token_id, side="left")
    mask = pad([[1] * len(p) for p in ids], 0, side="left")
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt_ids, attention_mask=mask, do_sample=True, top_k=1,
            max_new_tokens=settings.max_new_tokens, num_return_sequences=2,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=[tokenizer.pad_token_id])
    model.set_attn_implementation("sdpa")
    assert torch.equal(ours.completion_ids, out[:, prompt_ids.shape[1]:])


def test_sample_tokens_draws_with_the_given_probabilities() -> None:
    from rewardloop.rollout import sample_tokens

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample_tokens(probs.expand(40_000, -1).contiguous())
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    # 4 standard errors of a proportion with n = 40000 is at most 0.01.
    assert torch.allclose(freq, probs, atol=0.01) and freq[4] == 0


def test_warp_logits_matches_hf_warpers() -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from rewardloop.rollout import warp_logits

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.6, 5, 1.0), (1.3, 0, 0.8),
                                      (0.9, 10, 0.5), (1.0, 1, 0.3)):
        expected = logits.clone()
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(None, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        got = warp_logits(logits.clone(), SamplingSettings(temperature=temperature, top_k=top_k,
                                                           top_p=top_p))
        assert torch.equal(torch.isinf(got), torch.isinf(expected))
        assert torch.allclose(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
