"""Chat models: conversations through the chat template, answers ending with the template's
end-of-turn token, generation stopping on every EOS id of generation_config, and no template
refused unless --chat-template gives one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _archs import CHATML, EOT, build_arch
from typer.testing import CliRunner

from rewardloop import ops
from rewardloop import tokenize as T
from rewardloop.cli import app
from rewardloop.data.records import SFTRecord
from rewardloop.engines.base import stop_token_ids
from rewardloop.errors import UserError
from rewardloop.models import load_policy, load_tokenizer
from rewardloop.rollout import HFGenerator, SamplingSettings, encode_prompts

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, my order?"}]
ANSWER = "It ships today."


@pytest.fixture(scope="module")
def instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arch(tmp_path_factory.mktemp("chat") / "m", "llama", eot=True)


@pytest.fixture(scope="module")
def tok(instruct: Path):
    return load_tokenizer(instruct)


def test_answer_ends_with_the_end_of_turn_token_not_a_bare_eos(tok) -> None:
    e = T.encode(tok, CHAT, [{"role": "assistant", "content": ANSWER}], max_length=128)
    head = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert e.input_ids[:e.prompt_len] == tok(head, add_special_tokens=False)["input_ids"]
    answer = e.input_ids[e.prompt_len:]
    eot = tok.convert_tokens_to_ids(EOT)
    assert answer[-1] == eot and tok.eos_token_id not in answer
    assert tok.decode(answer) == ANSWER + EOT  # the template's newline after it is left out
    assert e.completion_mask == [0] * e.prompt_len + [1] * len(answer) and e.has_eos
    # A text answer to a chat prompt is the same assistant turn (scoring, eval judges).
    assert T.encode(tok, CHAT, ANSWER, max_length=128) == e
    # SFT messages: the last turn is the answer.
    turns = [*CHAT, {"role": "assistant", "content": ANSWER}]
    sft = T.encode_sft(tok, SFTRecord(messages=turns), max_length=128)
    assert sft == e
    cut = T.encode(tok, CHAT, ANSWER, max_length=e.prompt_len + 2,
                   max_prompt_length=e.prompt_len)
    assert not cut.has_eos and eot not in cut.input_ids[cut.prompt_len:]
    # Without --max-prompt-length the prompt gives way: the whole turn, end-of-turn included.
    kept = T.encode(tok, CHAT, ANSWER, max_length=e.prompt_len + 2)
    assert kept.has_eos and kept.input_ids[kept.prompt_len:] == answer


def test_a_template_refusing_a_conversation_is_a_user_error(tok) -> None:
    strict = tok.__class__.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match=r"refused .*'system', 'user'.*System role not supported"):
        T.encode(strict, CHAT, ANSWER, max_length=64)


def test_text_rows_still_end_with_eos(tok) -> None:
    e = T.encode(tok, "Hi, my order?", ANSWER, max_length=128)
    assert e.input_ids[-1] == tok.eos_token_id and e.has_eos


def test_rl_prompts_use_the_template(tok) -> None:
    (ids,) = encode_prompts(tok, [CHAT], 64)
    head = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ids == tok(head, add_special_tokens=False)["input_ids"]


def test_generation_stops_on_every_eos_id_of_generation_config(instruct: Path, tok) -> None:
    model = load_policy(instruct, device="cpu")
    eot = tok.convert_tokens_to_ids(EOT)
    assert stop_token_ids(tok, model.generation_config) == [tok.eos_token_id, eot]
    # Stop also on a third of the vocabulary, so most rows stop early on an id the tokenizer
    # does not call EOS; each row must end exactly at its first stop token.
    stops = [tok.eos_token_id, eot, *range(10, len(tok), 3)]
    model.generation_config.eos_token_id = [i for i in stops if i != tok.pad_token_id]
    generator = HFGenerator(model, tok)
    torch.manual_seed(0)
    rollout = generator.generate(encode_prompts(tok, [CHAT, "Hello"], 64), 8,
                                 SamplingSettings(max_new_tokens=12))
    stop_set = set(generator.eos_ids)
    for row, mask, ended in zip(rollout.completion_ids.tolist(), rollout.completion_mask.tolist(),
                                rollout.has_eos.tolist(), strict=True):
        kept = [t for t, m in zip(row, mask, strict=True) if m]
        assert all(t not in stop_set for t in kept[:-1])
        assert ended == (kept[-1] in stop_set)
    assert rollout.has_eos.sum() > 8  # most rows stopped early
    mask, _ = ops.completion_mask(rollout.completion_ids, generator.eos_ids, tok.pad_token_id)
    assert torch.equal(mask, rollout.completion_mask)


def test_stop_ids_leave_out_the_pad_token(instruct: Path, tok) -> None:
    model = load_policy(instruct, device="cpu")
    model.generation_config.eos_token_id = [tok.pad_token_id, tok.eos_token_id]
    # (and the template's end of turn stops answers too, though the config does not list it)
    assert stop_token_ids(tok, model.generation_config) == [tok.eos_token_id,
                                                            tok.convert_tokens_to_ids(EOT)]


def test_no_chat_template_is_exit_2_unless_chat_template_file(tmp_path: Path) -> None:
    model = build_arch(tmp_path / "plain", "llama", chat=False)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [*CHAT, {"role": "assistant", "content": f"{ANSWER} {i}"}]}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "sft", "--model", str(model), "--data", str(data), "--max-steps", "1",
            "--batch-size", "2", "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "no chat template" in res.output
    assert "--chat-template" in res.output and not (tmp_path / "a").exists()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for message in messages %}")
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "b"), "--chat-template",
                                   str(bad)])
    assert res.exit_code == 2 and "not a valid Jinja template" in res.output
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "c"), "--chat-template",
                                   str(template)])
    assert res.exit_code == 0, res.output
    # The trained model carries the template: generating from it needs no flag.
    assert load_tokenizer(tmp_path / "c" / "model").chat_template == CHATML
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(model, chat_template=tmp_path / "missing.jinja")


def test_generate_needs_a_chat_template_for_chat_prompts(tmp_path: Path) -> None:
    model = build_arch(tmp_path / "plain", "qwen2", chat=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": CHAT}) + "\n" for _ in range(2)))
    base = ["generate", "--policy", str(model), "--prompts", str(prompts), "-n", "2",
            "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "c.jsonl")]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2 and "no chat template" in res.output
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    res = CliRunner().invoke(app, [*base, "--chat-template", str(template)])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) == 2


def test_encode_many_tokenises_like_encode_in_batched_calls(tok, monkeypatch) -> None:
    """Text rows (shared prompts, a prompt that starts with BOS, no prompt, long ones cut),
    conversations and a text answer to one give encode's very ids; each chunk's text rows are
    tokenised in one call per kind (with and without special tokens) and a shared prompt once."""
    bos = tok.bos_token
    assert bos, "the test needs a tokenizer that adds BOS"
    long = " ".join(["words"] * 60)
    examples = [("Hello there", "Thanks"), ("Hello there", "No, thanks"),
                (f"{bos}Already templated", "ok"), (None, "just text"), ("", "empty prompt"),
                (long, long), (CHAT, [{"role": "assistant", "content": ANSWER}]),
                (CHAT, ANSWER), ("Hi", None), ("Hello there", "Thanks")]
    expect = [T.encode(tok, p, c, max_length=40, max_prompt_length=12) for p, c in examples]
    calls: list[tuple[object, bool]] = []
    real = type(tok).__call__

    def spy(self, text, *args, add_special_tokens=True, **kw):
        calls.append((text, add_special_tokens))
        return real(self, text, *args, add_special_tokens=add_special_tokens, **kw)

    monkeypatch.setattr(type(tok), "__call__", spy)
    monkeypatch.setattr(T, "ENCODE_CHUNK", 5)
    assert T.encode_many(tok, examples, max_length=40, max_prompt_length=12) == expect
    batched = [c for c in calls if isinstance(c[0], list)]
    assert len(batched) == 4  # two chunks x (plain texts, texts with special tokens)
    first = [t for texts, _ in batched[:2] for t in texts]
    assert first.count("Hello there") == 1 and "Thanks" in first and "Already templated" \
        not in " ".join(t for texts, sp in batched[:2] if sp for t in texts)
    # Every text row's texts came from the batches: single calls are the conversations' only,
    # each distinct rendering once (the two chat rows share their prompt's).
    head = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    singles = [text for text, _ in calls if isinstance(text, str)]
    assert sorted(singles) == sorted([head, f"{ANSWER}{EOT}"])
    # The memo ends with the call: encode outside it tokenises again.
    calls.clear()
    T.encode(tok, "Hello there", "Thanks", max_length=40)
    assert len(calls) == 2
