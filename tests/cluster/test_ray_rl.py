"""Online RL on Ray equals the same run in one process.

Greedy decoding (top-k 1) makes the samples the same wherever they are drawn, so a run whose
trainer ranks, generation engine and reward model are separate actors must take the same
steps as one process: same per-step rewards, same final weights (fp32 on CPU; 1e-5 leaves
room for the summation order of the all-reduce, as in tests/invariants/test_distributed.py).
The loop is `train grpo`'s with the REINFORCE++ estimator: under greedy decoding every sample
of a group is the same, so group baselines (grpo, rloo) would make every advantage 0.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardloop.config import load_config
from rewardloop.errors import TrainingError

pytestmark = [pytest.mark.xdist_group("ray")]

TOL = 1e-5
KEYS = ("loss", "grad_norm", "reward/mean", "reward/by_prompt/mean", "reward/rm/mean", "kl_k1")


def config(work: Path, out: Path, **extra: object):
    from rewardloop.train.configs import GRPOConfig

    return load_config(
        GRPOConfig, policy=str(work / "tiny"), prompts=work / "prompts.jsonl", out=out,
        rewards=("_rl_rewards:by_prompt", f"{work / 'rm'}@0.5"), advantage="reinforce++",
        num_generations=2, batch_size=8, max_steps=4, lr=1e-3, top_k=1, max_new_tokens=8,
        kl_coef=0.1, save_every=1, **{"actor_cpus": 0.5, **extra})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb, strict=True):
        for key in KEYS:
            assert x[key] == pytest.approx(y[key], rel=TOL, abs=TOL), (key, x["step"])
    wa, wb = (load_file(str(run / "model" / "model.safetensors")) for run in (a, b))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=TOL, atol=TOL, msg=name)


@pytest.fixture(scope="module")
def one(work: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same run in this process."""
    from rewardloop.train.grpo import train

    out = tmp_path_factory.mktemp("one") / "run"
    train(config(work, out))
    assert metrics(out)[0]["grad_norm"] > 0
    return out


@pytest.mark.slow
def test_split_two_trainers_one_generator_one_reward_actor_equal_one_process(
        ray_cluster: object, work: Path, one: Path, tmp_path: Path) -> None:
    """The KL reference is an actor of its own here (the colocated run below keeps it in the
    trainers)."""
    from rewardloop.cluster.rl import train_on_ray

    out = tmp_path / "ray"
    cfg = config(work, out, ray="local", trainers=2, rollout_actors=1, reward_actors=1,
                 reference_actors=1, placement="split", trainer_gpus=1, rollout_gpus=1,
                 reward_gpus=1, actor_cpus=0.4)
    summary = train_on_ray("grpo", cfg)
    assert summary["steps"] == 4
    assert_same_run(one, out)


def kill_after_first_step(ray: object, out: Path, name: str) -> threading.Thread:
    """A thread that kills the actor called ``name`` once step 1 is logged; it records when."""
    def run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = out / "metrics.jsonl"
            if log.is_file() and log.read_text().strip():
                ray.kill(ray.get_actor(name))
                thread.killed_at = time.monotonic()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.killed_at = None
    thread.start()
    return thread


@pytest.mark.slow
def test_colocated_run_restarts_from_its_checkpoint_when_the_generation_actor_dies(
        ray_cluster: object, work: Path, one: Path, tmp_path: Path) -> None:
    """The generation actor shares trainer 0's (logical) GPU, and the reward model is scored
    inside the trainers (--reward-actors 0); the generation actor is killed after step 1, and
    --max-restarts 1 resumes from the last checkpoint to the same result as one uninterrupted
    process."""
    from rewardloop.cluster.rl import actor_name, train_on_ray

    out = tmp_path / "ray"
    cfg = config(work, out, ray="local", trainers=2, reward_actors=0, placement="colocate",
                 trainer_gpus=1, max_restarts=1)
    killer = kill_after_first_step(ray_cluster, out, actor_name(out, 0, "rollout", 0))
    summary = train_on_ray("grpo", cfg)
    killer.join()
    assert killer.killed_at is not None and summary["restarts"] == 1
    assert json.loads((out / "summary.json").read_text())["restarts"] == 1  # cluster.md
    assert_same_run(one, out)


@pytest.mark.slow
def test_a_dead_generation_actor_stops_the_run_within_60_s_naming_it(
        ray_cluster: object, work: Path, tmp_path: Path) -> None:
    from rewardloop.cluster.rl import actor_name, train_on_ray

    out = tmp_path / "ray"
    cfg = replace(config(work, out, ray="local", trainers=1, reward_actors=0),
                  rewards=("_rl_rewards:by_prompt",), max_steps=1000, save_every=1)
    killer = kill_after_first_step(ray_cluster, out, actor_name(out, 0, "rollout", 0))
    with pytest.raises(TrainingError) as caught:
        train_on_ray("grpo", cfg)
    killer.join()
    assert time.monotonic() - killer.killed_at < 60
    message = str(caught.value)
    assert message.startswith("the generation actor 0 died")
    assert f"the last good checkpoint is {out / 'checkpoints'}" in message


@pytest.mark.slow
def test_one_step_off_policy_samples_the_next_step_during_the_update(
        ray_cluster: object, work: Path, tmp_path: Path) -> None:
    """From step 2 on, the samples come from the weights before the previous update: one
    step stale, which the sampler/trainer mismatch shows and the importance weights see."""
    from rewardloop.cluster.rl import train_on_ray

    out = tmp_path / "ray"
    cfg = replace(config(work, out, ray="local", trainers=1, reward_actors=0,
                         async_rollout=True), rewards=("_rl_rewards:by_prompt",), max_steps=3)
    summary = train_on_ray("grpo", cfg)
    saved = json.loads((out / "summary.json").read_text())  # the driver added restarts
    assert saved["restarts"] == summary["restarts"] == 0 and saved["steps"] == 3
    steps = metrics(out)
    assert [m["staleness"] for m in steps] == [0, 1, 1]
    assert abs(steps[0]["sampler_kl"]) < 1e-6 and steps[0]["is_weight_mean"] == \
        pytest.approx(1.0, abs=1e-6)
    for m in steps[1:]:
        assert abs(m["sampler_kl"]) > 1e-6 and m["is_weight_mean"] != pytest.approx(1.0,
                                                                                  abs=1e-7)


@pytest.mark.slow
def test_ppo_on_ray_equals_one_process(ray_cluster: object, work: Path, tmp_path: Path) -> None:
    """The PPO loop takes its generator from the same roles (value model in the trainer)."""
    from rewardloop.cluster.rl import train_on_ray
    from rewardloop.train import ppo
    from rewardloop.train.configs import PPOConfig

    def ppo_config(out: Path, **extra: object) -> PPOConfig:
        return load_config(
            PPOConfig, policy=str(work / "tiny"), prompts=work / "prompts.jsonl", out=out,
            rewards=("_rl_rewards:by_prompt",), batch_size=4, max_steps=2, lr=1e-3, top_k=1,
            max_new_tokens=6, kl_coef=0.1, ppo_epochs=2, actor_cpus=0.5, **extra)

    ppo.train(ppo_config(tmp_path / "one"))
    train_on_ray("ppo", ppo_config(tmp_path / "ray", ray="local", reward_actors=0))
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "ray"), strict=True):
        for key in ("loss", "vf_loss", "grad_norm_policy", "reward/mean", "kl_k1"):
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), (key, a["step"])
    for sub in ("model", "value_model"):
        wa, wb = (load_file(str(tmp_path / run / sub / "model.safetensors"))
                  for run in ("one", "ray"))
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=TOL, atol=TOL, msg=name)
