"""PPO: the sequence reward lands on the last real token (EOS, or the last kept token of an
answer cut at max length), values are read before each completion token, a smoke run updates
the policy and the value model, and the CLI refuses bad settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from rewardloop import ops
from rewardloop.rollout import Rollout
from rewardloop.train.ppo import PPOConfig


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]




@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    path = tmp_path_factory.mktemp("ppo")
    build_tiny(path / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    (path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(8)))
    return path


def test_score_lands_on_last_real_token() -> None:
    """Completions are right-padded after EOS; a cut answer has no EOS and ends at the edge."""
    eos, pad = 2, 3
    completion_ids = torch.tensor([[5, 6, eos, pad, pad],    # ended at column 2
                                   [5, 6, 7, 8, 9],          # cut at max length: column 4
                                   [eos, pad, pad, pad, pad]])  # empty answer: its EOS
    mask, has_eos = ops.completion_mask(completion_ids, eos, pad)
    assert has_eos.tolist() == [True, False, True]
    kl = torch.full((3, 5), 0.1)
    rewards = ops.kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.5)
    expected = -0.05 * mask.float()
    expected[0, 2] += 1.0
    expected[1, 4] += 2.0
    expected[2, 0] += 3.0
    assert torch.allclose(rewards, expected)
    # Under GAE with gamma = lam = 1 and zero values the first token's advantage is the whole
    # return: score minus the KL of the real tokens only.
    adv, _ = ops.gae(rewards, torch.zeros(3, 5), mask, 1.0, 1.0)
    assert adv[:, 0].tolist() == pytest.approx([1.0 - 0.15, 2.0 - 0.25, 3.0 - 0.05])


def test_values_are_read_before_each_completion_token(root: Path) -> None:
    from rewardloop.models import load_tokenizer, load_value_model
    from rewardloop.train.ppo import token_values

    tokenizer = load_tokenizer(root / "tiny")
    model = load_value_model(root / "tiny", device="cpu", pad_token_id=tokenizer.pad_token_id)
    prompt = torch.tensor([[3, 3, 10, 11], [12, 13, 14, 15]])  # row 0 left-padded
    rollout = Rollout(prompt, (prompt != 3).long(), torch.tensor([[20, 2, 3], [21, 22, 23]]),
                      torch.tensor([[1, 1, 0], [1, 1, 1]]), torch.tensor([True, False]),
                      ["", ""])
    with torch.no_grad():
        values = token_values(model, rollout)  # (2, 3)
        alone = torch.tensor([[10, 11, 20, 2]])
        hidden = model.model(input_ids=alone).last_hidden_state
        expected = model.score(hidden[0, 1:3]).squeeze(-1)  # states before tokens 20 and 2
    assert values.shape == (2, 3)
    assert torch.allclose(values[0, :2], expected, atol=1e-5)


@pytest.mark.parametrize(("overrides", "words"), [
    ({"kl_in": "loss"}, "kl_in=reward"),
    ({"batch_size": 5, "num_generations": 2}, "multiple of num_generations"),
    ({"lam": 1.5}, "lam in"),
    ({"value_clip": 0.0}, "value_clip"),
])
def test_config_refuses(overrides: dict[str, Any], words: str) -> None:
    base = {"policy": "p", "prompts": Path("x"), "out": Path("o"), "rewards": ("a.b:c",)}
    with pytest.raises(ValueError, match=words):
        PPOConfig(**{**base, **overrides})


def test_ppo_updates_policy_and_value_model(root: Path) -> None:
    from safetensors.torch import load_file

    from rewardloop.cli import app

    out = root / "run"
    result = CliRunner().invoke(app, [
        "train", "ppo", "--policy", str(root / "tiny"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", "test_ppo:length_reward", "--out", str(out), "--batch-size", "4",
        "--mini-batch-size", "2", "--micro-batch-size", "1", "--ppo-epochs", "2",
        "--max-steps", "1", "--max-new-tokens", "6", "--lr", "1e-2", "--device", "cpu",
        "--missing-eos-penalty", "0.5", "--sample-every", "1"])
    assert result.exit_code == 0, result.output
    before = load_file(str(root / "tiny" / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert not [k for k in before if torch.equal(before[k], after[k])]
    assert "score.weight" in load_file(str(out / "value_model" / "model.safetensors"))
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("value_explained_variance", "vf_loss", "vf_clip_frac", "kl_k1", "kl_k3",
                "clip_frac", "approx_kl", "entropy", "grad_norm_value", "truncated_frac"):
        assert key in metrics, key
    assert metrics["grad_norm_value"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and "peak_rss_mb" in summary


def test_a_critic_with_an_infinite_gradient_leaves_the_policy_unchanged(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both models are checked before either steps: the policy's optimizer never steps when
    the value model's gradient is not finite, and the run stops with exit 3."""
    from rewardloop.cli import app
    from rewardloop.train import ppo

    original = ppo.micro_step

    def poisoned(cfg, rt, policy, value_model, *args, **kwargs):
        metrics = original(cfg, rt, policy, value_model, *args, **kwargs)
        next(p for p in value_model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        return metrics

    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(ppo, "micro_step", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: steps.append(self) or real_step(self, *a, **k))
    result = CliRunner().invoke(app, [
        "train", "ppo", "--policy", str(root / "tiny"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", "test_ppo:length_reward", "--out", str(root / "poisoned"),
        "--batch-size", "4", "--max-steps", "1", "--max-new-tokens", "4", "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert "not finite" in result.output and steps == []
