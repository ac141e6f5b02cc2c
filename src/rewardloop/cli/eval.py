"""``rewardloop eval``: a policy against a baseline; ``rewardloop eval arena``: human ratings."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import DB, resolve_db
from rewardloop.cli._flags import config_command
from rewardloop.eval.config import EvalConfig

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


def _human_line(row: dict[str, Any]) -> str:
    """What ``eval --judge human`` made: the arena tasks and how to judge and rate them, or
    that there is nothing to judge (every policy answer the same as the baseline's)."""
    skipped = row.get("identical_pairs_skipped", 0)
    if row["tasks"] + row.get("existing_tasks", 0) == 0:
        return (f"human: all {skipped} answer pairs were identical: nothing to judge (no arena "
                f"tasks in batch {row['arena_batch']})")
    same = f" ({skipped} identical answer pairs left out)" if skipped else ""
    return (f"human: {row['tasks']} arena tasks in batch {row['arena_batch']} of {row['db']}"
            f"{same}. Judge them in the browser with `rewardloop serve --db {row['db']}`, then "
            f"rate with `rewardloop eval arena --db {row['db']} --batch {row['arena_batch']}`.")


def _print_comparisons(result: dict[str, Any], out: Path) -> None:
    for row in result["comparisons"]:
        if "win_rate" in row:
            low, high = row["win_rate_ci"]
            typer.echo(f"{row['name']}: win rate {row['win_rate']:.3f} [{low:.3f}, {high:.3f}] "
                       f"({row['wins']} wins, {row['ties']} ties, {row['losses']} losses)")
        else:
            typer.echo(_human_line(row))
    if result.get("kl") is not None:
        typer.echo(f"KL(policy || baseline) per answer: {result['kl']:.4f}")
    lengths = result["length"]
    typer.echo(f"words per answer: policy {lengths['policy'].get('words_mean', 0):.1f}, "
               f"baseline {lengths['baseline'].get('words_mean', 0):.1f}")
    typer.echo(f"wrote {out / 'eval.json'}, samples.jsonl, config.yaml and summary.json")


def run_eval(cfg: EvalConfig, ctx: typer.Context, overwrite: bool) -> None:
    """Generate from --policy and --baseline, judge, and write eval.json, samples.jsonl,
    config.yaml and summary.json to a new or empty --out (or, with --overwrite, over an earlier
    eval's)."""
    from rewardloop.eval.evaluate import check_eval_out, evaluate

    check_eval_out(cfg.out, overwrite)  # before minutes of generation, not after
    result = evaluate(cfg)
    _print_comparisons(result, cfg.out)


# --overwrite is a flag of the command, not a field of EvalConfig: the loop, which also builds
# an EvalConfig, writes its own stage directories.
OVERWRITE = typer.Option(
    False, "--overwrite", help="Replace the files of an earlier eval in --out (eval.json, "
    "samples.jsonl, config.yaml, summary.json; nothing else in it is touched).")

eval_app.callback()(config_command(
    EvalConfig, run_eval, doc=run_eval.__doc__ or "",
    extra=[inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
           inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=OVERWRITE,
                             annotation=bool)],
    skip_if=lambda ctx, overwrite: ctx.invoked_subcommand is not None))


def _arena_target(out: Path) -> Path:
    """``out``/eval.json, checked before the store is read: no file in the way, and no eval.json
    but an earlier arena result (``ratings``) is replaced."""
    from rewardloop.errors import UserError
    from rewardloop.util.files import check_output_dir

    target = check_output_dir(out, flag="--out") / "eval.json"
    if target.exists():
        try:
            earlier = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not isinstance(earlier, dict) or "ratings" not in earlier:
            raise UserError(f"--out: {target} exists and is not an earlier `eval arena` "
                            "result; give another directory")
    return target


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
    out: Path | None = typer.Option(
        None, "--out", help="Also write the result to DIR/eval.json, which `rewardloop report "
        "DIR` shows (the win rate per annotator group, its alarms). An eval.json there from "
        "an earlier `eval arena --out` is replaced; one from `eval` is refused."),
) -> None:
    """Bradley–Terry ratings (Elo scale, bootstrap 95% intervals, ties as half wins) of the
    policies in judged arena tasks."""
    from rewardloop.eval.evaluate import store_arena

    target = _arena_target(out) if out is not None else None
    result = store_arena(resolve_db(db), batch, policy=policy, baseline=baseline, seed=seed)
    if target is not None:
        from rewardloop.util.files import atomic_write_text

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(result, indent=2) + "\n")
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
    for group, r in (result.get("by_group") or {}).items():
        low, high = r["win_rate_ci"]
        typer.echo(f"  group {group}: win rate {r['win_rate']:.3f} [{low:.3f}, {high:.3f}], "
                   f"{r['n']} battles")
    for alarm in result.get("group_alarms") or ():
        typer.echo(f"alarm: {alarm}")
