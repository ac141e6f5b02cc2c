"""The ``rewardloop`` command line.

Thin by design: each module in this package parses flags into a config and calls the library.
A module joins the CLI by defining ``register(app: typer.Typer) -> None`` (and an optional
``ORDER`` integer for its place in ``--help``); it must not import torch or other heavy modules
at import time, so ``rewardloop --help`` stays fast. Only this package prints.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import pkgutil
from typing import Any

import typer
from typer.core import TyperGroup

from rewardloop import __version__
from rewardloop.errors import TrainingError, UserError


class _Root(TyperGroup):
    """Turns a user's mistake into one line on stderr and its exit status (2; 3 for training
    that cannot go on), here rather than in ``main`` so every caller (the console script,
    ``CliRunner`` in tests, ``python -m``) sees the same behaviour."""

    # ctx is click's Context, which recent typer versions vendor under a private name.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except TrainingError as exc:
            typer.echo(f"training stopped: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(f"interrupted{_RESUME_HINTS.get(ctx.invoked_subcommand, '')}", err=True)
            raise typer.Exit(130) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            typer.echo(f"error: no space left on the device{where}; what was written before "
                       f"is kept: free some space and run the command again"
                       f"{_RESUME_HINTS.get(ctx.invoked_subcommand, '')}", err=True)
            raise typer.Exit(1) from None


_RESUME_HINTS = {
    "train": "; a run that saved checkpoints (--save-every N) continues from its last complete "
             "one with the same command and --resume",
    "loop": "; a loop continues where it stopped with `rewardloop loop --config "
            "WORKDIR/config.yaml`",
}


app = typer.Typer(
    cls=_Root,
    name="rewardloop",
    help=(
        "Fine-tune language models from human feedback: collect preferences (serve, tasks, "
        "simulate, quality), model them (train rm), optimise policies "
        "(train sft|dpo|grpo|rloo|ppo), evaluate (eval, report) and run it all in rounds "
        "(loop). Start with `rewardloop demo`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rewardloop {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More log output (-v info, -vv debug)."
    ),
) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        # transformers/huggingface_hub print a progress bar and a load report for every model
        # they load; our own progress bars say what is happening. -v brings theirs back.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _register_all() -> None:
    modules = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        modules.append(importlib.import_module(f"{__name__}.{info.name}"))
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        module.register(app)


_register_all()


def main() -> None:
    """Console entry point. ``train ... --nproc N`` starts N processes of the same command."""
    import sys

    from rewardloop.cli._launch import launch, take_nproc
    from rewardloop.cli._ray import with_ray_address

    nproc, rest = take_nproc(with_ray_address(sys.argv[1:]))
    if nproc is not None and nproc > 1:
        if not rest or rest[0] != "train":
            typer.echo("error: --nproc applies to the train commands", err=True)
            raise SystemExit(2)
        if "--ray" in rest:
            typer.echo("error: --nproc starts processes on this machine, --ray actors on a "
                       "Ray cluster (--trainers N); give one or the other", err=True)
            raise SystemExit(2)
        raise SystemExit(launch(nproc, rest))
    sys.argv[1:] = rest
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun or --nproc, rank 0 reports; the others would repeat it (errors still
        # reach stderr from every rank).
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    app()
