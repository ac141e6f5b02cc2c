"""Online-RL invariants: a resumed run equals an uninterrupted one (GRPO and PPO), and gradient
accumulation does not change an update."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared CPU, OpenMP spin-waiting makes tiny models crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    path = tmp_path_factory.mktemp("rl-inv")
    build_tiny(path / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    # 3 prompts and 2 per step: the second step crosses an epoch boundary of the sampler.
    (path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_rows(3)))
    return path


def _config(kind: str, root: Path, out: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "policy": str(root / "tiny"), "prompts": root / "prompts.jsonl", "out": root / out,
        "rewards": ("test_rl_invariants:length_reward",), "num_generations": 2,
        "batch_size": 4, "lr": 1e-2, "max_new_tokens": 5, "device": "cpu", "save_every": 1,
        "sample_every": 1, "overwrite": True}
    values.update(overrides)
    if kind == "ppo":
        from rewardloop.train.ppo import PPOConfig

        return PPOConfig(**values, mini_batch_size=2, ppo_epochs=2)
    from rewardloop.train.grpo import GRPOConfig

    return GRPOConfig(**values, kl_target=0.05)


def _train(kind: str, cfg: Any) -> dict[str, Any]:
    if kind == "ppo":
        from rewardloop.train.ppo import train
    else:
        from rewardloop.train.grpo import train
    return train(cfg)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_resume_equals_uninterrupted(root: Path, kind: str) -> None:
    # Still warming up at step 2 (GRPO takes 1 optimizer step a step, PPO 4): a resume that
    # restarted the schedule would differ.
    warm = {"warmup_steps": 8}
    whole = _train(kind, _config(kind, root, f"{kind}-straight", max_steps=2, **warm))
    _train(kind, _config(kind, root, f"{kind}-split", max_steps=1, **warm))
    resumed = _train(kind, _config(kind, root, f"{kind}-split", max_steps=2, overwrite=False,
                                   resume=True, **warm))
    # the summary covers the steps before the resume too
    for key in ("reward_first", "reward_last", "kl_k1_first", "completion_length_mean_first"):
        assert resumed[key] == whole[key], key
    straight, split = root / f"{kind}-straight", root / f"{kind}-split"
    a, b = _weights(straight / "model"), _weights(split / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    if kind == "ppo":
        va, vb = _weights(straight / "value_model"), _weights(split / "value_model")
        assert all(torch.equal(va[k], vb[k]) for k in va)
    lines_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines_b] == [1, 2]
    for key in ("reward/mean", "kl_k1", "loss", "lr"):
        assert lines_a[1][key] == lines_b[1][key], key
    if kind == "grpo":  # the adaptive KL coefficient was restored too
        assert lines_a[1]["kl_coef"] == lines_b[1]["kl_coef"]
    samples = [json.loads(x)["step"] for x in (split / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_gradient_accumulation_does_not_change_the_update(root: Path, advantage: str) -> None:
    """For rloo (KL in the reward) one micro-batch takes the advantages from the update's own
    forward pass and four take them from a separate pass first: the same update either way."""
    from rewardloop.train.grpo import train

    # Two steps: at the second the policy has left the reference, so the KL is not 0.
    train(_config("grpo", root, "acc-1", max_steps=2, micro_batch_size=4, advantage=advantage,
                  kl_coef=0.5))
    train(_config("grpo", root, "acc-4", max_steps=2, micro_batch_size=1, advantage=advantage,
                  kl_coef=0.5))
    # Adam's first step is nearly sign(g), so also compare the gradient norm and the loss.
    m1, m4 = (json.loads((root / name / "metrics.jsonl").read_text().splitlines()[-1])
              for name in ("acc-1", "acc-4"))
    assert m1["reward/mean"] == m4["reward/mean"]  # same samples
    assert m1["kl_k1"] != 0 and m4["kl_k1"] == pytest.approx(m1["kl_k1"], rel=1e-4, abs=1e-7)
    assert m4["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m4["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
    assert m4["advantage_abs_mean"] == pytest.approx(m1["advantage_abs_mean"], rel=1e-5)
    a, b = _weights(root / "acc-1" / "model"), _weights(root / "acc-4" / "model")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
