"""The stages of one loop round (``loop.STAGE_TABLE``), each a function of the round and its
directory.

Each returns the figures its ``DONE.json`` marker records (``loop_config.run_stage`` writes it
last). They
call the library's own pieces (rollout, the task service, the simulator, the trainers,
``eval.evaluate``) -- no CLI -- and are safe to run again after an interruption: task creation
checks its batch first, the simulator only judges open tasks, trainers resume from their
checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rewardloop.data.formats import read_as, write_records
from rewardloop.data.load import load_pairs
from rewardloop.data.records import CandidatesRecord, PairRecord, PromptRecord
from rewardloop.data.schema import Batch, ComparisonTask, Judgment, TaskItem
from rewardloop.data.store import Store
from rewardloop.errors import UserError
from rewardloop.eval.alarms import AlarmSettings, check_alarms
from rewardloop.eval.evaluate import (
    HUMAN,
    EvalConfig,
    evaluate,
    load_for_generation,
    sample_answers,
    store_arena,
    write_eval,
)
from rewardloop.eval.report import read_metrics
from rewardloop.feedback import audience as A
from rewardloop.feedback import select as S
from rewardloop.feedback import tasks as T
from rewardloop.feedback.quality import annotators_from_db, quality_report
from rewardloop.feedback.simulate import ensure_annotators, load_gold, load_pool, simulate
from rewardloop.loop_config import LoopConfig, read_marker, resume_command, round_dir
from rewardloop.train.checkpoint import list_checkpoints
from rewardloop.util.files import atomic_write_text

if TYPE_CHECKING:
    from rewardloop.train.comparisons import StoredAnnotators

log = logging.getLogger(__name__)

class RoundContext:
    """Where round ``n`` reads from and writes to."""

    def __init__(self, cfg: LoopConfig, n: int) -> None:
        self.cfg, self.n = cfg, n
        self.dir = round_dir(cfg.workdir, n)

    @property
    def batch(self) -> str:
        return f"{self.cfg.batch_prefix}round-{self.n}"

    @property
    def arena_batch(self) -> str:
        return f"{self.cfg.batch_prefix}arena-round-{self.n}"

    @property
    def policy(self) -> str:
        """The policy this round starts from: the previous round's result, else the start."""
        if self.n == 1:
            return self.cfg.policy
        return str(round_dir(self.cfg.workdir, self.n - 1) / "policy" / "model")

    @property
    def previous_rm(self) -> str | None:
        if self.n == 1:
            return None
        return str(round_dir(self.cfg.workdir, self.n - 1) / "rm" / "model")

    @property
    def rm(self) -> Path:
        return self.dir / "rm"

    def store(self) -> Store:
        return Store(self.cfg.db_url)


def _trainer_flags(stage_dir: Path, report_to: tuple[str, ...]) -> dict[str, Any]:
    """Resume a trainer that left checkpoints, otherwise start it afresh in ``stage_dir``;
    either way reporting to the loop's trackers."""
    if list_checkpoints(stage_dir):  # complete ones: a half-written one is no place to resume
        return {"resume": True, "report_to": report_to}
    return {"overwrite": True, "report_to": report_to}


# -- generate -------------------------------------------------------------------------------


def stage_generate(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """Sample ``responses_per_prompt`` answers from the current policy for the round's prompts
    (``candidates.jsonl``); rows with fewer than two distinct answers are dropped."""
    cfg = ctx.cfg
    records = read_as(cfg.prompts, "prompts", PromptRecord)
    rng = random.Random(f"{cfg.seed}:{ctx.n}")
    chosen = rng.sample(records, min(cfg.prompts_per_round, len(records)))
    model, tokenizer = load_for_generation(ctx.policy)
    k = cfg.responses_per_prompt
    answers = sample_answers(model, tokenizer, [r.prompt for r in chosen], n=k,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             seed=cfg.seed + ctx.n, engine=cfg.engine(),
                             model_path=str(ctx.policy))
    rows = []
    for i, record in enumerate(chosen):
        distinct = list(dict.fromkeys(t for t in answers.texts[i * k:(i + 1) * k] if t.strip()))
        if len(distinct) >= 2:
            rows.append(CandidatesRecord(record.prompt, distinct,
                                         [f"round-{ctx.n - 1}"] * len(distinct), record.id))
    if not rows:
        raise UserError(f"round {ctx.n}: the policy gave identical answers to every prompt; "
                        "raise temperature or responses_per_prompt")
    write_records(out / "candidates.jsonl", "candidates", rows)
    return {"prompts": len(chosen), "rows": len(rows),
            "responses": sum(len(r.responses) for r in rows)}


# -- tasks and feedback ---------------------------------------------------------------------------


def stage_tasks(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """Comparison tasks for every pair of a row's answers, in batch ``round-N``; with
    ``for_groups`` aimed at the annotator groups behind. A batch that already has tasks (a
    creation that committed before an interruption) is kept as is."""
    rows = read_as(ctx.dir / "generate" / "candidates.jsonl", "candidates", CandidatesRecord)
    store = ctx.store()
    figures: dict[str, Any] = {"batch": ctx.batch, "overlap": ctx.cfg.overlap}
    try:
        with store.write() as session:
            batch = T.get_or_create_batch(session, ctx.batch)
            count = T.batch_progress(session, batch)["tasks"]
            if count:
                _check_own_batch(ctx, session, batch, rows)
            else:
                planned = S.Plan([S.PlannedTask("select", r, a, b, ctx.cfg.overlap)
                                  for r, a, b in S.candidate_pairs(rows)])
                if ctx.cfg.for_groups is not None:
                    planned, figures["aiming"] = aim_tasks(ctx.cfg, session, planned)
                    log.info("round %d: %s", ctx.n, figures["aiming"])
                count = len(S.create_planned_tasks(session, planned, rows, batch=batch))
            figures.update(tasks=count, aimed=_audiences(session, batch))
    finally:
        store.dispose()
    return figures


def _check_own_batch(ctx: RoundContext, session: Session, batch: Batch,
                     rows: list[CandidatesRecord]) -> None:
    """UserError when ``batch`` holds tasks on answers this round never sampled: another
    loop's round of the same name in a shared store (the same prompts file and seed draw the
    same prompts, so answers tell them apart), whose judgments this loop would train on."""
    ours = []
    for row in rows:
        prompt = (T.get_or_create_prompt(session, messages=row.prompt)
                  if isinstance(row.prompt, list)
                  else T.get_or_create_prompt(session, text=str(row.prompt)))
        ours += [T.get_or_create_response(session, prompt, text) for text in row.responses]
    session.flush()
    ids = {r.id for r in ours}
    theirs = set(session.scalars(select(TaskItem.response_id)
                                 .join(ComparisonTask, ComparisonTask.id == TaskItem.task_id)
                                 .where(ComparisonTask.batch_id == batch.id)))
    if not theirs <= ids:
        raise UserError(f"batch {ctx.batch!r} of the store (db) holds tasks on answers this "
                        f"loop's round {ctx.n} did not sample: another loop's round of that "
                        "name. Give each loop sharing a db its own batch_prefix (e.g. "
                        "batch_prefix: exp-b/), or its own db")


def _audiences(session: Session, batch: Batch) -> dict[str, int]:
    """Tasks of ``batch`` per audience (group); tasks for everyone are not counted."""
    return {str(g): int(n) for g, n in session.execute(
        select(ComparisonTask.audience, func.count())
        .where(ComparisonTask.batch_id == batch.id, ComparisonTask.audience.is_not(None))
        .group_by(ComparisonTask.audience).order_by(ComparisonTask.audience))}


def aim_tasks(cfg: LoopConfig, session: Session, planned: S.Plan) -> tuple[S.Plan, str]:
    """``for_groups``: ``planned`` aimed at the groups behind (``feedback.audience``) and the
    line saying how. Until the store holds a judgment nobody is behind, and ``uncertain`` has no
    agreement to weigh by: the levels are then the open aimed labels alone (``fewest``).
    Refused in one line when a group has fewer active annotators than ``overlap``: the tasks
    aimed at it could never be completed, and the feedback stage would wait for them."""
    assert cfg.for_groups is not None  # the caller's condition
    judged = session.scalar(select(func.count()).select_from(Judgment))
    how = cfg.for_groups if judged else "fewest"
    needs = A.needs_from_store(session, how)
    short = [n for n in needs if n.members < cfg.overlap]
    if short:
        raise UserError(
            f"for_groups: group {short[0].group!r} has {short[0].members} active annotator(s), "
            f"fewer than the {cfg.overlap} each task wants (overlap), so tasks aimed at it "
            "could never be completed; lower overlap or add annotators to the group")
    aimed = A.aim(needs, planned)
    return aimed, A.describe(needs, aimed, how)


def check_for_groups(cfg: LoopConfig) -> None:
    """Refuse (one line) a ``for_groups`` the store cannot serve before any sampling: what the
    tasks stage would find now. A simulated pool's annotators are registered first (the
    feedback stage would register them anyway), so that their groups count."""
    store = Store(cfg.db_url)
    try:
        if cfg.pool is not None:
            ensure_annotators(store, load_pool(cfg.pool))
        with store.read() as session:
            aim_tasks(cfg, session, S.Plan())
    finally:
        store.dispose()


def check_judges(cfg: LoopConfig) -> None:
    """Refuse (one line) a pool file or a gold function that cannot be loaded before any
    sampling: the feedback stage, the policy stage's gold monitor and the eval stage would
    each find it only after a round's generation."""
    if cfg.pool is not None:
        load_pool(cfg.pool)
    for spec in dict.fromkeys(s for s in (cfg.pool_gold, cfg.gold) if s):
        load_gold(spec)


def _progress(store: Store, batch: str) -> dict[str, Any]:
    with store.read() as session:
        row = session.query(Batch).filter(Batch.name == batch).one()
        return T.batch_progress(session, row)


def stage_feedback(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """Judgments for the round's batch: from the simulated pool, or from people (poll the store
    until ``min_judgments`` arrive or ``wait_timeout_s`` passes)."""
    cfg = ctx.cfg
    tasks = read_marker(ctx.dir / "tasks") or {}
    needed = cfg.min_judgments or int(tasks.get("figures", {}).get("tasks", 0)) * cfg.overlap
    store = ctx.store()
    try:
        if cfg.pool is not None:
            simulate(store, load_pool(cfg.pool), cfg.pool_gold or cfg.gold or "",
                     batch=ctx.batch, seed=cfg.seed + ctx.n)
        deadline = time.monotonic() + cfg.wait_timeout_s
        progress = _progress(store, ctx.batch)
        while progress["judgments"] < needed:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"round {ctx.n}: {progress['judgments']} of {needed} judgments arrived in "
                    f"batch {ctx.batch} within {cfg.wait_timeout_s:g}s. Judge the tasks with "
                    f"`rewardloop serve --db {store.safe_url}`, then run "
                    f"`{resume_command(cfg.workdir)}`: it resumes here")
            log.info("round %d: %d of %d judgments; waiting", ctx.n, progress["judgments"],
                     needed)
            time.sleep(cfg.poll_s)
            progress = _progress(store, ctx.batch)
    finally:
        store.dispose()
    return {"judgments": progress["judgments"], "needed": needed, "tasks": progress["tasks"],
            "annotators": len(progress["annotators"])}


# -- reward model -------------------------------------------------------------------------------


def _export_pairs(ctx: RoundContext, out: Path) -> int:
    """Every round's judged pairs so far, in one file: the reward-model trainer holds part of it
    out (``--eval-fraction``, by prompt and stratified by annotator group)."""
    store = ctx.store()
    try:
        pairs = [p for n in range(1, ctx.n + 1)
                 for p in load_pairs(store, batch=RoundContext(ctx.cfg, n).batch)
                 if not p.tie]
    finally:
        store.dispose()
    if len({json.dumps(p.prompt) for p in pairs}) < 2:
        raise UserError(f"round {ctx.n}: too few judged pairs ({len(pairs)}) to train and "
                        "evaluate a reward model; raise prompts_per_round")
    write_records(out / "pairs.jsonl", "trl", pairs)
    return len(pairs)


FROZEN = ("pairs.jsonl", "quality.json", "annotators.json")
"""What the rm stage exports before training: a resumed trainer must see the same data (people
may have judged more since), so once its first checkpoint exists they are read, not redone."""


def _rm_inputs(ctx: RoundContext, data: Path, cfg: Any
               ) -> tuple[int, dict[str, Any], StoredAnnotators]:
    """(pairs, quality report, what the store knows of the annotators) of the round: exported
    from the store, or, when the trainer ``cfg`` resumes from a checkpoint, the files it started
    from."""
    if cfg.resume and all((data / name).is_file() for name in FROZEN):
        pairs = sum(1 for line in (data / "pairs.jsonl").open(encoding="utf-8") if line.strip())
        frozen = json.loads((data / "annotators.json").read_text(encoding="utf-8"))
        stored = (frozen["weights"], set(frozen["flagged"]), frozen["groups"])
        return pairs, json.loads((data / "quality.json").read_text(encoding="utf-8")), stored
    n_pairs = _export_pairs(ctx, data)
    store = ctx.store()
    try:
        report = quality_report(store).to_json()
    finally:
        store.dispose()
    weights, flagged, groups = annotators_from_db(
        ctx.cfg.db_url, weights=cfg.weighting == "reliability", flagged=cfg.exclude_flagged)
    atomic_write_text(data / "quality.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(data / "annotators.json", json.dumps(
        {"weights": weights, "flagged": sorted(flagged), "groups": groups}, indent=2) + "\n")
    return n_pairs, report, (weights, flagged, groups)


def stage_rm(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """Export judgments and a quality report, then train the reward model (warm start from the
    previous round's), without the judgments of flagged annotators, evaluated on held-out
    prompts every few steps and saved at its best step. A trainer resumed from its checkpoint
    trains on the exports it started with (``FROZEN``)."""
    # The trainers import torch (seconds): loaded when a stage runs, not for `loop status`.
    from rewardloop.train.reward import train_rm

    data = ctx.dir / "data"
    data.mkdir(exist_ok=True)
    cfg = ctx.cfg.rm_config(model=ctx.previous_rm or ctx.policy, data=data / "pairs.jsonl",
                            out=out, seed=ctx.cfg.seed + ctx.n,
                            **_trainer_flags(out, ctx.cfg.report_to))
    n_pairs, report, stored = _rm_inputs(ctx, data, cfg)
    flagged = sorted(n for n, a in report["annotators"].items() if a["flags"])
    summary = train_rm(cfg, stored)
    # The saved model is the best step's: its figures are the round's.
    best = {k: summary[f"best_{k}"] for k in ("eval_accuracy", "eval_ece")
            if f"best_{k}" in summary}
    return {"pairs": n_pairs, "train_pairs": summary["train_comparisons"],
            "eval_pairs": summary.get("eval_comparisons"), "flagged": flagged,
            "krippendorff_alpha": report.get("krippendorff_alpha"),
            **{k: summary[k] for k in ("eval_accuracy", "eval_ece", "length_correlation",
                                       "dropped_flagged", "best_step", "label_ceiling",
                                       "label_ceiling_upper") if k in summary},
            "final_eval_accuracy": summary.get("eval_accuracy"), **best}


# -- policy -------------------------------------------------------------------------------------


def _rl_alarms(ctx: RoundContext, run_dir: Path) -> list[str]:
    return check_alarms(read_metrics(run_dir / "metrics.jsonl"), AlarmSettings(
        proxy_key="reward/mean", held_out_keys=("gold/mean",), kl_key="kl_seq_k1",
        length_key="completion_length_mean", window=ctx.cfg.alarm_window,
        max_kl=ctx.cfg.max_kl, max_length_ratio=ctx.cfg.max_length_ratio))


def _dpo_pairs(ctx: RoundContext) -> Path:
    """The round's candidate answers, best and worst by the reward model, as DPO pairs."""
    from rewardloop.rewards import Rewards, RewardSpec  # imports torch: only when it runs

    rows = read_as(ctx.dir / "generate" / "candidates.jsonl", "candidates", CandidatesRecord)
    rm = Rewards([RewardSpec(str(ctx.rm))])
    pairs = []
    for row in rows:
        scores = rm([row.prompt] * len(row.responses), row.responses,
                    has_eos=[True] * len(row.responses),
                    completion_ids=[[] for _ in row.responses]).total.tolist()
        best, worst = max(range(len(scores)), key=scores.__getitem__), \
            min(range(len(scores)), key=scores.__getitem__)
        if scores[best] > scores[worst]:
            pairs.append(PairRecord(row.prompt, row.responses[best], row.responses[worst],
                                    margin=scores[best] - scores[worst]))
    path = ctx.dir / "dpo_pairs.jsonl"
    write_records(path, "trl", pairs)
    return path


def stage_policy(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """Optimise the policy against the round's reward model (or by online DPO on its labels)."""
    cfg = ctx.cfg
    flags = _trainer_flags(out, cfg.report_to)
    # Each trainer imports torch: only the chosen one is loaded, and only when the stage runs.
    # The trainer's config as LoopConfig checked it at start-up (policy_options win).
    if cfg.algorithm == "dpo":
        from rewardloop.train.dpo import train_dpo

        summary = train_dpo(cfg.policy_config(model=ctx.policy, data=_dpo_pairs(ctx), out=out,
                                              seed=cfg.seed + ctx.n, **flags))
    else:
        policy = cfg.policy_config(policy=ctx.policy, rewards=(str(ctx.rm),), out=out,
                                   seed=cfg.seed + ctx.n, **flags)
        if cfg.algorithm == "ppo":
            from rewardloop.train.ppo import train as train_ppo

            summary = train_ppo(policy)
        else:
            from rewardloop.train.grpo import train as train_grpo

            summary = train_grpo(policy)
    figures: dict[str, Any] = {k: v for k, v in summary.items()
               if isinstance(v, int | float) and not k.startswith("peak")}
    figures["alarms"] = _rl_alarms(ctx, out) if cfg.algorithm != "dpo" else []
    return figures


# -- evaluation ---------------------------------------------------------------------------------


def _arena(ctx: RoundContext, out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The simulated pool judges the arena tasks ``evaluate`` created; returns its figures."""
    cfg = ctx.cfg
    assert cfg.pool is not None  # LoopConfig refuses arena without a simulated pool
    batch = ctx.arena_batch
    made: dict[str, Any] = next((c for c in result["comparisons"] if c["judge"] == HUMAN), {})
    if not made.get("tasks") and not made.get("existing_tasks"):
        # The round's policy answered every prompt as the start did: nothing to judge, and
        # no evidence either way (not an error to send people to the server for).
        arena = {"battles": 0, "identical_pairs_skipped": made.get("identical_pairs_skipped"),
                 "note": "the policy's answers equal the baseline's on every prompt: no battle"}
        result["comparisons"] = [c for c in result["comparisons"] if c["judge"] != HUMAN]
        result["arena"] = arena
        write_eval(out, result)
        return arena
    store = ctx.store()
    try:
        simulate(store, load_pool(cfg.pool), cfg.pool_gold or cfg.gold or "", batch=batch,
                 seed=cfg.seed + 1000 + ctx.n)
    finally:
        store.dispose()
    arena = store_arena(cfg.db_url, batch, policy=result["policy_name"],
                        baseline=result["baseline_name"], seed=cfg.seed)
    result["comparisons"] = [c for c in result["comparisons"] if c["judge"] != HUMAN]
    if "win_rate" in arena:
        result["comparisons"].append({k: arena[k] for k in (
            "name", "judge", "win_rate", "win_rate_ci", "wins", "ties", "losses", "n")})
    result["arena"] = arena
    write_eval(out, result)
    return arena


def stage_eval(ctx: RoundContext, out: Path) -> dict[str, Any]:
    """The round's policy against the starting one: gold judge (if any), the round's reward
    model, and the simulated-people arena when ``arena`` is on."""
    cfg = ctx.cfg
    judges = tuple(j for j in (cfg.gold, str(ctx.rm), HUMAN if cfg.arena else None) if j)
    result = evaluate(EvalConfig(
        policy=str(ctx.dir / "policy" / "model"), baseline=cfg.policy,
        prompts=cfg.eval_prompts or cfg.prompts, out=out, judges=judges, n=cfg.eval_n,
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        seed=cfg.seed + 7, db=cfg.db_url, arena_batch=ctx.arena_batch,
        policy_name=f"round-{ctx.n}", baseline_name="start",
        **dataclasses.asdict(cfg.engine())))
    figures: dict[str, Any] = {"kl": result.get("kl"),
                               "policy_words_mean": result["length"]["policy"].get("words_mean"),
                               "baseline_words_mean":
                                   result["length"]["baseline"].get("words_mean")}
    rows = {("gold" if c["judge"] == cfg.gold else "rm"): c for c in result["comparisons"]
            if "win_rate" in c}
    if cfg.arena:
        rows["human"] = _arena(ctx, out, result)
    for key, row in rows.items():
        if "win_rate" in row:
            figures[f"{key}_win_rate"] = row["win_rate"]
            figures[f"{key}_win_rate_ci"] = row["win_rate_ci"]
    for key in ("policy_mean", "baseline_mean"):
        if key in rows.get("gold", {}):
            figures[f"gold_{key}"] = rows["gold"][key]
    return figures
