"""GRPO / RLOO / REINFORCE++: config checks, the advantage registry by hand, smoke runs that
change every parameter, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from rewardloop.train.configs import ADVANTAGE_NAMES
from rewardloop.train.grpo import ADVANTAGES, AdvantageInput, GRPOConfig


def length_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [len(c) / 10.0 for c in completions]




@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardloop.synthetic import prompt_rows
    from rewardloop.tiny import build_tiny, generate_corpus

    root = tmp_path_factory.mktemp("grpo")
    build_tiny(root / "tiny", generate_corpus(300), vocab_size=320, hidden_size=16,
               num_layers=1, num_heads=2, max_position=128)
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in prompt_rows(8)))
    return root


def small(root: Path, out: str, **overrides: Any) -> GRPOConfig:
    values: dict[str, Any] = {
        "policy": str(root / "tiny"), "prompts": root / "prompts.jsonl", "out": root / out,
        "rewards": ("test_grpo:length_reward",), "num_generations": 2, "batch_size": 4,
        "max_steps": 1, "lr": 1e-2, "max_new_tokens": 6, "device": "cpu", "sample_every": 1,
        "overwrite": True, "gold": "rewardloop.synthetic:gold_score"}
    values.update(overrides)
    return GRPOConfig(**values)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_method_defaults_for_kl() -> None:
    base = {"policy": "p", "prompts": Path("x"), "out": Path("o"), "rewards": ("a.b:c",)}
    assert (GRPOConfig(**base).kl_in, GRPOConfig(**base).kl_estimator) == ("loss", "k3")
    rloo = GRPOConfig(**base, advantage="rloo")
    assert (rloo.kl_in, rloo.kl_estimator) == ("reward", "k1")
    pp = GRPOConfig(**base, advantage="reinforce++", num_generations=1, batch_size=3)
    assert (pp.kl_in, pp.mini_batch_size, pp.micro_batch_size) == ("reward", 3, 3)
    # k1 asked for without --kl-in goes where its gradient is not zero on average
    assert GRPOConfig(**base, kl_estimator="k1").kl_in == "reward"
    assert GRPOConfig(**base, kl_estimator="k2").kl_in == "loss"


@pytest.mark.parametrize(("overrides", "words"), [
    ({"num_generations": 1}, "num_generations >= 2"),
    ({"advantage": "rloo", "num_generations": 1}, "num_generations >= 2"),
    ({"batch_size": 6, "num_generations": 4}, "multiple of num_generations"),
    ({"mini_batch_size": 3}, "multiple of mini_batch_size"),
    ({"advantage": "ppo"}, "advantage must be one of"),
    ({"kl_in": "logits"}, "kl_in must be reward or loss"),
    ({"kl_in": "loss", "kl_estimator": "k1"}, "zero expected gradient"),
    ({"advantage": "rloo", "kl_in": "loss", "kl_estimator": "k1"}, "zero expected gradient"),
    ({"kl_target": 6.0, "kl_coef": 0.0}, "--kl-coef > 0"),
    ({"loss_aggregation": "mean"}, "loss_aggregation"),
    ({"rewards": ()}, "at least one reward"),
])
def test_config_refuses(overrides: dict[str, Any], words: str) -> None:
    base = {"policy": "p", "prompts": Path("x"), "out": Path("o"), "rewards": ("a.b:c",)}
    with pytest.raises(ValueError, match=words):
        GRPOConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------
# Advantages by hand
# ---------------------------------------------------------------------------------------------


def _input(scores: list[float], kl_in_reward: bool = False, kl: torch.Tensor | None = None,
           scale: bool = True) -> AdvantageInput:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    return AdvantageInput(torch.tensor(scores), kl, mask, 0.5, kl_in_reward, 2, scale, 1.0)


def test_grpo_advantages_by_hand() -> None:
    adv = ADVANTAGES["grpo"](_input([1.0, 3.0, 2.0, 2.0], scale=False))
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0]
    scaled = ADVANTAGES["grpo"](_input([1.0, 3.0, 2.0, 2.0]))
    # group std of (1, 3) is sqrt(2); eps 1e-4
    assert scaled[1].item() == pytest.approx(1.0 / (2**0.5 + 1e-4))


def test_rloo_with_kl_in_reward_by_hand() -> None:
    kl = torch.tensor([[0.2, 0.2, 9.0], [0.0, 0.0, 0.0], [1.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    adv = ADVANTAGES["rloo"](_input([1.0, 3.0, 2.0, 2.0], kl_in_reward=True, kl=kl))
    # sequence KL (masked sums): 0.4, 0, 1, 0 -> scores 1-0.2, 3, 2-0.5, 2
    assert adv.tolist() == pytest.approx([0.8 - 3.0, 3.0 - 0.8, 1.5 - 2.0, 2.0 - 1.5])


def test_reinforce_pp_whitens_token_returns() -> None:
    adv = ADVANTAGES["reinforce++"](_input([1.0, 3.0, 2.0, 2.0]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert adv.shape == (4, 3) and (adv[mask == 0] == 0).all()
    real = adv[mask == 1]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-3)
    # gamma = 1 and no KL: every token of a completion gets its completion's score
    assert adv[1, 0] == adv[1, 2] and adv[1, 0] > adv[0, 0]


# ---------------------------------------------------------------------------------------------
# Smoke runs
# ---------------------------------------------------------------------------------------------


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("overrides", [
    {"advantage": "grpo"},
    {"advantage": "rloo", "ppo_epochs": 2, "mini_batch_size": 2, "micro_batch_size": 1},
    {"advantage": "reinforce++", "num_generations": 1, "kl_target": 0.1, "entropy_coef": 0.01},
])
def test_every_parameter_changes(setup_dir: Path, overrides: dict[str, Any]) -> None:
    from rewardloop.train.grpo import train

    cfg = small(setup_dir, f"run-{overrides['advantage']}", **overrides)
    summary = train(cfg)
    before, after = _weights(setup_dir / "tiny"), _weights(cfg.out / "model")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert summary["steps"] == 1 and summary["samples_per_s"] > 0
    metrics = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward/mean", "reward/length_reward/mean", "reward/length_reward/std",
                "kl_k1", "kl_k3", "entropy", "clip_frac", "approx_kl", "completion_length_mean",
                "truncated_frac", "time_generate_s", "time_score_s", "time_train_s",
                "gold/mean", "grad_norm"):
        assert key in metrics[0], key
    if cfg.num_generations > 1:
        assert 0.0 <= metrics[0]["frac_reward_zero_std"] <= 1.0
    samples = (cfg.out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and json.loads(samples[0])["step"] == 1


def test_without_truncated_leaves_cut_completions_out_of_the_loss_mask() -> None:
    from rewardloop.rollout import Rollout
    from rewardloop.train.grpo import without_truncated

    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    rollout = Rollout(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                      torch.zeros(3, 3, dtype=torch.long), mask,
                      torch.tensor([True, False, True]), ["a", "b", "c"])
    assert without_truncated(rollout).tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]


def test_mask_truncated_trains_on_no_token_of_a_cut_completion(setup_dir: Path) -> None:
    """--mask-truncated (DAPO's overlong filtering): with answers of at most 2 tokens every
    completion of the untrained tiny policy is cut, so nothing is left to train on: the
    entropy bonus, the one part of the first step's loss that is not 0 by construction, is 0
    with it and not without."""
    from rewardloop.train.grpo import train

    losses = {}
    for masked in (False, True):
        cfg = small(setup_dir, f"run-masked-{masked}", max_new_tokens=2, entropy_coef=0.5,
                    kl_coef=0.0, mask_truncated=masked)
        train(cfg)
        first = json.loads((cfg.out / "metrics.jsonl").read_text().splitlines()[0])
        assert first["truncated_frac"] == 1.0  # the precondition
        losses[masked] = first["loss"]
    assert losses[True] == 0.0 and losses[False] < 0.0


def test_cli_grpo_and_its_errors(setup_dir: Path) -> None:
    from rewardloop.cli import app

    runner = CliRunner()
    base = ["train", "grpo", "--policy", str(setup_dir / "tiny"), "--prompts",
            str(setup_dir / "prompts.jsonl"), "--reward", "test_grpo:length_reward@2",
            "--out", str(setup_dir / "cli"), "--batch-size", "4", "--num-generations", "2",
            "--max-new-tokens", "4", "--max-steps", "1", "--device", "cpu"]
    result = runner.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "1 steps" in result.output and (setup_dir / "cli" / "model").is_dir()
    bad = runner.invoke(app, [*base, "--num-generations", "1", "--overwrite"])
    assert bad.exit_code == 2 and "num_generations >= 2" in bad.output
    bad = runner.invoke(app, [*base, "--batch-size", "5", "--overwrite"])
    assert bad.exit_code == 2 and "multiple of num_generations" in bad.output
    bad = runner.invoke(app, [*base[:6], "--reward", "test_grpo:no_such", *base[8:],
                              "--overwrite"])
    assert bad.exit_code == 2 and "has no function 'no_such'" in bad.output
    help_text = runner.invoke(app, ["train", "rloo", "--help"]).output
    assert "--advantage" in help_text and "--kl-estimator" in help_text


def test_the_config_names_exactly_the_estimators_the_trainer_has() -> None:
    # The config validates names without importing the trainer (the CLI reads it at start-up).
    assert ADVANTAGE_NAMES == tuple(ADVANTAGES)
