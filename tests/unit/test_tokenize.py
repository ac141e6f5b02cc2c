"""Tokenisation, masks and batching shared by every trainer."""

from __future__ import annotations

import random

import pytest
import torch

from rewardloop import tokenize as T
from rewardloop.data.records import SFTRecord


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from rewardloop.tiny import build_tiny

    d = build_tiny(tmp_path_factory.mktemp("tiny") / "m", hidden_size=16, num_layers=1,
                   num_heads=2, vocab_size=400)
    return AutoTokenizer.from_pretrained(d)


def test_prompt_completion_boundary_and_eos(tok) -> None:
    e = T.encode(tok, "Hello there", "Thanks", max_length=64)
    p = tok("Hello there")["input_ids"]
    c = tok("Thanks", add_special_tokens=False)["input_ids"]
    assert e.input_ids == p + c + [tok.eos_token_id]
    assert e.completion_mask == [0] * len(p) + [1] * (len(c) + 1)
    assert e.prompt_len == len(p) and e.has_eos


def test_completion_cut_at_max_length_has_no_eos(tok) -> None:
    full = T.encode(tok, "Hi", "a long answer that goes on and on", max_length=256)
    cut = T.encode(tok, "Hi", "a long answer that goes on and on", max_length=full.prompt_len + 3)
    assert len(cut) == full.prompt_len + 3 and not cut.has_eos
    assert tok.eos_token_id not in cut.input_ids[cut.prompt_len:]


def test_prompt_cut_from_the_left(tok) -> None:
    e = T.encode(tok, "one two three four five six seven", "ok", max_length=64,
                 max_prompt_length=3)
    full = tok("one two three four five six seven")["input_ids"]
    assert e.input_ids[:3] == full[-3:] and e.prompt_len == 3


def test_a_long_prompt_gives_way_to_the_answer(tok) -> None:
    prompt = " ".join(["word"] * 200)  # far longer than max_length
    chosen, rejected = "Please send me the order number.", "Please stop writing to us."
    a = T.encode(tok, prompt, chosen, max_length=32)
    b = T.encode(tok, prompt, rejected, max_length=32)
    for e, text in ((a, chosen), (b, rejected)):  # a short answer keeps all of itself and EOS
        assert len(e) == 32 and e.has_eos
        answer = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e.input_ids[e.prompt_len:] == answer
    assert a.input_ids != b.input_ids
    # A long answer keeps half of max_length; the prompt the other half.
    long = T.encode(tok, prompt, " ".join(["answer"] * 100), max_length=32)
    assert long.prompt_len == 16 and sum(long.completion_mask) == 16 and not long.has_eos
    # A stated --max-prompt-length still rules: the answer gets what it leaves.
    fixed = T.encode(tok, prompt, chosen, max_length=32, max_prompt_length=30)
    assert fixed.prompt_len == 30 and sum(fixed.completion_mask) == 2
    assert T.prompt_limit(None, 32, None) == 32 and T.prompt_limit(0, 32, None) == 31


def test_empty_completion_is_just_eos(tok) -> None:
    e = T.encode(tok, "Hi", "", max_length=16)
    assert e.completion_mask[-1] == 1 and sum(e.completion_mask) == 1 and e.has_eos


def test_chat_prompt_uses_template(tok) -> None:
    chat = [{"role": "user", "content": "hi"}]
    e = T.encode(tok, chat, [{"role": "assistant", "content": "yo"}], max_length=64)
    rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert e.input_ids[: e.prompt_len] == tok(rendered, add_special_tokens=False)["input_ids"]


def test_sft_messages_train_on_last_turn(tok) -> None:
    rec = SFTRecord(messages=[{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}])
    e = T.encode_sft(tok, rec, max_length=64)
    answer = tok("hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [i for i, m in zip(e.input_ids, e.completion_mask, strict=True) if m] == answer


def test_pad_and_collate_pairs() -> None:
    assert T.pad([[1, 2], [3]], 0, "left").tolist() == [[1, 2], [0, 3]]
    a = T.Encoded([5, 6, 7], [0, 1, 1], 1, True)
    b = T.Encoded([5, 8], [0, 1], 1, False)
    batch = T.collate_pairs([a], [b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert batch["has_eos"].tolist() == [True, False]
    with pytest.raises(ValueError):
        T.collate_pairs([a], [], 0)


def test_length_grouped_batches_cover_every_index_once() -> None:
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    batches = T.length_grouped_batches(lengths, 8, random.Random(0), mega_batch_mult=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103))
    # inside a batch lengths are close: sorted mega-batches waste little padding
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    naive = T.length_grouped_batches(lengths, 8, random.Random(0), mega_batch_mult=0)
    naive_waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                      for b in naive)
    assert waste < naive_waste


def test_sequence_logps_sums_only_completion_tokens() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            class Out:
                logits = torch.zeros(input_ids.shape[0], logits_to_keep or input_ids.shape[1], 4)
            return Out()

    batch = T.collate([T.Encoded([1, 2, 3], [0, 1, 1], 1, True),
                       T.Encoded([1, 2], [0, 1], 1, True)], pad_id=0)
    lp = T.sequence_logps(Uniform(), batch)
    # uniform over 4 tokens: each completion token has log-prob log(1/4)
    assert torch.allclose(lp, torch.tensor([2, 1]) * torch.log(torch.tensor(0.25)))
    avg = T.sequence_logps(Uniform(), batch, average=True)
    assert torch.allclose(avg, torch.log(torch.tensor([0.25, 0.25])))


def test_completion_logps_equal_a_full_forward(tok, tmp_path) -> None:
    """Projecting only completion positions to the vocabulary changes no log-prob."""
    from transformers import AutoModelForCausalLM

    from rewardloop.ops import token_log_probs
    from rewardloop.tiny import build_tiny

    model = AutoModelForCausalLM.from_pretrained(
        build_tiny(tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2, vocab_size=400))
    batch = T.collate([T.encode(tok, "a long prompt with many words in it", "ok", max_length=64),
                       T.encode(tok, "short", "a longer answer here", max_length=64)], pad_id=3)
    logps, mask = T.completion_token_logps(model, batch)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = token_log_probs(full[:, :-1], batch["input_ids"][:, 1:])
    assert torch.allclose(logps * mask, expected * mask, atol=1e-5)


def test_a_text_prompt_with_chat_answers_is_one_prompt_everywhere(tok, tmp_path) -> None:
    """UltraFeedback-binarized rows (text prompt, chat answers): DPO/RM training, RL generation
    from the same file as --prompts, and RM scoring of a generated answer all see the prompt
    through the chat template (audit finding 3)."""
    import json

    from rewardloop.data.formats import read_records
    from rewardloop.rollout import encode_prompts

    user = {"role": "user", "content": "Write a haiku"}
    row = {"prompt": "Write a haiku", "chosen": [user, {"role": "assistant", "content": "Leaves"}],
           "rejected": [user, {"role": "assistant", "content": "No"}]}
    path = tmp_path / "ufb.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (pair,) = read_records(path, "trl")[1]
    trained = T.encode(tok, pair.prompt, pair.chosen, max_length=128)
    templated = trained.input_ids[: trained.prompt_len]
    (prompt,) = [r.prompt for r in read_records(path, "prompts")[1]]
    assert encode_prompts(tok, [prompt], 128) == [templated]
    scored = T.encode(tok, prompt, "Leaves", max_length=128)  # a generated answer is text
    assert scored.input_ids == trained.input_ids


@pytest.fixture
def llama_tok(tok):
    """The tiny tokenizer made Llama-like: it adds BOS to every text it encodes."""
    import copy

    from tokenizers.processors import TemplateProcessing

    bos_tok = copy.deepcopy(tok)
    bos_tok._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.bos_token_id)])
    return bos_tok


def test_a_pre_templated_prompt_gets_one_bos(llama_tok) -> None:
    """Audit finding 10: text that already starts with BOS got a second one."""
    bos = llama_tok.bos_token_id
    rendered = llama_tok.apply_chat_template([{"role": "user", "content": "Write a haiku"}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(llama_tok.bos_token)
    e = T.encode(llama_tok, rendered, "Leaves", max_length=128)
    assert e.input_ids[0] == bos and e.input_ids[1] != bos
    assert T.encode(llama_tok, "plain", "x", max_length=16).input_ids[:2] == [
        bos, *llama_tok("plain", add_special_tokens=False)["input_ids"][:1]]


def test_a_prompt_cut_from_the_left_keeps_bos(llama_tok) -> None:
    bos = llama_tok.bos_token_id
    full = llama_tok("word " * 50)["input_ids"]
    e = T.encode(llama_tok, "word " * 50, "ok", max_length=64, max_prompt_length=8)
    assert e.prompt_len == 8 and e.input_ids[:8] == [bos, *full[-7:]]
