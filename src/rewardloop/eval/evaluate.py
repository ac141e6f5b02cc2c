"""``rewardloop eval``: a policy against a baseline on the same prompts.

Both policies answer every prompt once (through ``rollout.HFGenerator``, the one generation
interface), then each judge scores both answers and the policy's win rate is reported with a
bootstrap interval over prompts (ties count half). A judge is a reward-model directory or a
Python function ``package.module:function`` with TRL's reward signature (both resolved by
``rewards.Rewards``), or ``human``: arena tasks are created in the store for people (or a
simulated pool) to judge, and ``arena_result`` rates the policies from their judgments.

Also reported: the KL of the policy to the baseline on the policy's own answers (mean over
answers of the summed per-token ``log p_policy - log p_baseline``, i.e. k1 summed per sequence,
at the sampling temperature) and the length statistics of both. Outputs in ``--out``:
``eval.json`` (read by ``eval.report``), ``samples.jsonl`` (prompt, baseline, policy), and, as
every run directory (DESIGN.md), ``config.yaml`` (the resolved options) and ``summary.json``
(throughput, peak memory and the headline win rate); eval.json is written last, so it marks a
finished eval. ``check_eval_out`` refuses, before any work, an ``--out`` that holds anything
else, and replaces an earlier eval's files only when asked to.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rewardloop.config import config_to_dict
from rewardloop.data.formats import read_records
from rewardloop.data.store import Store
from rewardloop.data.values import length_stats
from rewardloop.engines.options import EngineOptions
from rewardloop.errors import UserError
from rewardloop.eval.alarms import group_win_rate_alarms
from rewardloop.eval.arena import battles_by_group, create_arena_tasks, judged_battles
from rewardloop.eval.config import EvalConfig
from rewardloop.metrics import UNGROUPED, Battle, WinRate, arena_ratings, rate_ci, win_rate
from rewardloop.models import load_policy, load_tokenizer, match_tokenizer
from rewardloop.util.files import WORKDIR_MARKER, atomic_write_text, check_output_dir

log = logging.getLogger(__name__)

HUMAN = "human"
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"
OUTPUT_FILES = (EVAL_FILE, SAMPLES_FILE, "config.yaml", "summary.json")
"""What an eval writes in --out, samples.jsonl first and eval.json last: a directory with either
of those two is an eval's output (an interrupted one has samples.jsonl)."""
NOT_EVAL = ("metrics.jsonl", "checkpoints", "model", WORKDIR_MARKER)
"""What a training run or a loop's work directory holds and an eval never does: a directory
holding one is refused (a GRPO run writes samples.jsonl, config.yaml and summary.json too, and a
loop's work directory config.yaml and summary.json)."""


@dataclass
class Answers:
    """One policy's answers to the prompts, with the rollouts that produced them."""

    texts: list[str]
    rollouts: list[Any]  # rollout.Rollout per batch, in prompt order

    def token_data(self) -> dict[str, list[Any]]:
        """``completion_ids`` and ``has_eos`` for reward functions (TRL's extra kwargs)."""
        ids: list[list[int]] = []
        eos: list[bool] = []
        for r in self.rollouts:
            for row, mask, ended in zip(r.completion_ids, r.completion_mask, r.has_eos,
                                        strict=True):
                ids.append(row[mask.bool()].tolist())
                eos.append(bool(ended))
        return {"completion_ids": ids, "has_eos": eos}


def load_for_generation(model: str, device: str = "auto", chat_template: Path | None = None,
                        generator: str = "hf") -> tuple[Any, Any]:
    """A frozen policy in eval mode and its left-padding tokenizer for ``generator``'s engine.
    For the built-in loop a pad token is added when the model has none distinct from EOS (it
    only pads prompts and is never sampled, so the original checkpoint of a run can be the
    baseline); vLLM pads nothing and could not load a grown vocabulary, so its tokenizer
    stays as saved (``load_tokenizer(sampling_only=True)``)."""
    built_in = generator == "hf"
    tokenizer = load_tokenizer(model, padding_side="left", chat_template=chat_template,
                               add_pad_token=built_in, sampling_only=not built_in)
    policy = load_policy(model, device=device, trainable=False).eval()
    match_tokenizer(policy, tokenizer)
    policy.requires_grad_(False)
    return policy, tokenizer


def sample_answers(model: Any, tokenizer: Any, prompts: Sequence[Any], *, n: int = 1,
                   max_new_tokens: int = 64, temperature: float = 1.0,
                   max_prompt_length: int = 512, batch_size: int = 32, seed: int = 0,
                   engine: EngineOptions | None = None, model_path: str | None = None
                   ) -> Answers:
    """``n`` sampled answers per prompt (rows of a prompt contiguous), ``batch_size`` prompts at
    a time; the same ``seed`` gives the same answers. ``engine`` picks the generator (default:
    the built-in loop over ``model``); a vLLM engine loads ``model_path``."""
    # rollout, engines and seeding import torch (seconds): loaded when answers are sampled, so
    # that the loop's `status` and the arena helpers stay light.
    from rewardloop.engines.factory import make_generator
    from rewardloop.rollout import SamplingSettings, encode_prompts
    from rewardloop.util.seed import seed_everything

    seed_everything(seed)
    generator = make_generator(engine or EngineOptions(), model, tokenizer, model_path,
                               seed=seed)
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
    ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    rollouts = [generator.generate(ids[i:i + batch_size], n, settings)
                for i in range(0, len(ids), batch_size)]
    return Answers([t for r in rollouts for t in r.texts], rollouts)


def sequence_kl(policy: Any, baseline: Any, answers: Answers, temperature: float,
                batch_size: int) -> dict[str, float]:
    """KL(policy || baseline) estimated on the policy's own answers: ``kl`` is the mean over
    answers of the summed per-token k1 (log-ratio), ``kl_per_token`` its token mean."""
    from rewardloop import ops  # torch: see sample_answers
    from rewardloop.rollout import batched_logps

    total, tokens, seqs = 0.0, 0.0, 0
    for rollout in answers.rollouts:
        logp = batched_logps(policy, rollout, temperature, batch_size)  # (B, C)
        ref = batched_logps(baseline, rollout, temperature, batch_size)
        mask = rollout.completion_mask.to(logp.dtype)
        total += float(ops.masked_sum(ops.kl_k1(logp, ref), mask))
        tokens += float(mask.sum())
        seqs += len(rollout)
    return {"kl": total / max(seqs, 1), "kl_per_token": total / max(tokens, 1.0)}


def judge_name(spec: str) -> str:
    """A short label of a judge for tables: a directory's name or the function's."""
    if spec == HUMAN:
        return HUMAN
    path = Path(spec)
    if path.exists():
        return (path.parent.name if path.name == "model" else path.name) or spec
    return spec.rpartition(":")[2] or spec


def score_answers(spec: str, prompts: Sequence[Any], answers: Answers, *,
                  batch_size: int = 32, device: str = "auto") -> list[float]:
    """Scores of ``answers`` by one judge (a reward-model dir or ``package.module:function``)."""
    from rewardloop.rewards import Rewards, RewardSpec  # torch: see sample_answers

    rewards = Rewards([RewardSpec(spec)], device=device, batch_size=batch_size, flag="--judge")
    out = rewards(list(prompts), answers.texts, **answers.token_data())
    return [float(x) for x in out.total]


def compare(spec: str, policy_scores: Sequence[float], baseline_scores: Sequence[float], *,
            tie_eps: float = 0.0, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One judge's comparison row of ``eval.json``."""
    rate = win_rate(policy_scores, baseline_scores, tie_eps=tie_eps, n_boot=n_boot, seed=seed)
    return {"name": judge_name(spec), "judge": spec, **rate.as_dict(),
            "policy_mean": float(np.mean(policy_scores)),
            "baseline_mean": float(np.mean(baseline_scores))}


def _read_prompts(cfg: EvalConfig) -> list[Any]:
    _, records = read_records(cfg.prompts, "prompts")
    prompts = [r.prompt for r in records][: cfg.n]
    if not prompts:
        raise UserError(f"{cfg.prompts}: no prompts")
    return prompts


def _human_tasks(cfg: EvalConfig, prompts: Sequence[Any], policy: Answers,
                 baseline: Answers) -> dict[str, Any]:
    store = Store(cfg.db)
    try:
        with store.write() as session:
            outputs = {cfg.policy_name: policy.texts, cfg.baseline_name: baseline.texts}
            made = create_arena_tasks(
                session, prompts, outputs, batch_name=cfg.arena_batch,
                overlap=cfg.arena_overlap, seed=cfg.seed)
    finally:
        store.dispose()
    return {"name": HUMAN, "judge": HUMAN, "status": "pending", "db": store.safe_url,
            "arena_batch": cfg.arena_batch, "tasks": made.tasks,
            "identical_pairs_skipped": made.identical_pairs_skipped,
            "existing_tasks": made.existing}


def check_eval_out(out: Path, overwrite: bool = False) -> None:
    """UserError unless eval may write ``out``: a new or empty directory, or with ``overwrite``
    an earlier eval's output (it holds files of :data:`OUTPUT_FILES` and is no training run),
    of which only those files are replaced; a file, or a directory holding anything else, is
    refused. Called before prompts are read or models loaded."""
    check_output_dir(out, flag="--out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = (any((out / f).is_file() for f in (EVAL_FILE, SAMPLES_FILE))
               and not any((out / f).exists() for f in NOT_EVAL))
    if not earlier:
        raise UserError(f"--out {out} is not empty and holds no earlier eval (eval.json); give "
                        "a new or empty directory")
    if not overwrite:
        raise UserError(f"--out {out} holds an earlier eval; pass --overwrite to replace its "
                        f"files ({', '.join(OUTPUT_FILES)}), or give another directory")


def write_eval(out: Path, result: Mapping[str, Any]) -> None:
    """Write ``eval.json`` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / EVAL_FILE, json.dumps(result, indent=2) + "\n")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Generate, judge and measure per ``cfg``; writes and returns the ``eval.json`` object."""
    started = time.perf_counter()
    prompts = _read_prompts(cfg)
    gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "max_prompt_length": cfg.max_prompt_length,
                           "batch_size": cfg.batch_size, "seed": cfg.seed}  # both sides alike
    engine = EngineOptions.of(cfg)
    policy_model, policy_tok = load_for_generation(cfg.policy, cfg.device, cfg.chat_template,
                                                   engine.generator)
    baseline_model, baseline_tok = load_for_generation(cfg.baseline, cfg.device,
                                                       cfg.chat_template, engine.generator)
    policy = sample_answers(policy_model, policy_tok, prompts, engine=engine,
                            model_path=cfg.policy, **gen)
    baseline = sample_answers(baseline_model, baseline_tok, prompts, engine=engine,
                              model_path=cfg.baseline, **gen)
    result: dict[str, Any] = {"policy": cfg.policy, "baseline": cfg.baseline,
                              "policy_name": cfg.policy_name,
                              "baseline_name": cfg.baseline_name, "n": len(prompts),
                              # the resolved options (prompts, seed, sampling): reproducible
                              "config": config_to_dict(cfg)}
    if policy_tok.get_vocab() == baseline_tok.get_vocab():
        result.update(sequence_kl(policy_model, baseline_model, policy, cfg.temperature,
                                  cfg.batch_size))
    else:
        log.warning("eval: %s and %s have different tokenizers; KL is not computed",
                    cfg.policy, cfg.baseline)
    del policy_model, baseline_model
    result["length"] = {"policy": length_stats(policy.texts),
                        "baseline": length_stats(baseline.texts)}
    comparisons = []
    for spec in cfg.judges:
        if spec == HUMAN:
            comparisons.append(_human_tasks(cfg, prompts, policy, baseline))
            continue
        scores_p = score_answers(spec, prompts, policy, batch_size=cfg.batch_size,
                                 device=cfg.device)
        scores_b = score_answers(spec, prompts, baseline, batch_size=cfg.batch_size,
                                 device=cfg.device)
        comparisons.append(compare(spec, scores_p, scores_b, tie_eps=cfg.tie_eps,
                                   n_boot=cfg.n_boot, seed=cfg.seed))
    result["comparisons"] = comparisons
    headline = comparisons[0]
    result.update({k: headline[k] for k in ("judge", "win_rate", "win_rate_ci", "wins", "ties",
                                            "losses") if k in headline})
    cfg.out.mkdir(parents=True, exist_ok=True)
    # An earlier eval's marker goes before any file is replaced: an eval killed from here on
    # leaves a directory that reads as unfinished, never new answers under the old results.
    (cfg.out / EVAL_FILE).unlink(missing_ok=True)
    _write_samples(cfg.out / SAMPLES_FILE, prompts, baseline.texts, policy.texts)  # first
    atomic_write_text(cfg.out / "config.yaml",
                      yaml.safe_dump(result["config"], sort_keys=False))
    summary: dict[str, Any] = {
        **run_figures(time.perf_counter() - started, [policy, baseline], cfg.batch_size),
        **{k: result[k] for k in ("n", "judge", "win_rate", "win_rate_ci", "kl") if k in result}}
    atomic_write_text(cfg.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_eval(cfg.out, result)  # last: a finished eval
    return result


def run_figures(wall_s: float, sides: Sequence[Answers], batch_size: int) -> dict[str, Any]:
    """What summary.json says of every run: a step is one generation batch (of either side),
    a sample one answer, tokens the answers' completion tokens."""
    from rewardloop.train.run import peak_memory_mb  # imports torch: only once models ran

    answers = sum(len(side.texts) for side in sides)
    tokens = sum(len(ids) for side in sides for ids in side.token_data()["completion_ids"])
    wall = max(wall_s, 1e-9)
    return {"steps": sum(-(-len(side.texts) // batch_size) for side in sides),
            "wall_s": round(wall, 3), "samples_per_s": answers / wall,
            "tokens_per_s": tokens / wall, **peak_memory_mb()}


def _write_samples(path: Path, prompts: Sequence[Any], baseline: Sequence[str],
                   policy: Sequence[str]) -> None:
    rows = [json.dumps({"prompt": p, "baseline": b, "policy": a})
            for p, b, a in zip(prompts, baseline, policy, strict=True)]
    atomic_write_text(path, "".join(r + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# The human arena
# ---------------------------------------------------------------------------------------------


def battle_win_rate(battles: Sequence[Battle], policy: str, baseline: str, *,
                    n_boot: int = 1000, seed: int = 0) -> WinRate | None:
    """Win rate of ``policy`` over ``baseline`` from their direct battles (ties half), with a
    95% interval over battles (``metrics.rate_ci``); None when they never met."""
    outcomes = [o if a == policy else 1.0 - o for a, b, o in battles
                if {a, b} == {policy, baseline}]
    if not outcomes:
        return None
    values = np.asarray(outcomes, dtype=float)
    low, high = rate_ci(values, n_boot=n_boot, seed=seed)
    return WinRate(rate=float(values.mean()), ci_low=low, ci_high=high,
                   wins=int((values == 1).sum()), ties=int((values == 0.5).sum()),
                   losses=int((values == 0).sum()))


def arena_result(battles: Sequence[Battle], *, policy: str | None = None,
                 baseline: str | None = None, n_boot: int = 200, seed: int = 0
                 ) -> dict[str, Any]:
    """Bradley–Terry ratings (Elo scale, bootstrap intervals) of every model in ``battles``,
    and, given ``policy`` and ``baseline``, the policy's direct win rate over the baseline."""
    if not battles:
        raise UserError("no judged arena battles yet: judge the arena tasks first "
                        "(rewardloop serve) and run this again")
    out: dict[str, Any] = {"battles": len(battles),
                           "ratings": arena_ratings(battles, n_boot=n_boot, seed=seed)}
    if policy is not None and baseline is not None:
        rate = battle_win_rate(battles, policy, baseline, n_boot=max(n_boot, 1000), seed=seed)
        if rate is not None:
            out.update({"name": HUMAN, "judge": HUMAN, **rate.as_dict()})
    return out


def group_arena(by_group: Mapping[str, Sequence[Battle]], overall: float | None, policy: str,
                baseline: str) -> dict[str, Any]:
    """The arena per annotator group: the policy's win rate over the baseline among each
    group's judgments (with its 95% interval), and an alarm per group the policy loses for
    while it wins overall (``alarms.group_win_rate_alarms``)."""
    rates = {g: rate for g, battles in sorted(by_group.items())
             if (rate := battle_win_rate(battles, policy, baseline)) is not None}
    return {"by_group": {g: r.as_dict() for g, r in rates.items()},
            "group_alarms": group_win_rate_alarms(  # UNGROUPED is no group of people
                overall, {g: (r.rate, r.ci_high) for g, r in rates.items() if g != UNGROUPED})}


def store_arena(db: str | None, batch: str | None, **kwargs: Any) -> dict[str, Any]:
    """``arena_result`` of the battles judged in the store (optionally one batch), with the
    per-group arena (``group_arena``) when annotators have groups."""
    store = Store(db, existing=True)
    try:
        with store.read() as session:
            judged = judged_battles(session, batch)
    finally:
        store.dispose()
    result = arena_result([b for b, _ in judged], **kwargs)
    by_group = battles_by_group(judged)
    if by_group and kwargs.get("policy") and kwargs.get("baseline"):
        result.update(group_arena(by_group, result.get("win_rate"), kwargs["policy"],
                                  kwargs["baseline"]))
    return result
