"""``rewardloop loop``: rounds of feedback and training; ``rewardloop loop status``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import headline_lines
from rewardloop.cli._flags import config_command
from rewardloop.errors import UserError
from rewardloop.loop_config import LoopConfig

ORDER = 70

loop_app = typer.Typer(
    help=(
        "Run rounds of generate -> tasks -> judgments (people through `rewardloop serve`, or a "
        "simulated pool) -> reward model -> policy -> eval, each stage in WORKDIR/round-N/. "
        "Run it again to resume an interrupted run at its first unfinished stage. "
        "`loop status` shows the rounds. See docs/loop.md and examples/loop.yaml."
    ),
    invoke_without_command=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(loop_app, name="loop")


def _cell(state: str, figures: dict[str, Any], stage: str) -> str:
    if state != "done":
        return state
    key = {"generate": "rows", "tasks": "tasks", "feedback": "judgments",
           "rm": "eval_accuracy", "policy": "reward_last", "eval": "gold_win_rate"}[stage]
    value = figures.get(key)
    if isinstance(value, float):
        return f"done {key}={value:.3f}"
    return f"done {key}={value}" if value is not None else "done"


def run_loop_command(cfg: LoopConfig, ctx: typer.Context) -> None:
    """Run or resume the loop described by --config (a YAML file; see examples/loop.yaml) and
    the flags, which override its keys."""
    from rewardloop.loop import run_loop
    from rewardloop.util.files import check_output_dir

    check_output_dir(cfg.workdir, flag="--workdir")
    summary = run_loop(cfg)
    for line in headline_lines(summary, ("gold_win_rate", "rm_win_rate", "human_win_rate",
                                         "rm_accuracy", "kl")):
        typer.echo(line)
    for alarm in summary["alarms"]:
        typer.echo(f"alarm: {alarm}")
    if summary.get("best"):
        typer.echo(f"best policy: round {summary['best']['round']} ({summary['best']['model']})")
    typer.echo(f"wrote {cfg.workdir / 'summary.json'}; `rewardloop loop status --workdir "
               f"{cfg.workdir}` shows every stage")


# The trainers' and the engine's option mappings are YAML keys only (nested configs).
loop_app.callback()(config_command(
    LoopConfig, run_loop_command, doc=run_loop_command.__doc__ or "",
    extra=[inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)],
    skip=("rm_options", "policy_options", "generation"),
    skip_if=lambda ctx: ctx.invoked_subcommand is not None))


@loop_app.command("status")
def status(
    workdir: Path = typer.Option(..., "--workdir", help="Directory of a loop run."),
) -> None:
    """A table of rounds x stages: done (with a key figure), partial (interrupted) or pending."""
    from rich.table import Table

    from rewardloop.cli._common import table_console
    from rewardloop.loop_config import STAGES, loop_status

    rounds = loop_status(workdir)
    if not rounds:
        raise UserError(f"{workdir}: no rounds yet (no round-N directories)")
    table = Table(title=f"loop {workdir}")
    table.add_column("round")
    for stage in STAGES:
        table.add_column(stage)
    for r in rounds:
        table.add_row(str(r["round"]), *[_cell(r["stages"][s], r["figures"].get(s, {}), s)
                                          for s in STAGES])
    table_console().print(table)
