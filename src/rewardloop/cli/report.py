"""``rewardloop report DIR... -o report.html``: an offline HTML report of run directories."""

from __future__ import annotations

from pathlib import Path

import typer

ORDER = 80


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: list[Path] = typer.Argument(
            ..., help="Run directories (each with summary.json / metrics.jsonl; eval.json, "
            "quality.json and samples.jsonl are used when present)."
        ),
        out: Path = typer.Option(
            Path("report.html"), "--out", "-o", help="HTML file to write (self-contained)."
        ),
        title: str = typer.Option("rewardloop report", "--title", help="Report title."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace an existing --out that is not an earlier "
            "report (never a file inside a run directory)."
        ),
    ) -> None:
        """Build a self-contained HTML report (figures embedded, readable offline). An earlier
        report at --out is replaced; any other file only with --overwrite."""
        from rewardloop.eval.report import build_report

        path = build_report(runs, out, title=title, overwrite=overwrite)
        typer.echo(f"wrote {path}")
