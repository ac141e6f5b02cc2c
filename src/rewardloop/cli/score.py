"""``rewardloop score``: add reward-model scores to pairwise, candidates, ranking or
prompt/completion rows."""

from __future__ import annotations

from pathlib import Path

import typer

ORDER = 50


def register(app: typer.Typer) -> None:
    app.command("score")(score)


def score(
    rm: Path = typer.Option(..., "--rm", help="Reward model: a train rm run directory or its "
                            "model/ directory."),
    data: Path = typer.Option(..., "--data", help="Rows to score (JSONL, Parquet, Arrow or a "
                              "dataset folder): pairwise (adds "
                              "score_chosen/score_rejected), candidates or ranking (adds "
                              "scores), prompt/completion rows (adds score)."),
    output: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (atomically)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Answers per forward pass."),
    normalize: bool = typer.Option(False, "--normalize", help="Report (r - mean) / std with the "
                                   "model's reward_stats.json."),
    data_format: str | None = typer.Option(None, "--format", help="Format of --data; default: "
                                           "detected from the rows."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score answers with a reward model; ensembles add the std across heads (*_std)."""
    from rewardloop.cli._common import existing_data
    from rewardloop.score import score_file

    existing_data(data)
    rows = score_file(rm, data, output, batch_size=batch_size, normalize=normalize,
                      data_format=data_format, device=device)
    typer.echo(f"wrote {rows} scored rows to {output}")
