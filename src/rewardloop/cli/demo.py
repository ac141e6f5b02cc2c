"""``rewardloop demo``: the whole loop on the synthetic support task, on a CPU, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from rewardloop.cli._common import headline_lines

ORDER = 1


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    workdir: Path = typer.Option(
        Path("demo-run"), "--workdir", help="Directory to write the demo's stages, "
        "report.html and summary.json to; run again to resume."),
    fast: bool = typer.Option(
        False, "--fast", help="Shrink everything to finish in about a minute (a smoke test; "
        "the figures mean little)."),
    seed: int = typer.Option(0, "--seed", help="Seed of data, models, annotators and sampling."),
) -> None:
    """SFT a tiny model, collect simulated preferences, train a reward model, optimise with GRPO,
    and evaluate against SFT with a hidden gold judge; writes WORKDIR/report.html."""
    from rewardloop.demo import run_demo
    from rewardloop.util.files import check_output_dir

    check_output_dir(workdir, flag="--workdir")
    summary = run_demo(workdir, fast=fast, seed=seed)
    typer.echo(f"demo finished in {summary['wall_s']:.0f}s")
    rate, ci = summary.get("gold_win_rate"), summary.get("gold_win_rate_ci")
    if rate is not None and ci:
        typer.echo(f"RLHF vs SFT, judged by the hidden gold judge: win rate {rate:.3f} "
                   f"[{ci[0]:.3f}, {ci[1]:.3f}]")
    for line in headline_lines(summary, ("human_win_rate", "rm_win_rate", "rm_accuracy", "kl")):
        typer.echo(line)
    for alarm in summary["alarms"]:
        typer.echo(f"alarm: {alarm}")
    typer.echo(f"report: {summary['report']}")
    typer.echo(f"summary: {workdir / 'summary.json'}")
    db = f"sqlite:///{workdir / 'loop.db'}"
    typer.echo(f"next: be an annotator yourself -- `rewardloop users add NAME --role annotator "
               f"--db {db}` and `rewardloop serve --db {db}`; run your own rounds with "
               "`rewardloop loop --config examples/loop.yaml`.")
