"""``--ray`` on the command line: packaging and address errors are one line and exit 2, and
the placement plan puts each actor where the flags say (no actors are started here)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rewardloop.cli import app
from rewardloop.cli._ray import with_ray_address
from rewardloop.cluster.placement import plan
from rewardloop.options import ClusterOptions
from rewardloop.util.net import free_port

pytestmark = [pytest.mark.xdist_group("ray")]


def grpo_args(work: Path, out: Path) -> list[str]:
    return ["train", "grpo", "--policy", str(work / "tiny"), "--prompts",
            str(work / "prompts.jsonl"), "--reward", "_rl_rewards:by_prompt", "--out", str(out)]


def test_ray_without_an_address_means_a_local_ray() -> None:
    assert with_ray_address(["train", "grpo", "--ray"]) == ["train", "grpo", "--ray", "local"]
    assert with_ray_address(["--ray", "--trainers", "2"]) == ["--ray", "local", "--trainers",
                                                              "2"]
    assert with_ray_address(["--ray", "auto", "--x"]) == ["--ray", "auto", "--x"]


def test_without_ray_installed_ray_is_exit_2_with_the_install_line(
        work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    res = CliRunner().invoke(app, [*grpo_args(work, tmp_path / "run"), "--ray", "local"])
    assert res.exit_code == 2
    assert "pip install 'rewardloop[ray]'" in res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("address", ["127.0.0.1:PORT", "ray://127.0.0.1:PORT", "nonsense"])
def test_unreachable_ray_is_exit_2_with_one_line(work: Path, tmp_path: Path,
                                                 address: str) -> None:
    pytest.importorskip("ray")
    address = address.replace("PORT", str(free_port()))  # nothing listens there
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "rewardloop", *grpo_args(work, tmp_path / "r"),
                          "--ray", address], env=env, text=True, capture_output=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert address in lines[0]


def test_nproc_and_ray_exclude_each_other(work: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run([sys.executable, "-m", "rewardloop", *grpo_args(work, tmp_path / "r"),
                          "--nproc", "2", "--ray"], env=env, text=True, capture_output=True,
                         timeout=120)
    assert res.returncode == 2 and "give one or the other" in res.stderr


def test_impossible_placements_are_exit_2(ray_cluster: object, work: Path,
                                          tmp_path: Path) -> None:
    base = [*grpo_args(work, tmp_path / "run"), "--ray", "local", "--actor-cpus", "0.5"]
    res = CliRunner().invoke(app, [*base, "--placement", "colocate", "--rollout-gpus", "1"])
    assert res.exit_code == 2 and "share the trainers' GPUs" in res.output
    res = CliRunner().invoke(app, [*base, "--trainers", "8", "--trainer-gpus", "1"])
    assert res.exit_code == 2
    assert "8 GPUs (the cluster has 4)" in res.output
    res = CliRunner().invoke(app, [*base, "--trainer-gpus", "2"])
    assert res.exit_code == 2 and "trainer_gpus must be at most 1" in res.output
    assert not (tmp_path / "run").exists()


def test_split_gives_every_actor_a_bundle_of_its_role() -> None:
    layout = plan(ClusterOptions(trainers=2, rollout_actors=2, reward_actors=1,
                                 trainer_gpus=1, rollout_gpus=0.5, actor_cpus=2), 1)
    assert layout.strategy == "PACK"
    assert layout.bundles == [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1},
                              {"CPU": 2, "GPU": 0.5}, {"CPU": 2, "GPU": 0.5}, {"CPU": 2}]
    assert [(s.role, s.index, s.bundle, s.gpus) for s in layout.slots] == [
        ("trainer", 0, 0, 1), ("trainer", 1, 1, 1), ("rollout", 0, 2, 0.5),
        ("rollout", 1, 3, 0.5), ("reward", 0, 4, 0)]
    assert layout.needs() == {"CPU": 10, "GPU": 3}
    # An actor given no GPU must not see the node's GPUs (it would take GPU 0, another's).
    assert [s.runtime_env() for s in layout.slots] == [{}] * 4 + [
        {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}]
    with pytest.raises(ValueError, match="trainer_gpus must be at most 1"):
        ClusterOptions(trainer_gpus=2).check_cluster()


def test_colocate_shares_each_trainers_bundle_and_spread_spreads() -> None:
    layout = plan(ClusterOptions(trainers=2, rollout_actors=3, reward_actors=1,
                                 placement="colocate", trainer_gpus=1, spread=True), 1)
    assert layout.strategy == "SPREAD"
    # bundle 0: trainer 0, rollout 0 and 2, reward 0; bundle 1: trainer 1, rollout 1
    assert layout.bundles == [{"CPU": 4, "GPU": 1}, {"CPU": 2, "GPU": 1}]
    assert [(s.role, s.index, s.bundle, s.gpus) for s in layout.slots] == [
        ("trainer", 0, 0, 0.25), ("rollout", 0, 0, 0.25), ("rollout", 2, 0, 0.25),
        ("reward", 0, 0, 0.25), ("trainer", 1, 1, 0.5), ("rollout", 1, 1, 0.5)]
    assert [s.index for s in layout.of("rollout")] == [0, 1, 2]
    with_reference = plan(ClusterOptions(trainers=2, placement="colocate", trainer_gpus=1), 0,
                          reference_actors=1)
    assert [(s.role, s.bundle, s.gpus) for s in with_reference.slots] == [
        ("trainer", 0, 0.3333), ("rollout", 0, 0.3333), ("reference", 0, 0.3333),
        ("trainer", 1, 1)]
    thirds = plan(ClusterOptions(trainers=1, rollout_actors=2, placement="colocate",
                                 trainer_gpus=1), 0)
    assert sum(s.gpus for s in thirds.slots) <= 1  # shares never exceed the bundle


def test_each_trainer_rank_gets_its_share_of_the_actors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r samples from generation actor r % M, scores with reward actor r % K and asks
    reference actor r % R; without reference actors the trainer keeps its own copy (None)."""
    pytest.importorskip("ray")
    from rewardloop.cluster.remote import Actor, RayRoles

    actors = {name: Actor(name, handle=None) for name in ("g0", "g1", "w0", "r0")}
    roles = RayRoles([actors["g0"], actors["g1"]], [actors["w0"]], {"rm": "rm-name"}, 5.0,
                     references=[actors["r0"]])
    monkeypatch.setenv("RANK", "3")
    generator = roles.generator(model=object(), tokenizer=None, settings=None)
    assert generator.own.label == "g1" and generator.sync.stale  # pushed before sampling
    reward = roles.reward_model("rm")
    assert reward is not None and reward.actor.label == "w0" and reward.name == "rm-name"
    assert roles.reward_model("other/dir") is None  # not a model the reward actors hold
    reference = roles.reference()
    assert reference is not None and reference.actor.label == "r0"
    assert RayRoles([actors["g0"]], [], {}, 5.0).reference() is None


def test_the_driver_merges_restarts_into_the_saved_summary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cluster.md: "The summary's `restarts` says how many it took": rank 0 wrote summary.json
    without it (only the driver counts restarts), and the driver adds it, keeping the rest."""
    pytest.importorskip("ray")
    from rewardloop.cluster.rl import record_restarts

    (tmp_path / "summary.json").write_text(json.dumps({"steps": 4, "reward_last": 0.5}))
    summary = record_restarts(tmp_path, {"steps": 4, "reward_last": 0.5}, 2)
    assert summary == {"steps": 4, "reward_last": 0.5, "restarts": 2}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left
    elsewhere = tmp_path / "elsewhere"  # --out the driver does not see: said, not a crash
    assert record_restarts(elsewhere, {"steps": 4}, 0)["restarts"] == 0
    assert "restarts=0 is not recorded" in caplog.text and not elsewhere.exists()


def _auth_records(emit: Any) -> list[str]:
    """The messages Ray's authentication logger passes on while ``emit()`` runs."""
    from rewardloop.cluster.connect import AUTH_LOGGER

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(AUTH_LOGGER)
    logger.addHandler(handler)
    try:
        emit()
    finally:
        logger.removeHandler(handler)
    return seen


def test_rays_token_auth_notice_is_dropped_and_its_other_warnings_kept() -> None:
    pytest.importorskip("ray")
    from ray._private.authentication import authentication_token_setup as auth

    from rewardloop.cluster.connect import TOKEN_AUTH_ON, quiet_token_auth_notice

    def both() -> None:
        with quiet_token_auth_notice():
            auth._warn_token_auth_enabled()
            auth._warn_token_auth_disabled()

    inside = _auth_records(both)
    assert len(inside) == 1 and inside[0].startswith("Token authentication is disabled")
    # Ray's own text: an upgrade that rewords it fails here, not silently on the terminal
    (after,) = _auth_records(auth._warn_token_auth_enabled)  # the filter is gone afterwards
    assert after.startswith(TOKEN_AUTH_ON)


@pytest.mark.slow
def test_a_local_ray_starts_without_the_token_auth_notice(tmp_path: Path) -> None:
    """The audit's noise: every `--ray` run printed Ray's "Token authentication is enabled"."""
    pytest.importorskip("ray")
    code = ("from rewardloop.cluster.connect import connect\nimport ray\n"
            "assert connect('local', cpus=1)\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    res = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)},
                         text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "Token authentication is enabled" not in res.stderr + res.stdout
