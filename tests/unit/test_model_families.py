"""What real model families bring (audit s13, models): chat templates whose end of turn is not
the tokenizer's EOS (Qwen2.5 base: ChatML, <|im_end|>, EOS <|endoftext|>), templates that end a
turn with no special token, or append EOS after it (Phi-3), tokenizers that append EOS
themselves (Llama 2's add_eos_token), models shipped without a pad token, models that need
their own code or a newer transformers, and absolute positions (GPT-2) under left padding."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import GenerationConfig
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.engines.base import stop_token_ids
from rewardloop.models import add_stop_token
from rewardloop.tiny import EOS, build_tiny, build_tokenizer, generate_corpus
from rewardloop.tokenize import encode, end_of_turn_id, prompt_ids

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
        "{% else %}{{ eos_token }}{% endif %}")
PLAIN = ("{% for m in messages %}{{ m['role'] | upper + ': ' + m['content'] + '\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}")
CHAT = [{"role": "user", "content": "Where is my order?"}]
ANSWER = [{"role": "assistant", "content": "It ships today."}]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus(200, 0)


def _tokenizer(corpus: list[str], template: str, *specials: str):
    tok = build_tokenizer(corpus, 400)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


def _answer(tok, prompt=CHAT, answer=ANSWER):
    enc = encode(tok, prompt, answer, max_length=128)
    return tok.convert_ids_to_tokens(enc.input_ids[enc.prompt_len:]), enc.has_eos


def test_a_chatml_end_of_turn_stops_generation_though_the_config_lists_only_eos(
        corpus: list[str]) -> None:
    """Qwen2.5 base: answers are trained to end with <|im_end|>, which must stop sampling."""
    tok = _tokenizer(corpus, CHATML, "<|im_start|>", "<|im_end|>")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == end
    tokens, has_eos = _answer(tok)
    assert tokens[-1] == "<|im_end|>" and tokens.count("<|im_end|>") == 1 and has_eos
    config = GenerationConfig(eos_token_id=tok.eos_token_id)
    assert stop_token_ids(tok, config) == [tok.eos_token_id, end]
    # The saved model lists it too (train.runtime.save_model), so transformers stops there.
    model = torch.nn.Module()
    model.generation_config = config  # type: ignore[assignment]
    add_stop_token(model, end)
    add_stop_token(model, end)
    assert config.eos_token_id == [tok.eos_token_id, end]
    # The tiny template ends turns with the tokenizer's EOS: nothing new to stop on.
    tiny = build_tokenizer(corpus, 400)
    assert end_of_turn_id(tiny) == tiny.eos_token_id


def test_the_answer_ends_at_the_end_of_turn_not_at_what_the_template_adds_after(
        corpus: list[str]) -> None:
    """Phi-3's template appends EOS after the last <|end|>; generation never samples it."""
    tok = _tokenizer(corpus, PHI3, "<|end|>", "<|user|>", "<|assistant|>")
    tokens, has_eos = _answer(tok)
    assert tokens[-1] == "<|end|>" and EOS not in tokens and has_eos


def test_a_template_without_a_special_end_of_turn_gets_the_eos(
        corpus: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """A plain USER:/ASSISTANT: template (or ChatML on a vocabulary without <|im_end|>) could
    never stop generation: the answer ends with the tokenizer's EOS, and the user is told."""
    for template in (PLAIN, CHATML):
        tok = _tokenizer(corpus, template)
        assert end_of_turn_id(tok) is None
        with caplog.at_level(logging.WARNING, logger="rewardloop.tokenize"):
            tokens, has_eos = _answer(tok)
        assert tokens[-1] == EOS and tokens.count(EOS) == 1 and has_eos
    assert "no special token" in caplog.text


def test_a_tokenizer_that_appends_eos_puts_none_inside_the_prompt(corpus: list[str]) -> None:
    tok = build_tokenizer(corpus, 400)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    assert tok("Hi")["input_ids"][-1] == eos  # the Llama 2 add_eos_token behaviour
    ids = prompt_ids(tok, "Where is my order?")
    assert ids[0] == bos and eos not in ids
    enc = encode(tok, "Where is my order?", "It ships today.", max_length=64)
    assert enc.input_ids.count(eos) == 1 and enc.input_ids[-1] == eos




@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    return build_tiny(tmp_path_factory.mktemp("fam") / "tiny", corpus, vocab_size=300,
                      hidden_size=16, num_layers=1, num_heads=2, max_position=128)


def _variant(tiny: Path, out: Path, config: dict | None = None, pad: str | None = "keep"
             ) -> Path:
    shutil.copytree(tiny, out)
    if config:
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if pad != "keep":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        if pad is None:
            tok.pad_token = None
        else:
            tok.add_special_tokens({"pad_token": pad})  # the embeddings are not grown
        tok.save_pretrained(out)
    return out


def test_generate_and_eval_take_a_model_without_a_pad_token(tiny: Path, tmp_path: Path) -> None:
    """Llama 3, Mistral, GPT-2 ship no pad token: sampling only left-pads prompts with one, so
    generate and eval add it (eval's baseline is usually the original checkpoint). A pad token
    added to the tokenizer alone (beyond the embeddings) used to crash generate."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Where is it?")))
    for name, pad in (("nopad", None), ("newpad", "<|pad|>")):
        model = _variant(tiny, tmp_path / name, pad=pad)
        res = CliRunner().invoke(app, ["generate", "--policy", str(model), "--prompts",
                                       str(prompts), "-n", "2", "--max-new-tokens", "4",
                                       "--device", "cpu", "--out", str(tmp_path / f"{name}.jsonl")])
        assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["eval", "--policy", str(tiny), "--baseline",
                                   str(tmp_path / "nopad"), "--prompts", str(prompts),
                                   "--judge", "rewardloop.synthetic:gold_score",
                                   "--max-new-tokens", "4", "--device", "cpu", "--out",
                                   str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output


def _fake_vllm_serve(answer: list[int]):
    """A local server speaking vllm-serve's protocol that takes weights and answers every
    prompt with ``answer`` (its log-probs -1)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def _reply(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path == "/health":
                out: dict = {"model": "m", "vllm": "0.32.0", "logprobs_mode": "raw_logprobs"}
            elif self.path == "/weights":  # a server is sent the policy's weights at start
                out = {"loaded": 1}
            else:
                request = json.loads(body)
                rows = len(request["prompts"]) * request["n"]
                out = {"completion_ids": [answer] * rows, "logps": [[-1.0] * len(answer)] * rows}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_vllm_generation_takes_a_model_without_a_pad_token(tiny: Path, tmp_path: Path) -> None:
    """vLLM pads nothing and cannot load a grown vocabulary: a model shipped without a pad (or
    padding with EOS) is sampled as saved, its answers cut by their lengths, not by a pad id.
    generate, eval and vllm-serve used to refuse it, naming an --add-pad-token they lack."""
    from transformers import AutoTokenizer

    from rewardloop.engines.base import SamplingSettings, rollout_from_tokens
    from rewardloop.engines.options import vllm_sampling_fields
    from rewardloop.models import load_tokenizer

    nopad = _variant(tiny, tmp_path / "nopad", pad=None)
    saved = len(AutoTokenizer.from_pretrained(nopad))
    tok = load_tokenizer(nopad, padding_side="left", sampling_only=True)
    eos = tok.eos_token_id
    assert tok.pad_token_id is None and len(tok) == saved  # nothing added
    eos_pad = _variant(tiny, tmp_path / "eospad", pad=None)
    t = AutoTokenizer.from_pretrained(eos_pad)
    t.pad_token = t.eos_token
    t.save_pretrained(eos_pad)
    assert load_tokenizer(eos_pad, sampling_only=True).pad_token_id is None  # EOS stays a stop
    assert "logit_bias" not in vllm_sampling_fields(SamplingSettings(), 1, [], [eos])

    word = tok.convert_tokens_to_ids(tok.tokenize("order")[0])
    rollout = rollout_from_tokens([[7, 8], [9]], 2, [[word, eos], [word, word], [], [eos]],
                                  [[-1.0, -2.0], [-1.0, -1.0], [], [-0.5]], tok, [eos])
    assert rollout.completion_mask.tolist() == [[1, 1], [1, 1], [0, 0], [1, 0]]
    assert rollout.has_eos.tolist() == [True, False, False, True]
    assert rollout.prompt_mask.tolist() == [[1, 1], [1, 1], [0, 1], [0, 1]]
    assert rollout.sampler_logps.tolist() == [[-1, -2], [-1, -1], [0, 0], [-0.5, 0]]
    assert rollout.texts[0] == tok.decode([word]) and rollout.texts[2:] == ["", ""]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "Where is it?")))
    server = _fake_vllm_serve([word, word, eos])
    url = f"http://127.0.0.1:{server.server_port}"
    engine = ["--generator", "vllm", "--vllm-mode", "server", "--vllm-server", url]
    try:
        out = tmp_path / "candidates.jsonl"
        res = CliRunner().invoke(app, ["generate", "--policy", str(nopad), "--prompts",
                                       str(prompts), "-n", "2", "--max-new-tokens", "4",
                                       "--device", "cpu", "--out", str(out), *engine])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["responses"] for r in rows] == [[tok.decode([word, word])]] * 2  # kept once
        res = CliRunner().invoke(app, ["eval", "--policy", str(nopad), "--baseline",
                                       str(eos_pad), "--prompts", str(prompts),
                                       "--judge", "rewardloop.synthetic:gold_score",
                                       "--max-new-tokens", "4", "--device", "cpu", "--out",
                                       str(tmp_path / "eval"), *engine])
        assert res.exit_code == 0, res.output
    finally:
        server.shutdown()
        server.server_close()
    res = CliRunner().invoke(app, ["vllm-serve", "--model", str(nopad), "--port", "0"])
    assert res.exit_code == 2 and "pip install 'rewardloop[vllm]'" in res.output, res.output


def test_a_model_needing_its_own_code_or_a_newer_transformers_is_one_line(
        tiny: Path, tmp_path: Path) -> None:
    remote = _variant(tiny, tmp_path / "remote", {
        "model_type": "mycustom", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}})
    (remote / "configuration_my.py").write_text("raise SystemExit('REMOTE CODE RAN')\n")
    unknown = _variant(tiny, tmp_path / "unknown", {"model_type": "qwen9_moe",
                                                    "architectures": ["Qwen9MoeForCausalLM"]})
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": "Ok."}) + "\n")
    for model, words in ((remote, "--trust-remote-code"), (unknown, "upgrade transformers")):
        res = CliRunner().invoke(app, ["train", "sft", "--model", str(model), "--data",
                                       str(data), "--out", str(tmp_path / f"run-{model.name}"),
                                       "--max-steps", "1", "--device", "cpu"])
        assert res.exit_code == 2, res.output
        assert words in res.output and "Traceback" not in res.output
        assert "REMOTE CODE RAN" not in res.output


def test_left_padded_rewards_equal_right_padded_for_absolute_positions() -> None:
    """GPT-2 numbers positions itself: a left-padded row must be given positions over its real
    tokens (``score.rewards_of``), or its reward shifts."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rewardloop.score import rewards_of
    from rewardloop.tokenize import pad

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(
        vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=1,
        pad_token_id=0)).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12]]
    with torch.no_grad():
        alone = torch.cat([rewards_of(model, {"input_ids": torch.tensor([r]),
                                              "attention_mask": torch.ones(1, len(r))})
                           for r in rows])
        for side in ("right", "left"):
            batch = {"input_ids": pad(rows, 0, side),
                     "attention_mask": pad([[1] * len(r) for r in rows], 0, side)}
            assert torch.allclose(rewards_of(model, batch), alone, atol=1e-5), side


def test_a_chat_fine_tuned_model_saves_its_end_of_turn_as_a_stop_token(
        tiny: Path, tmp_path: Path) -> None:
    """train sft of a base model on ChatML conversations: the saved generation config lists
    <|im_end|>, so transformers' generate and the engines stop where the answers were taught
    to end (TRL's eos_token option does the same)."""
    from transformers import AutoTokenizer

    base = _variant(tiny, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(base)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [*CHAT, *ANSWER]}) + "\n")
    res = CliRunner().invoke(app, ["train", "sft", "--model", str(base), "--data", str(data),
                                   "--out", str(tmp_path / "run"), "--max-steps", "1",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "run" / "model" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_end_of_turn_of_named_templates_system_first_templates_and_added_tokens(
        corpus: list[str]) -> None:
    """Review s13 H1, M1, L3: a tokenizer saved with several named templates has a dict (the
    "default" one is used); a template that wants a system turn first refuses the one-turn
    probe (the second probe has one); a token added after the first question is found."""
    named = _tokenizer(corpus, CHATML, "<|im_start|>", "<|im_end|>")
    named.chat_template = {"default": CHATML, "tool_use": PLAIN}
    end = named.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(named) == end
    assert _answer(named)[0][-1] == "<|im_end|>"
    system_first = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system "
                    "first') }}{% endif %}" + CHATML)
    strict = _tokenizer(corpus, system_first, "<|im_start|>", "<|im_end|>")
    assert end_of_turn_id(strict) == strict.convert_tokens_to_ids("<|im_end|>")
    late = _tokenizer(corpus, CHATML)
    assert end_of_turn_id(late) is None
    late.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    assert end_of_turn_id(late) == late.convert_tokens_to_ids("<|im_end|>")


def test_a_lora_adapter_saves_the_end_of_turn_and_right_padding(tmp_path: Path) -> None:
    """Interop audit s15 M1/L1: peft saves no generation config, so plain transformers loading
    an adapter directory stopped only where the base stops (past the template's end of turn);
    and RL runs saved their left-padding generation tokenizer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _archs import build_arch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardloop.models import LoraSettings, load_policy, load_tokenizer, save_model

    base = build_arch(tmp_path / "base", "llama", eot=True)
    tok = load_tokenizer(base, padding_side="left")
    end = end_of_turn_id(tok)
    assert end is not None and end != tok.eos_token_id
    # A base that stops only at its EOS (Qwen2.5 base: <|endoftext|>, not <|im_end|>).
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
                     ).save_pretrained(base)
    assert AutoModelForCausalLM.from_pretrained(base).generation_config.eos_token_id \
        == tok.eos_token_id
    model = load_policy(base, lora=LoraSettings(r=4, alpha=8))
    add_stop_token(model, end)
    save_model(model, tok, tmp_path / "out")
    # transformers loads an adapter with its base's generation config; the adapter's own is
    # there to pass to generate (docs/models.md, LoRA).
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id \
        == [tok.eos_token_id, end]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    prompt = torch.tensor([tok(tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                                       tokenize=False),
                               add_special_tokens=False)["input_ids"]])
    torch.manual_seed(0)
    with torch.no_grad():
        loaded.lm_head.weight[end] += 100.0  # the end of turn is the greedy answer
        out = loaded.generate(prompt, max_new_tokens=4, do_sample=False,
                              generation_config=GenerationConfig.from_pretrained(tmp_path / "out"))
    assert out[0, prompt.shape[1]:].tolist() == [end]
    assert AutoTokenizer.from_pretrained(tmp_path / "out").padding_side == "right"
    assert tok.padding_side == "left"  # the trainer's own tokenizer is left as it was
