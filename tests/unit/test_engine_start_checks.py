"""What is decided about a vLLM engine without vLLM: the seed each request carries (so the
ranks of one tensor-parallel engine draw alike and a resumed run draws as an uninterrupted
one), and the refusals at start, a ``--vllm-tensor-parallel-size`` that does not divide the
number of processes and prompt + answer lengths longer than the engine's context (exit 2)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.engines.base import check_context, check_tensor_parallel, request_seed
from rewardloop.engines.factory import EngineOptions, make_generator
from rewardloop.errors import UserError
from rewardloop.util.seed import seed_everything


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("engine-start")
    build_tiny(root / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(8)))
    return root


def test_request_seeds_follow_the_global_generator_and_its_restored_state() -> None:
    """The seeds come from torch's global generator: the same seed gives the same requests,
    each rank's seed (seed + 7919 * rank, train.grpo.seed_sampling) other ones, and the RNG
    state a checkpoint saves and restores gives the requests after it again (resume)."""
    seed_everything(3)
    first = request_seed()
    saved = torch.get_rng_state()  # what a checkpoint holds of each rank (train.checkpoint)
    later = [request_seed() for _ in range(3)]
    seed_everything(3)
    assert request_seed() == first
    torch.set_rng_state(saved)
    assert [request_seed() for _ in range(3)] == later
    seed_everything(3 + 7919)
    assert request_seed() not in [first, *later]
    assert all(0 <= s < 2**62 for s in [first, *later])  # room for + prompt * n + copy


def test_the_context_must_hold_the_longest_prompt_and_answer() -> None:
    check_context(256, 200, 56, "--max-prompt-length")  # exactly full: fits
    with pytest.raises(UserError) as err:
        check_context(256, 200, 57, "--max-prompt-length")
    message = str(err.value)
    for part in ("--max-prompt-length (200 tokens)", "--max-new-tokens (57)", "257 tokens",
                 "max_model_len 256", "--vllm-max-model-len", "vllm-serve --max-model-len"):
        assert part in message


@pytest.mark.parametrize(("size", "world"), [(2, 1), (2, 3), (4, 2)])
def test_a_tensor_parallel_size_that_does_not_divide_the_processes_is_refused(
        root: Path, size: int, world: int) -> None:
    """Before vLLM is imported (so also where it is not installed): one process cannot drive
    an engine of two ranks, nor three processes engines of two."""
    from rewardloop.models import load_policy, load_tokenizer

    model = load_policy(root / "tiny", device="cpu")
    tokenizer = load_tokenizer(root / "tiny", padding_side="left")
    options = EngineOptions(generator="vllm", vllm_tensor_parallel_size=size)
    with pytest.raises(UserError, match=rf"--vllm-tensor-parallel-size {size} must divide the "
                                        rf"number of processes \({world}\)"):
        make_generator(options, model, tokenizer, root / "tiny", world_size=world)
    check_tensor_parallel(size, 2 * size)
    check_tensor_parallel(1, 1)


def test_train_with_a_tensor_parallel_engine_on_one_process_is_exit_2(root: Path) -> None:
    from rewardloop.cli import app

    result = CliRunner().invoke(app, [
        "train", "grpo", "--policy", str(root / "tiny"), "--prompts",
        str(root / "prompts.jsonl"), "--reward", "test_engine_start_checks:length_reward",
        "--out", str(root / "run-tp"), "--batch-size", "4", "--num-generations", "2",
        "--max-steps", "1", "--device", "cpu", "--generator", "vllm",
        "--vllm-tensor-parallel-size", "2"])
    assert result.exit_code == 2, result.output
    assert "must divide the number of processes (1)" in result.output
    assert "Traceback" not in result.output


class FakeEngine:
    """Stands in for ``vllm_engine.VLLMGenerator``: an engine whose context is 64 tokens."""

    max_model_len = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.closed = False
        made.append(self)

    def close(self) -> None:
        self.closed = True


made: list[FakeEngine] = []


def test_lengths_longer_than_the_engines_context_are_refused_at_start(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The factory reads the context from the engine it started and refuses a command whose
    longest prompt + answer exceed it, shutting the engine down first."""
    from rewardloop.models import load_policy, load_tokenizer

    fake = types.ModuleType("rewardloop.engines.vllm_engine")
    fake.VLLMGenerator = FakeEngine  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rewardloop.engines.vllm_engine", fake)
    model = load_policy(root / "tiny", device="cpu")
    tokenizer = load_tokenizer(root / "tiny", padding_side="left")
    options = EngineOptions(generator="vllm")
    made.clear()
    assert make_generator(options, model, tokenizer, root / "tiny", world_size=1,
                          max_lengths=(40, 24)) is made[0]  # 64: fits
    with pytest.raises(UserError, match=r"--max-prompt-length \(40 tokens\) \+ --max-new-tokens "
                                        r"\(25\) = 65 tokens exceed .*max_model_len 64"):
        make_generator(options, model, tokenizer, root / "tiny", world_size=1,
                       max_lengths=(40, 25))
    assert [e.closed for e in made] == [False, True]
    make_generator(options, model, tokenizer, root / "tiny", world_size=1)  # eval: per request
