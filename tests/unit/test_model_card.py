"""Model cards: every saved model/ has a README.md with base model, data, method, key
hyper-parameters, final metrics and the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rewardloop.model_card import CardInfo, command_line, render
from rewardloop.synthetic import corpus_texts, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.train.sft import SFTConfig, train_sft


def test_sft_run_card_names_everything_that_made_the_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny(tmp_path / "tiny", corpus_texts(60), vocab_size=300, hidden_size=16,
                       num_layers=1, num_heads=2, max_position=96)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(4)))
    argv = ["/venv/bin/rewardloop", "train", "sft", "--model", str(model), "--data", str(data),
            "--lr", "0.003"]
    monkeypatch.setattr(sys, "argv", argv)
    summary = train_sft(SFTConfig(model=str(model), data=data, out=tmp_path / "run", lr=3e-3,
                                  max_steps=2, batch_size=2, max_length=48, device="cpu"))
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- rewardloop\n- sft\n---")
    assert f"- **Base model:** `{model}`" in card
    assert "- **Method:** sft" in card
    assert f"- **Data:** `{data}`" in card
    assert "| `lr` | 0.003 |" in card and "| `batch_size` | 2 |" in card
    assert "## Final metrics" in card and f"| `steps` | {summary['steps']} |" in card
    assert f"| `peak_rss_mb` | {summary['peak_rss_mb']:.4g} |" in card
    assert "```sh\nrewardloop train sft --model " in card and "--lr 0.003\n```" in card
    assert "base_model:" not in card  # a local path is no hub id for the metadata


def test_save_model_alone_writes_a_card_with_base_and_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rewardloop.models import load_policy, load_tokenizer, save_model

    model_dir = build_tiny(tmp_path / "tiny", corpus_texts(60), vocab_size=300, hidden_size=16,
                           num_layers=1, num_heads=2, max_position=96)
    monkeypatch.setattr(sys, "argv", ["python", "script.py", "--x", "a b"])
    save_model(load_policy(model_dir, device="cpu"), load_tokenizer(model_dir),
               tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert f"- **Base model:** `{model_dir}`" in card
    assert "python script.py --x 'a b'" in card
    assert "## Final metrics" not in card  # nothing known yet; the run's summary adds them


def test_render_marks_hub_base_models_and_leaves_empty_parts_out() -> None:
    card = render(CardInfo(base_model="Qwen/Qwen2.5-0.5B-Instruct", command="rewardloop x",
                           method="dpo", hyperparameters={"loss": "sigmoid", "beta": 0.1},
                           metrics={"eval_accuracy": 0.6666666, "flag": True, "note": "x"}),
                  "run/model")
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and "- dpo" in card
    assert "| `eval_accuracy` | 0.6667 |" in card
    assert "flag" not in card and "note" not in card  # only numbers are metrics
    assert "Data" not in card
    assert command_line(["/x/site-packages/rewardloop/__main__.py", "eval"]) == "rewardloop eval"
