"""The SFT loop: completion-only masking against hand-computed NLL, packing isolation, every
parameter trained (only adapters with LoRA), gradient-accumulation invariance, eval figures and
the CLI's user errors. Resume == uninterrupted is in tests/invariants/test_sft_rm_invariants.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.data.records import SFTRecord
from rewardloop.synthetic import corpus_texts, preference_rows, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.tokenize import encode_sft
from rewardloop.train.data import rank_micro_batches
from rewardloop.train.runtime import Runtime, RuntimeOptions
from rewardloop.train.sft import (
    Row,
    SFTConfig,
    collate_rows,
    load_model,
    load_tokenizer_for,
    make_rows,
    micro_loss,
    pack,
    read_sft,
    step_targets,
    target_mask,
    token_nll,
    train_sft,
)
from rewardloop.train.step import accumulate


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=1,
                      num_heads=2, max_position=128)


@pytest.fixture(scope="module")
def tok_model(tiny_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(tiny_dir),
            AutoModelForCausalLM.from_pretrained(tiny_dir).eval())


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny_dir: Path, tmp: Path, data: Path, **kw) -> SFTConfig:
    base = {"lr": 1e-2, "max_length": 64, "batch_size": 4, "device": "cpu", "seed": 0}
    base.update(kw)
    return SFTConfig(model=str(tiny_dir), data=data, out=tmp / "run", **base)


def test_completion_only_masking_matches_hand_computed_nll(tok_model) -> None:
    tokenizer, model = tok_model
    e = encode_sft(tokenizer, SFTRecord(prompt="Where is my parcel?", completion="It ships today."),
                   max_length=64)
    mask = target_mask(e, train_on_prompt=False)
    assert mask == [0] * e.prompt_len + [1] * (len(e) - e.prompt_len)
    everything = target_mask(e, train_on_prompt=True)
    assert everything == [0] + [1] * (len(e) - 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0].double(),
                                 -1)
    for train_on_prompt, m in ((False, mask), (True, everything)):
        want = -sum(float(logp[t - 1, e.input_ids[t]]) for t in range(1, len(e)) if m[t])
        batch = collate_rows([Row((0,), len(e))], [e], tokenizer.pad_token_id, train_on_prompt,
                             packed=False)
        with torch.no_grad():
            got = float(token_nll(model, batch, global_tokens=1.0))  # summed, not averaged
        assert got == pytest.approx(want, rel=1e-5)


def test_packed_examples_see_only_themselves(tok_model) -> None:
    tokenizer, model = tok_model
    records = [SFTRecord(prompt="Hi, my refund is late.", completion="Sorry, it is on its way."),
               SFTRecord(text="the parcel tracking has not changed for days"),
               SFTRecord(prompt="Cancel my plan.", completion="Done, no more payments.")]
    examples = [encode_sft(tokenizer, r, max_length=64) for r in records]
    packed = collate_rows([Row((0, 1, 2), sum(map(len, examples)))], examples,
                          tokenizer.pad_token_id, False, packed=True)
    assert "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers skips packed-mask detection
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                       use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(logits[start:start + len(e)], alone, atol=1e-5, rtol=1e-5)
            start += len(e)
    # no target crosses an example boundary: each example's first token is never predicted
    starts = [0, len(examples[0]), len(examples[0]) + len(examples[1])]
    assert all(packed["targets"][0, s] == 0 for s in starts)


def test_pack_places_every_example_once_within_max_length() -> None:
    lengths = [5, 9, 3, 7, 2, 8, 1, 10]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    # first-fit decreasing by hand: 10 | 9+1 | 8+2 | 7+3 | 5 (the optimum, 45 tokens in 5 rows)
    assert rows == [[7], [1, 6], [5, 4], [3, 2], [0]]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_every_parameter_changes_and_eval_figures_are_written(tiny_dir: Path,
                                                              tmp_path: Path) -> None:
    data = _write(tmp_path / "train.jsonl", sft_rows(12, seed=1))
    held = _write(tmp_path / "eval.jsonl", sft_rows(6, seed=2))
    summary = train_sft(_cfg(tiny_dir, tmp_path, data, eval_data=held, max_steps=3))
    before, after = load_file(str(tiny_dir / "model.safetensors")), _weights(tmp_path / "run")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == []
    assert summary["steps"] == 3 and summary["samples_per_s"] > 0
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][:3] == [1, 2, 3]


def test_eval_every_logs_each_step_once(tiny_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "train.jsonl", sft_rows(12, seed=1))
    held = _write(tmp_path / "eval.jsonl", sft_rows(6, seed=2))
    train_sft(_cfg(tiny_dir, tmp_path, data, eval_data=held, max_steps=2, eval_every=1))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]  # the last step not twice


def test_answers_cut_at_max_length_are_counted(tiny_dir: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    from rewardloop.train.sft import read_sft

    rows = [{"prompt": "Say", "completion": "hi"}, {"prompt": "Tell", "completion": "a " * 80}]
    data = _write(tmp_path / "train.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    with caplog.at_level("WARNING"):
        read_sft(data, tokenizer, _cfg(tiny_dir, tmp_path, data, max_length=32))
    assert "1 of 2 answers were cut at max_length=32 (no EOS)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_sft(data, tokenizer, _cfg(tiny_dir, tmp_path, data, max_length=512))
    assert "were cut" not in caplog.text


def test_lora_changes_only_the_adapters(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _write(tmp_path / "train.jsonl", sft_rows(8, seed=1))
    train_sft(_cfg(tiny_dir, tmp_path, data, max_steps=2, lora_r=4))
    adapter = load_file(str(tmp_path / "run" / "model" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "model")
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(tensor, reference[key]), name


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_gives_the_one_batch_gradient(tiny_dir: Path, tmp_path: Path,
                                                         packing: bool) -> None:
    """Batch 8 in one pass == 8 micro-batches of 1, gradient by gradient (Adam's first step
    is scale-free, so comparing updated weights would miss a wrong normaliser)."""
    data = _write(tmp_path / "train.jsonl", sft_rows(24 if packing else 8, seed=3))
    cfg = _cfg(tiny_dir, tmp_path, data, batch_size=8, packing=packing, max_length=48)
    tokenizer = load_tokenizer_for(cfg)
    rt = Runtime(RuntimeOptions())
    model = load_model(cfg, tokenizer, rt)
    examples = read_sft(data, tokenizer, cfg)
    rows = make_rows(examples, cfg)
    batch = list(range(min(8, len(rows))))
    n_targets = step_targets(batch, rows, examples, cfg.train_on_prompt)
    grads, losses = {}, {}
    for accum in (1, len(batch)):
        micro = rank_micro_batches(batch, [r.length for r in rows], accum, 0, 1)
        assert len(micro) == accum
        losses[accum], _ = accumulate(rt, model, micro, micro_loss(
            model, rows, examples, cfg, tokenizer.pad_token_id, rt.device, n_targets))
        grads[accum] = _grads(model)
    assert losses[1] == pytest.approx(losses[len(batch)], rel=1e-6)
    assert grads[1].keys() == grads[len(batch)].keys() and grads[1]
    for key, value in grads[1].items():
        torch.testing.assert_close(grads[len(batch)][key], value, atol=1e-6, rtol=1e-5)


def test_cli_refuses_wrong_data_kind_missing_file_and_pad_equal_to_eos(tiny_dir: Path,
                                                                      tmp_path: Path) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", preference_rows(2))
    base = ["train", "sft", "--model", str(tiny_dir), "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, [*base, "--data", str(pairs)])
    assert res.exit_code == 2 and "looks like trl rows" in res.output
    assert not (tmp_path / "run").exists()  # nothing written for a refused run
    res = CliRunner().invoke(app, [*base, "--data", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
    model = tmp_path / "pad_is_eos"
    shutil.copytree(tiny_dir, model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(model)
    data = _write(tmp_path / "sft.jsonl", sft_rows(2))
    res = CliRunner().invoke(app, ["train", "sft", "--model", str(model), "--data", str(data),
                                   "--out", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "--add-pad-token" in res.output


def test_cli_trains_and_help_explains_every_flag(tiny_dir: Path, tmp_path: Path) -> None:
    data = _write(tmp_path / "sft.jsonl", sft_rows(4))
    res = CliRunner().invoke(app, ["train", "sft", "--model", str(tiny_dir), "--data", str(data),
                                   "--out", str(tmp_path / "run"), "--max-steps", "1",
                                   "--max-length", "48", "--device", "cpu", "--packing"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["packed_rows"] >= 1
    res = CliRunner().invoke(app, ["train", "sft", "--help"])
    assert res.exit_code == 0
    for flag in ("--train-on-prompt", "--packing", "--lora-r", "--lora-alpha", "--merge-lora",
                 "--eval-data", "--save-every", "--resume", "--grad-accum", "--max-length"):
        assert flag in res.output
