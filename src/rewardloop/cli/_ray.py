"""``--ray`` on the command line: the address a bare ``--ray`` means, the flags of ``score``
(whose options are not a config dataclass; their help is ``RayJobOptions``'), and the lazy
entry points into ``rewardloop.cluster`` (Ray is imported only when a command runs with
``--ray``; without it installed that is exit 2 with the install line)."""

from __future__ import annotations

from typing import Any

import typer

from rewardloop.options import RayJobOptions, flag_help


def _help(name: str) -> str:
    return flag_help(RayJobOptions, name)


RAY = typer.Option(None, "--ray", metavar="[ADDRESS]", help=_help("ray") + " See "
                   "docs/cluster.md.")
# The help says the default already (flag_help): typer's own "[default: ...]" would repeat it.
BATCH_ACTORS = typer.Option(1, "--actors", help=_help("actors"), show_default=False)
BATCH_GPUS = typer.Option(0.0, "--actor-gpus", help=_help("actor_gpus"), show_default=False)
BATCH_CPUS = typer.Option(1.0, "--actor-cpus", help=_help("actor_cpus"), show_default=False)
BATCH_TIMEOUT = typer.Option(600, "--actor-timeout", help=_help("actor_timeout") + " The "
                             "finished chunks are saved: rerun to resume.", show_default=False)


def with_ray_address(argv: list[str]) -> list[str]:
    """``argv`` with ``local`` after a ``--ray`` that has no address (at the end, or followed
    by another flag)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            out.append("local")
    return out


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
