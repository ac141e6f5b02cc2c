"""Choosing an engine without vLLM: options and their checks, the factory, the missing-vLLM
message (exit 2 with the install line), the log-prob mode per sampling setting, and the trainers'
off-policy path driven by a generator that samples like the trainer but reports its own
log-probs (as vLLM does)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.engines.base import SamplingSettings
from rewardloop.engines.factory import (
    EngineOptions,
    engine_model_path,
    logprobs_mode,
    make_generator,
)
from rewardloop.errors import UserError

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("engines")
    build_tiny(root / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(8)))
    return root


@pytest.mark.parametrize(("options", "words"), [
    ({"generator": "trt"}, "generator must be one of hf, vllm"),
    ({"generator": "vllm", "vllm_mode": "remote"}, "vllm_mode must be colocate or server"),
    ({"generator": "vllm", "vllm_mode": "server"}, "needs --vllm-server URL"),
    ({"generator": "vllm", "vllm_server": "http://h:1"}, "only with --vllm-mode server"),
    ({"generator": "vllm", "vllm_gpu_memory_utilization": 0.0}, r"in \(0, 1\]"),
    ({"generator": "vllm", "vllm_tensor_parallel_size": 0}, "at least 1"),
    ({"generator": "vllm", "vllm_mode": "server", "vllm_server": "http://h:1",
      "vllm_sleep": True}, "colocated engine"),
])
def test_options_refuse(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        EngineOptions(**options)


def test_the_train_config_checks_engine_options() -> None:
    from rewardloop.config import load_config
    from rewardloop.train.grpo import GRPOConfig

    base = {"policy": "p", "prompts": Path("x"), "out": Path("o"), "rewards": ("a.b:c",)}
    with pytest.raises(UserError, match="needs --vllm-server"):
        load_config(GRPOConfig, None, **base, generator="vllm", vllm_mode="server")
    with pytest.raises(UserError, match="is_level"):
        load_config(GRPOConfig, None, **base, is_level="tokens")
    cfg = load_config(GRPOConfig, None, **base, generator="vllm", vllm_sleep=True)
    assert EngineOptions.of(cfg) == EngineOptions(generator="vllm", vllm_sleep=True)


def test_log_prob_mode_per_sampling_setting() -> None:
    assert logprobs_mode(None) == "raw_logprobs"
    assert logprobs_mode(SamplingSettings(top_p=0.9, top_k=5)) == "raw_logprobs"  # T = 1
    assert logprobs_mode(SamplingSettings(temperature=0.7)) == "processed_logprobs"
    with pytest.raises(UserError, match="temperature != 1 cannot be combined with top-p"):
        logprobs_mode(SamplingSettings(temperature=0.7, top_p=0.9))


def test_engine_loads_an_adapters_base(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/models/base"}))
    assert engine_model_path(tmp_path) == "/models/base"
    assert engine_model_path("/models/full") == "/models/full"


def test_factory_builds_the_built_in_loop(root: Path) -> None:
    from rewardloop.engines.hf import HFGenerator
    from rewardloop.models import load_policy, load_tokenizer

    model = load_policy(root / "tiny", device="cpu")
    tokenizer = load_tokenizer(root / "tiny", padding_side="left")
    generator = make_generator(EngineOptions(), model, tokenizer, None)
    assert isinstance(generator, HFGenerator) and generator.model is model
    generator.policy_updated(model)  # its own model: nothing to push
    with pytest.raises(ValueError, match="model it was built with"):
        generator.policy_updated(object())


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_a_policy_grown_by_a_pad_token_is_refused_for_vllm(root: Path, mode: str) -> None:
    """--add-pad-token grows the trainer's embeddings by one row; an engine loading the original
    directory could neither sample with that pad id nor take the pushed weights: refused
    before any engine starts, with what to do (vLLM installed or not)."""
    from rewardloop.models import load_policy, load_tokenizer

    model = load_policy(root / "tiny", device="cpu")
    tokenizer = load_tokenizer(root / "tiny", padding_side="left")
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows + 1)
    server = {"vllm_server": "http://127.0.0.1:9"} if mode == "server" else {}
    options = EngineOptions(generator="vllm", vllm_mode=mode, **server)
    with pytest.raises(UserError, match=rf"has {rows + 1} tokens .*--add-pad-token.* has "
                                        rf"{rows}.*--generator hf"):
        make_generator(options, model, tokenizer, root / "tiny",
                       logprob_settings=SamplingSettings())  # a trainer: it pushes weights


def test_an_engine_that_gets_no_weights_only_needs_the_pad_id(root: Path) -> None:
    """eval/generate from a colocated engine send no weights: a longer vocabulary matters only
    when the pad id lies outside the checkpoint's."""
    from rewardloop.engines.factory import check_engine_vocabulary
    from rewardloop.models import load_policy

    model = load_policy(root / "tiny", device="cpu")
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows + 1)
    check_engine_vocabulary(model, root / "tiny", rows - 1, pushes=False)
    with pytest.raises(UserError, match="--add-pad-token"):
        check_engine_vocabulary(model, root / "tiny", rows, pushes=False)  # the new pad
    with pytest.raises(UserError, match="--add-pad-token"):
        check_engine_vocabulary(model, root / "tiny", rows - 1, pushes=True)


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is not installed")
def test_missing_vllm_is_exit_2_with_the_install_line(root: Path) -> None:
    from rewardloop.cli import app

    result = CliRunner().invoke(app, [
        "train", "grpo", "--policy", str(root / "tiny"), "--prompts",
        str(root / "prompts.jsonl"), "--reward", "test_engines:length_reward", "--out",
        str(root / "run-vllm"), "--batch-size", "4", "--num-generations", "2",
        "--max-steps", "1", "--device", "cpu", "--generator", "vllm"])
    assert result.exit_code == 2, result.output
    assert "pip install 'rewardloop[vllm]'" in result.output
    assert "Traceback" not in result.output


class ShiftedSampler:
    """Samples with the built-in loop and reports log-probs ``shift`` above the trainer's (an
    engine whose numerics differ by a known amount); counts the weight updates it is told of."""

    def __init__(self, inner: Any, shift: float) -> None:
        self.inner, self.shift, self.updates = inner, shift, 0

    def policy_updated(self, model: Any) -> None:
        self.updates += 1

    def generate(self, prompts: Any, n: int, settings: SamplingSettings) -> Any:
        from dataclasses import replace

        from rewardloop.rollout import batched_logps

        rollout = self.inner.generate(prompts, n, settings)
        trainer = batched_logps(self.inner.model, rollout, settings.temperature, len(rollout))
        return replace(rollout, sampler_logps=(trainer + self.shift) * rollout.completion_mask)


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_trainers_correct_samples_from_another_engine(root: Path, trainer: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampler log-probs 0.1 above the trainer's: ratio π_trainer / π_sampler = e^-0.1 on every
    token, so the mismatch metrics and the (uncapped) IS weights are known exactly."""
    from rewardloop.engines import factory
    from rewardloop.engines.hf import HFGenerator

    samplers: list[ShiftedSampler] = []

    def make(options: Any, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        samplers.append(ShiftedSampler(HFGenerator(model, tokenizer), 0.1))
        return samplers[-1]

    monkeypatch.setattr(factory, "make_generator", make)
    common = {"policy": str(root / "tiny"), "prompts": root / "prompts.jsonl",
              "out": root / f"off-{trainer}", "rewards": ("test_engines:length_reward",),
              "batch_size": 4, "max_steps": 2, "lr": 1e-3, "max_new_tokens": 5,
              "device": "cpu", "overwrite": True, "is_cap": 2.0}
    if trainer == "grpo":
        from rewardloop.train.grpo import GRPOConfig as Config
        from rewardloop.train.grpo import train
        common["num_generations"] = 2
    else:
        from rewardloop.train.ppo import PPOConfig as Config
        from rewardloop.train.ppo import train
    train(Config(**common))
    rows = [json.loads(line) for line in (root / f"off-{trainer}" / "metrics.jsonl").open()]
    assert len(rows) == 2
    for row in rows:
        assert row["sampler_kl"] == pytest.approx(0.1, abs=1e-4)
        assert row["is_ratio_mean"] == pytest.approx(float(torch.exp(torch.tensor(-0.1))),
                                                     abs=1e-4)
        assert row["is_weight_mean"] == pytest.approx(row["is_ratio_mean"], abs=1e-6)
    assert samplers[0].updates == 2  # told after each of the two steps


@pytest.mark.parametrize("trainer", ["grpo", "ppo"])
def test_sequence_mask_drops_mismatched_samples_from_the_update(
        root: Path, trainer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampler log-probs 0.1 BELOW the trainer's: every sequence's ratio e^(0.1 L) exceeds cap
    1, so the sequence mask drops every sample and (without KL) the policy does not move."""
    from safetensors.torch import load_file

    from rewardloop.engines import factory
    from rewardloop.engines.hf import HFGenerator

    monkeypatch.setattr(factory, "make_generator", lambda options, model, tokenizer, *a, **k:
                        ShiftedSampler(HFGenerator(model, tokenizer), -0.1))
    out = root / f"off-masked-{trainer}"
    common = {"policy": str(root / "tiny"), "prompts": root / "prompts.jsonl", "out": out,
              "rewards": ("test_engines:length_reward",), "batch_size": 4, "max_steps": 1,
              "lr": 1e-2, "max_new_tokens": 5, "device": "cpu", "overwrite": True,
              "kl_coef": 0.0, "is_level": "sequence", "is_cap": 1.0}
    if trainer == "grpo":
        from rewardloop.train.grpo import GRPOConfig, train

        train(GRPOConfig(**common, num_generations=2))
    else:
        from rewardloop.train.ppo import PPOConfig
        from rewardloop.train.ppo import train as train_ppo

        train_ppo(PPOConfig(**common))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["is_weight_mean"] == 0.0
    before = load_file(root / "tiny" / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loop_generation_options_are_checked() -> None:
    from rewardloop.loop import LoopConfig

    base = {"policy": "p", "prompts": Path("x")}
    with pytest.raises(ValueError, match=r"generation: unknown keys "
                       r"\['generatr' \(did you mean 'generator'\?\)\]"):
        LoopConfig(**base, generation={"generatr": "vllm"})
    with pytest.raises(ValueError, match="needs --vllm-server"):
        LoopConfig(**base, generation={"generator": "vllm", "vllm_mode": "server"})
    cfg = LoopConfig(**base, generation={"generator": "vllm", "vllm_max_model_len": 512})
    assert cfg.engine() == EngineOptions(generator="vllm", vllm_max_model_len=512)


def test_an_engine_is_told_of_the_restored_weights_on_resume(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine starts from the model directory, so after --resume the trainer reports the
    restored weights before the first generation (TRL PR #3185), then after each step."""
    from rewardloop.engines import factory
    from rewardloop.engines.hf import HFGenerator
    from rewardloop.train.grpo import GRPOConfig, train

    samplers: list[ShiftedSampler] = []

    def make(options: Any, model: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> Any:
        samplers.append(ShiftedSampler(HFGenerator(model, tokenizer), 0.0))
        return samplers[-1]

    monkeypatch.setattr(factory, "make_generator", make)
    common = {"policy": str(root / "tiny"), "prompts": root / "prompts.jsonl",
              "out": root / "resumed", "rewards": ("test_engines:length_reward",),
              "num_generations": 2, "batch_size": 4, "max_new_tokens": 4, "device": "cpu",
              "save_every": 1}
    train(GRPOConfig(**common, max_steps=1, overwrite=True))
    train(GRPOConfig(**common, max_steps=2, resume=True))
    assert [s.updates for s in samplers] == [1, 2]  # fresh: 1 step; resumed: restore + 1 step


def test_vllm_stops_on_every_eos_id_of_the_models_generation_config(tmp_path: Path) -> None:
    """An instruct model ending turns with <|eot|> (as Llama 3 / Qwen2.5): vLLM is asked to
    stop on it as well as on the tokenizer's EOS, and a completion ending there is an ended
    answer (has_eos), as in the built-in loop."""
    from _archs import EOT, build_arch

    from rewardloop.engines.base import rollout_from_tokens, saved_stop_ids, stop_token_ids
    from rewardloop.engines.options import vllm_sampling_fields
    from rewardloop.models import load_policy, load_tokenizer

    instruct = build_arch(tmp_path / "instruct", "llama", eot=True)
    tokenizer = load_tokenizer(instruct, padding_side="left")
    eos, eot, pad = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT), \
        tokenizer.pad_token_id
    model = load_policy(instruct, device="cpu")
    assert stop_token_ids(tokenizer, model.generation_config) == [eos, eot]
    assert saved_stop_ids(instruct, tokenizer) == [eos, eot]  # what a vllm-serve engine reads
    plain = build_arch(tmp_path / "plain", "llama")
    assert saved_stop_ids(plain, load_tokenizer(plain)) == [eos]

    fields = vllm_sampling_fields(SamplingSettings(max_new_tokens=7, temperature=0.8, top_k=0),
                                  3, [pad], [eos, eot])
    assert fields == {"n": 3, "max_tokens": 7, "temperature": 0.8, "top_p": 1.0, "top_k": -1,
                      "logprobs": 0, "logit_bias": {pad: -100.0}, "stop_token_ids": [eos, eot],
                      "detokenize": False}
    assert vllm_sampling_fields(SamplingSettings(top_k=5), 1, [pad], [eos])["top_k"] == 5

    # The engine's outputs end at <|eot|>, at EOS, or at the limit.
    completions = [[10, 11, eot], [12, eos], [13, 14, 15]]
    rollout = rollout_from_tokens([[5, 6]], 3, completions, None, tokenizer, [eos, eot])
    assert rollout.has_eos.tolist() == [True, True, False]
    assert rollout.completion_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    tokenizer_only = rollout_from_tokens([[5, 6]], 3, completions, None, tokenizer)
    assert tokenizer_only.has_eos.tolist() == [False, True, False]
