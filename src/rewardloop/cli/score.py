"""``rewardloop score``: add reward-model scores to pairwise, candidates, ranking or
prompt/completion rows."""

from __future__ import annotations

from pathlib import Path

import typer

from rewardloop.cli._ray import (
    BATCH_ACTORS,
    BATCH_CPUS,
    BATCH_GPUS,
    BATCH_TIMEOUT,
    RAY,
    batch_module,
)

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
                                   "model's reward_stats.json. A --group-heads model's reward "
                                   "is its heads' equal mix, each head normalised by its own "
                                   "stats, with or without this flag."),
    data_format: str | None = typer.Option(None, "--format", help="Format of --data; default: "
                                           "detected from the rows."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    ray: str | None = RAY, actors: int = BATCH_ACTORS, actor_gpus: float = BATCH_GPUS,
    actor_cpus: float = BATCH_CPUS, actor_timeout: int = BATCH_TIMEOUT,
) -> None:
    """Score answers with a reward model; ensembles add the std across heads (*_std). With
    --ray the answers are dealt over --actors reward-model actors (docs/cluster.md)."""
    from rewardloop.cli._common import existing_data
    from rewardloop.score import score_file

    existing_data(data)
    remote = None
    if ray:
        remote = batch_module().score_pairs_on_ray(
            rm, output, address=ray, actors=actors, gpus=actor_gpus, cpus=actor_cpus,
            batch_size=batch_size, normalize=normalize, device=device, timeout_s=actor_timeout)
    rows = score_file(rm, data, output, batch_size=batch_size, normalize=normalize,
                      data_format=data_format, device=device, score_pairs=remote)
    typer.echo(f"wrote {rows} scored rows to {output}")
