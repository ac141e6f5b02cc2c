"""One real vLLM engine per test session (it takes ~15-60 s to start on CPU), over a tiny
Llama whose weights are spread out enough that greedy decoding does not repeat one token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (head size 32: vLLM's CPU attention needs a multiple of 32) with weights
    drawn wide, saved with its tokenizer."""
    import torch

    from rewardloop.models import load_policy
    from rewardloop.tiny import build_tiny, generate_corpus

    path = tmp_path_factory.mktemp("vllm") / "tiny"
    build_tiny(path, generate_corpus(300), vocab_size=320, hidden_size=64, num_layers=2,
               num_heads=2, max_position=256)
    model = load_policy(path, device="cpu")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def engine(tiny_dir: Path) -> Any:
    """The session's colocated engine (float32 like the trainer's CPU model)."""
    from rewardloop.engines.factory import EngineOptions
    from rewardloop.engines.vllm_engine import VLLMGenerator
    from rewardloop.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_dir, padding_side="left")
    return VLLMGenerator(tiny_dir, tokenizer, EngineOptions(generator="vllm"), dtype="float32")
