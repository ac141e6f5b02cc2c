"""The ``--ray`` flags of the online-RL commands; their help is ``ClusterOptions``' field
docstrings and defaults. ``--ray`` may come without an address (a local Ray for the run):
``with_ray_address`` spells that out before the command line is parsed."""

from __future__ import annotations

from typing import Any

import typer

from rewardloop.options import ClusterOptions, flag_help


def _help(name: str) -> str:
    return flag_help(ClusterOptions, name)


RAY = typer.Option(None, "--ray", metavar="[ADDRESS]",
                   help=_help("ray") + " See docs/cluster.md.")
TRAINERS = typer.Option(None, "--trainers", help=_help("trainers"))
ROLLOUT_ACTORS = typer.Option(None, "--rollout-actors", help=_help("rollout_actors"))
REWARD_ACTORS = typer.Option(None, "--reward-actors", help=_help("reward_actors"))
PLACEMENT = typer.Option(None, "--placement", help=_help("placement"))
SPREAD = typer.Option(None, "--spread/--pack", help=_help("spread"))
TRAINER_GPUS = typer.Option(None, "--trainer-gpus", help=_help("trainer_gpus"))
ROLLOUT_GPUS = typer.Option(None, "--rollout-gpus", help=_help("rollout_gpus"))
REWARD_GPUS = typer.Option(None, "--reward-gpus", help=_help("reward_gpus"))
ACTOR_CPUS = typer.Option(None, "--actor-cpus", help=_help("actor_cpus"))
MAX_RESTARTS = typer.Option(None, "--max-restarts", help=_help("max_restarts"))
ACTOR_TIMEOUT = typer.Option(None, "--actor-timeout", help=_help("actor_timeout"))
ASYNC_ROLLOUT = typer.Option(None, "--async-rollout/--no-async-rollout",
                             help=_help("async_rollout"))


def with_ray_address(argv: list[str]) -> list[str]:
    """``argv`` with ``local`` after a ``--ray`` that has no address (at the end, or followed
    by another flag)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("local")
    return out


BATCH_ACTORS = typer.Option(1, "--actors", help="With --ray: actors the rows are dealt over "
                            "(each loads the model).")
BATCH_GPUS = typer.Option(0.0, "--actor-gpus", help="With --ray: GPUs of each actor (0: CPU).")
BATCH_CPUS = typer.Option(1.0, "--actor-cpus", help=_help("actor_cpus"))
BATCH_TIMEOUT = typer.Option(600, "--actor-timeout", help="With --ray: seconds to wait for an "
                             "actor's chunk before stopping (the finished chunks are saved: "
                             "rerun to resume).")


def run_on_ray(kind: str, cfg: Any) -> dict[str, Any]:
    """The summary of ``cfg``'s run on Ray (exit 2 with the install line without Ray)."""
    from rewardloop.cluster import require_ray

    require_ray()
    from rewardloop.cluster.rl import train_on_ray

    return train_on_ray(kind, cfg)


def batch_module() -> Any:
    """``rewardloop.cluster.batch`` (exit 2 with the install line without Ray)."""
    from rewardloop.cluster import require_ray

    require_ray()
    from rewardloop.cluster import batch

    return batch
