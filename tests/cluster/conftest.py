"""One local Ray for the whole test session (``ray_cluster``), and the tiny run inputs.

Ray's start-up costs seconds and each actor is a process that imports torch: the tests share
one cluster (2 CPUs, 4 logical GPUs: GPU placement is exercised on CPU) and keep to a few
short runs. Every test module here marks itself ``xdist_group("ray")`` so that under
``pytest -n 2 --dist loadgroup`` they run in one worker, against that one cluster.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REWARDS = str(HERE.parent / "invariants")  # _rl_rewards: reward functions the runs import
if REWARDS not in sys.path:
    sys.path.insert(0, REWARDS)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    ray = pytest.importorskip("ray")
    # Actors inherit this environment: the reward functions of tests/invariants importable,
    # gloo on the loopback device, one math thread per actor.
    paths = [REWARDS, os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, namespace="rewardloop-tests",
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny policy, 8 prompts and a saved reward model (its head fixed, so every process
    that loads it scores alike)."""
    import torch

    from rewardloop.models import load_reward_model, load_tokenizer
    from rewardloop.synthetic import corpus_texts, prompt_rows
    from rewardloop.tiny import build_tiny

    root = tmp_path_factory.mktemp("cluster")
    build_tiny(root / "tiny", corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=2,
               seed=0)
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                for r in prompt_rows(8, seed=3)))
    tokenizer = load_tokenizer(root / "tiny")
    torch.manual_seed(0)
    rm = load_reward_model(root / "tiny", device="cpu", pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(root / "rm", safe_serialization=True)
    tokenizer.save_pretrained(root / "rm")
    (root / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.5, "std": 2.0}))
    return root
