"""``rewardloop eval``: a policy against a baseline; ``rewardloop eval arena``: human ratings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import CHAT_TEMPLATE, CONFIG, DB, SEED, resolve_db
from rewardloop.cli._engine import (
    GENERATOR,
    HF_DECODING,
    VLLM_MAX_LEN,
    VLLM_MEMORY,
    VLLM_MODE,
    VLLM_SERVER,
    VLLM_SLEEP,
    VLLM_TP,
)
from rewardloop.errors import UserError

ORDER = 60

eval_app = typer.Typer(
    help=(
        "Evaluate a policy against a baseline: both answer the same prompts, judges score "
        "them, and eval.json gets the win rate with a bootstrap 95% interval (ties half), the "
        "KL of the policy to the baseline and answer lengths. `eval arena` rates policies from "
        "people's judgments of arena tasks. See docs/loop.md."
    ),
    invoke_without_command=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


def _print_comparisons(result: dict[str, Any], out: Path) -> None:
    for row in result["comparisons"]:
        if "win_rate" in row:
            low, high = row["win_rate_ci"]
            typer.echo(f"{row['name']}: win rate {row['win_rate']:.3f} [{low:.3f}, {high:.3f}] "
                       f"({row['wins']} wins, {row['ties']} ties, {row['losses']} losses)")
        else:
            typer.echo(f"human: {row['tasks']} arena tasks in batch {row['arena_batch']} of "
                       f"{row['db']}. Judge them in the browser with `rewardloop serve --db "
                       f"{row['db']}`, then rate with `rewardloop eval arena --db {row['db']} "
                       f"--batch {row['arena_batch']}`.")
    if result.get("kl") is not None:
        typer.echo(f"KL(policy || baseline) per answer: {result['kl']:.4f}")
    lengths = result["length"]
    typer.echo(f"words per answer: policy {lengths['policy'].get('words_mean', 0):.1f}, "
               f"baseline {lengths['baseline'].get('words_mean', 0):.1f}")
    typer.echo(f"wrote {out / 'eval.json'} and {out / 'samples.jsonl'}")


@eval_app.callback()
def evaluate(
    ctx: typer.Context,
    policy: str | None = typer.Option(
        None, "--policy", help="Policy to evaluate: a model dir (e.g. RUN/model) or hub id."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="Policy to compare against (e.g. the SFT model)."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Prompts (JSONL, Parquet, Arrow or a dataset folder): "
        "`prompt` or `messages` per row."),
    judge: list[str] | None = typer.Option(
        None, "--judge", help="Judge, repeatable: a reward-model run dir (or its model/), "
        "package.module:function (TRL reward signature), or `human` (arena tasks in --db for "
        "`rewardloop serve`). The first gives the headline win rate."),
    out: Path | None = typer.Option(
        None, "--out", help="Directory to write eval.json and samples.jsonl to."),
    n: int | None = typer.Option(None, "-n", "--n", help="Use only the first N prompts."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Longest answer in tokens. Default 64."),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Sampling temperature of both policies. Default 1."),
    seed: int | None = SEED,
    db: str | None = DB,
    arena_batch: str | None = typer.Option(
        None, "--arena-batch", help="Batch name of the human judge's arena tasks. "
        "Default eval-arena."),
    chat_template: Path | None = CHAT_TEMPLATE,
    generator: str | None = GENERATOR, hf_decoding: str | None = HF_DECODING,
    vllm_mode: str | None = VLLM_MODE,
    vllm_gpu_memory_utilization: float | None = VLLM_MEMORY,
    vllm_tensor_parallel_size: int | None = VLLM_TP, vllm_sleep: bool | None = VLLM_SLEEP,
    vllm_server: str | None = VLLM_SERVER, vllm_max_model_len: int | None = VLLM_MAX_LEN,
    config: Path | None = CONFIG,
) -> None:
    """Generate from --policy and --baseline, judge, and write eval.json + samples.jsonl."""
    if ctx.invoked_subcommand is not None:
        return
    from rewardloop.config import load_config
    from rewardloop.eval.evaluate import EvalConfig
    from rewardloop.eval.evaluate import evaluate as run_eval

    judges = tuple(judge) if judge else None
    missing = [flag for flag, value in (("--policy", policy), ("--baseline", baseline),
                                         ("--prompts", prompts), ("--out", out))
               if value is None and config is None]
    if missing:
        raise UserError(f"eval needs {', '.join(missing)} (or a --config file giving them)")
    cfg = load_config(EvalConfig, config, policy=policy, baseline=baseline, prompts=prompts,
                      judges=judges, out=out, n=n, max_new_tokens=max_new_tokens,
                      temperature=temperature, seed=seed, db=db, arena_batch=arena_batch,
                      generator=generator, hf_decoding=hf_decoding, vllm_mode=vllm_mode,
                      vllm_gpu_memory_utilization=vllm_gpu_memory_utilization,
                      vllm_tensor_parallel_size=vllm_tensor_parallel_size,
                      vllm_sleep=vllm_sleep, vllm_server=vllm_server,
                      vllm_max_model_len=vllm_max_model_len,
                      chat_template=chat_template)
    result = run_eval(cfg)
    _print_comparisons(result, cfg.out)


@eval_app.command("arena")
def arena(
    db: str | None = DB,
    batch: str | None = typer.Option(
        None, "--batch", help="Only battles from this batch's tasks. Default: all arena tasks."),
    policy: str | None = typer.Option(
        None, "--policy", help="With --baseline: also the direct win rate of this model."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="The model --policy's direct win rate is measured against."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
) -> None:
    """Bradley–Terry ratings (Elo scale, bootstrap 95% intervals, ties as half wins) of the
    policies in judged arena tasks."""
    from rewardloop.eval.evaluate import store_arena

    result = store_arena(resolve_db(db), batch, policy=policy, baseline=baseline, seed=seed)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"{result['battles']} battles")
    ranked = sorted(result["ratings"].items(), key=lambda kv: -kv[1]["rating"])
    for name, r in ranked:
        typer.echo(f"{name}\t{r['rating']:.0f}\t[{r['ci_low']:.0f}, {r['ci_high']:.0f}]\t"
                   f"{r['battles']} battles")
    if "win_rate" in result:
        low, high = result["win_rate_ci"]
        typer.echo(f"{policy} vs {baseline}: win rate {result['win_rate']:.3f} "
                   f"[{low:.3f}, {high:.3f}]")
