"""The chunked output head (``rewardloop.lm_head``): the same log-probs, entropies and gradients
as materialised logits, without keeping a (tokens x vocabulary) tensor for the backward pass."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rewardloop import lm_head, ops
from rewardloop.lm_head import FULL_LOGITS_ATTR, chunked_label_logps, label_logps, output_head
from rewardloop.options import RuntimeOptions
from rewardloop.rollout import completion_forward
from rewardloop.tokenize import completion_token_logps
from rewardloop.train.runtime import Runtime

VOCAB = 97


def _reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = hidden @ weight.T
    logps = ops.token_log_probs(logits, labels, temperature)
    with torch.no_grad():
        entropy = ops.entropy_from_logits(logits / temperature)
    return logps, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logps_entropy_and_gradients_equal_the_materialised_ones(temperature: float
                                                                         ) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (3, 5), generator=gen)
    upstream = torch.randn(3, 5, generator=gen, dtype=torch.float64)

    want, want_entropy = _reference(hidden, weight, labels, temperature)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden, weight])
    # 4 positions a chunk: 15 positions make 4 chunks, the last one short.
    got = chunked_label_logps(hidden, weight, labels, temperature, with_entropy=True, rows=4)
    got_grads = torch.autograd.grad((got.logps * upstream).sum(), [hidden, weight])

    assert got.logps.shape == (3, 5) and got.entropy is not None
    torch.testing.assert_close(got.logps, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.entropy, want_entropy, rtol=1e-10, atol=1e-10)
    assert not got.entropy.requires_grad
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_a_batch_of_one_chunk_goes_through_autograd_with_the_same_numbers() -> None:
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (6,), generator=gen)
    results = []
    for rows in (6, 2):  # one chunk (autograd), three chunks (recomputed in backward)
        out = chunked_label_logps(hidden, weight, labels, 0.8, with_entropy=True, rows=rows)
        results.append((out.logps, out.entropy,
                        *torch.autograd.grad(out.logps.sum(), [hidden, weight])))
    for one, chunked in zip(*results, strict=True):
        torch.testing.assert_close(one, chunked, rtol=1e-12, atol=1e-12)


def test_chunked_gradients_pass_torch_gradcheck() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,), generator=gen)
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_label_logps(h, w, labels, 0.9, rows=3).logps, (hidden, weight))

    def both(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = chunked_label_logps(h, w, labels, 0.9, with_entropy=True, entropy_grad=True,
                                  rows=3)
        assert out.entropy is not None
        return out.logps, out.entropy

    assert torch.autograd.gradcheck(both, (hidden, weight))


def test_an_entropy_bonus_gets_the_materialised_entropy_gradient() -> None:
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 7), generator=gen)
    logits = (hidden @ weight.T) / 0.7
    want = (ops.token_log_probs(logits, labels).sum()
            + 0.3 * ops.entropy_from_logits(logits).sum())
    out = chunked_label_logps(hidden, weight, labels, 0.7, with_entropy=True, entropy_grad=True,
                              rows=4)
    assert out.entropy is not None
    got = out.logps.sum() + 0.3 * out.entropy.sum()
    for g, w in zip(torch.autograd.grad(got, [hidden, weight]),
                    torch.autograd.grad(want, [hidden, weight]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_under_bf16_autocast_the_projection_runs_in_bf16_like_a_linear_layer() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    weight = torch.randn(VOCAB, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ops.token_log_probs(nn.functional.linear(hidden, weight), labels)
        got = chunked_label_logps(hidden, weight, labels, rows=5).logps
    assert got.dtype == torch.float32
    # Same bf16 products, same float32 softmax: only summation order differs.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    want_grad = torch.autograd.grad(want.sum(), weight)[0]
    got_grad = torch.autograd.grad(got.sum(), weight)[0]
    assert got_grad.dtype == torch.float32  # the master weights' dtype
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=True, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def _batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(1, VOCAB, (3, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0  # a right-padded row
    completion = torch.zeros_like(input_ids)
    completion[:, 5:] = 1
    completion[0, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion}


def _saved_for_backward(fn: Any) -> tuple[Any, int]:
    """fn's result and the most elements of one vocabulary-wide tensor (last dimension VOCAB:
    logits, log-softmax) it saved for backward; 0 if none."""
    sizes = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[-1] == VOCAB:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, max(sizes)


def test_a_model_scored_chunked_equals_its_logits_and_keeps_no_vocabulary_wide_tensor(
        llama: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_head, "_CHUNK_ELEMENTS", 5 * VOCAB)  # 5 positions a chunk
    batch = _batch(torch.Generator().manual_seed(3))
    params = [p for p in llama.parameters() if p.requires_grad]

    (chunked, _), chunked_largest = _saved_for_backward(
        lambda: completion_token_logps(llama, batch, temperature=0.8))
    chunked_grads = torch.autograd.grad(chunked.sum(), params)
    setattr(llama, FULL_LOGITS_ATTR, True)
    try:
        (full, _), full_largest = _saved_for_backward(
            lambda: completion_token_logps(llama, batch, temperature=0.8))
    finally:
        delattr(llama, FULL_LOGITS_ATTR)
    full_grads = torch.autograd.grad(full.sum(), params)

    torch.testing.assert_close(chunked, full, rtol=1e-10, atol=1e-10)
    for got, want in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    kept_positions = 3 * (12 - 4)  # logits_to_keep from the position before the completion
    assert full_largest >= kept_positions * VOCAB
    assert chunked_largest == 0  # the hidden states and the (V, H) weight: no logits
    assert output_head(llama) is llama.lm_head  # and the head is its own again
    assert "forward" not in llama.lm_head.__dict__


def test_rollout_logps_entropy_and_an_entropy_bonus_gradient_match_the_logits(
        llama: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm_head, "_CHUNK_ELEMENTS", 5 * VOCAB)  # 5 positions a chunk
    gen = torch.Generator().manual_seed(4)
    completion_ids = torch.randint(1, VOCAB, (2, 6), generator=gen)
    input_ids = torch.cat([torch.randint(1, VOCAB, (2, 4), generator=gen), completion_ids], 1)
    rollout: Any = SimpleNamespace(input_ids=input_ids, completion_ids=completion_ids,
                                   attention_mask=torch.ones_like(input_ids))
    params = [p for p in llama.parameters() if p.requires_grad]
    monitor = completion_forward(llama, rollout, 0.9, with_entropy=True)
    assert monitor.entropy is not None and not monitor.entropy.requires_grad
    results = []
    for full in (False, True):
        setattr(llama, FULL_LOGITS_ATTR, full)
        bonus = completion_forward(llama, rollout, 0.9, with_entropy=True, entropy_grad=True)
        assert bonus.entropy is not None and bonus.entropy.requires_grad
        loss = bonus.logps.sum() + 0.1 * bonus.entropy.sum()
        results.append((bonus.logps, bonus.entropy, *torch.autograd.grad(loss, params)))
    delattr(llama, FULL_LOGITS_ATTR)
    torch.testing.assert_close(monitor.logps, results[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(monitor.entropy, results[0][1], rtol=1e-10, atol=1e-10)
    for chunked, full in zip(*results, strict=True):
        torch.testing.assert_close(chunked, full, rtol=1e-9, atol=1e-10)


class _SoftCapped(nn.Module):
    """A model whose forward changes the head's output, as Gemma 2's logit soft-capping does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=30.0 * torch.tanh(self.head(self.embed(input_ids)) / 30))


def test_a_model_that_changes_its_head_output_is_scored_from_its_logits(
        caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    model = _SoftCapped()
    ids = torch.randint(0, VOCAB, (2, 5))
    want = ops.token_log_probs(model(ids).logits, ids)
    with caplog.at_level(logging.WARNING, logger="rewardloop.lm_head"):
        got = label_logps(model, {"input_ids": ids}, ids).logps
    torch.testing.assert_close(got, want)
    assert "changes its output head's logits" in caplog.text
    assert output_head(model) is None  # not tried again
    assert "forward" not in model.head.__dict__


def test_no_chunked_lm_head_marks_the_prepared_model_to_materialise_its_logits(
        llama: LlamaForCausalLM) -> None:
    runtime = Runtime(RuntimeOptions(chunked_lm_head=False), device="cpu")
    prepared = runtime.prepare(llama, trainable=False)
    try:
        assert getattr(prepared, FULL_LOGITS_ATTR) is True
        batch = _batch(torch.Generator().manual_seed(6))
        _, largest = _saved_for_backward(lambda: completion_token_logps(prepared, batch))
        assert largest >= 3 * 8 * VOCAB
    finally:
        delattr(llama, FULL_LOGITS_ATTR)
    assert not hasattr(Runtime(RuntimeOptions(), device="cpu").prepare(llama, trainable=False),
                       FULL_LOGITS_ATTR)


def test_labels_that_do_not_match_the_kept_positions_are_refused(llama: LlamaForCausalLM
                                                                 ) -> None:
    ids = torch.randint(1, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="logits_to_keep must match"):
        label_logps(llama, {"input_ids": ids, "logits_to_keep": 3}, ids)
    assert "forward" not in llama.lm_head.__dict__


def test_a_head_whose_forward_was_already_replaced_is_left_alone() -> None:
    """accelerate's device hooks replace a module's forward on the instance: not ours to swap."""
    model = _SoftCapped()
    assert output_head(model) is model.head
    model.head.forward = lambda x: nn.Linear.forward(model.head, x)  # type: ignore[method-assign,assignment]
    assert output_head(model) is None
