"""Tiny models and tokenizers: plain-transformers loading, special tokens, chat template, seeds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardloop.errors import DataError, UserError
from rewardloop.tiny import SPECIAL_TOKENS, build_tiny, generate_corpus, read_texts

SMALL = {"vocab_size": 300, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
         "max_position": 32}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "m", generate_corpus(300), **SMALL)


PLAIN_CHECK = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
chat = [{"role": "user", "content": "My router is broken."}]
text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
ids = tok(["my order has not arrived", "hi"], padding=True, return_tensors="pt")
logits = model(**ids).logits
tok.padding_side = "left"
gen = model.generate(**tok(["hello", "my phone"], padding=True, return_tensors="pt"),
                     max_new_tokens=3, do_sample=False)
print(json.dumps({
    "rewardloop_imported": any(m.startswith("rewardloop") for m in sys.modules),
    "ids": [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id],
    "config_ids": [model.config.pad_token_id, model.config.eos_token_id],
    "chat": text, "logits": list(logits.shape), "vocab": len(tok),
    "embeddings": model.get_input_embeddings().num_embeddings, "gen": list(gen.shape),
    "roundtrip": tok.decode(tok("Thanks, my refund arrived!").input_ids),
}))
"""


def test_loads_with_plain_transformers(tiny_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PLAIN_CHECK, str(tiny_dir)], check=True,
                          capture_output=True, text=True, timeout=120)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["rewardloop_imported"] is False
    pad, eos, bos, unk = got["ids"]
    assert len({pad, eos, bos, unk}) == 4, "special tokens must be distinct"
    assert got["config_ids"] == [pad, eos]
    assert got["chat"] == "<s><|user|>\nMy router is broken.</s>\n<|assistant|>\n"
    assert got["logits"] == [2, got["logits"][1], got["vocab"]] == [2, got["logits"][1],
                                                                   got["embeddings"]]
    assert got["gen"] == [2, got["gen"][1]] and got["gen"][1] > 1
    assert got["roundtrip"] == "Thanks, my refund arrived!"


def test_directory_holds_safetensors_only(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    tokens = json.loads((tiny_dir / "tokenizer.json").read_text())["added_tokens"]
    assert [t["content"] for t in tokens] == list(SPECIAL_TOKENS)


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    corpus = generate_corpus(200)
    a = build_tiny(tmp_path / "a", corpus, seed=1, **SMALL)
    b = build_tiny(tmp_path / "b", corpus, seed=1, **SMALL)
    c = build_tiny(tmp_path / "c", corpus, seed=2, **SMALL)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert generate_corpus(50, seed=4) == generate_corpus(50, seed=4) != generate_corpus(50)


def test_default_size_is_small(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = build_tiny(tmp_path / "d")
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    assert 50_000 < n_params < 3_000_000


def test_read_texts_jsonl_and_plain(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p1", "chosen": "c1", "rejected": "r1"}) + "\n\n"
                     + json.dumps({"messages": [{"role": "user", "content": "m1"}]}) + "\n"
                     + json.dumps({"prompt": "p2", "responses": ["a", "b"]}) + "\n")
    assert read_texts(jsonl) == ["p1", "c1", "r1", "m1", "p2", "a", "b"]
    plain = tmp_path / "t.txt"
    plain.write_text("first line\n\nsecond line\n")
    assert read_texts(plain) == ["first line", "second line"]


def test_read_texts_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:line 2"):
        read_texts(bad)
    bad.write_text('{"prompt": "ok"}\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"line 2.*no text field"):
        read_texts(bad)
    with pytest.raises(UserError, match="no such file"):
        read_texts(tmp_path / "missing.txt")


def test_cli_builds_and_refuses_to_clobber(tmp_path: Path) -> None:
    from rewardloop.cli import app

    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(generate_corpus(100)))
    out = tmp_path / "cli"
    args = ["tiny", "--out", str(out), "--texts", str(texts), "--vocab-size", "300",
            "--hidden", "16", "--layers", "1", "--heads", "2", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"wrote tiny model to {out}" in result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (16, 1)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output  # one line, no traceback
    assert "Traceback" not in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite"]).exit_code == 0
    odd = CliRunner().invoke(app, ["tiny", "--out", str(tmp_path / "x"), "--hidden", "30",
                                   "--heads", "4"])
    assert odd.exit_code == 2 and "head dimension" in odd.output


def test_cli_help_explains_every_flag() -> None:
    from rewardloop.cli import app

    result = CliRunner().invoke(app, ["tiny", "--help"])
    assert result.exit_code == 0
    for flag in ("--out", "--texts", "--vocab-size", "--hidden", "--layers", "--heads",
                 "--max-position", "--seed", "--overwrite", "--config"):
        assert flag in result.output, flag
