"""``rewardloop loop``: rounds of generate -> tasks -> judgments -> reward model -> policy -> eval.

Every round lives in ``WORKDIR/round-N/`` with one directory per stage (``STAGE_TABLE``). A stage is
done only when its marker ``DONE.json`` exists; the marker is written last and atomically, and
holds the stage's figures. An interrupted run started again with the same config resumes at the
first unfinished stage; trainers in an unfinished stage continue from their own checkpoints.
``rewardloop loop status`` reads the markers back as a table.

After the last round, ``WORKDIR/summary.json`` holds every round's figures, the
over-optimisation alarms (``eval.alarms``) of the RL runs and across rounds, and the round whose
policy scored best on the held-out judge (gold, else human win rate); ``WORKDIR/best.json``
points at that policy.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from rewardloop.config import config_to_dict
from rewardloop.eval.alarms import AlarmSettings, best_index, check_alarms
from rewardloop.loop_config import (
    CONFIG_FILE,
    LoopConfig,
    claim_workdir,
    round_dir,
    run_stage,
)
from rewardloop.loop_stages import (
    RoundContext,
    check_for_groups,
    check_judges,
    stage_eval,
    stage_feedback,
    stage_generate,
    stage_policy,
    stage_rm,
    stage_tasks,
)
from rewardloop.util.files import atomic_write_text

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
BEST = "best.json"

StageHook = Callable[[int, str], None]
StageFn = Callable[[RoundContext, Path], Mapping[str, Any]]

STAGE_TABLE: tuple[tuple[str, StageFn], ...] = (
    ("generate", stage_generate),
    ("tasks", stage_tasks),
    ("feedback", stage_feedback),
    ("rm", stage_rm),
    ("policy", stage_policy),
    ("eval", stage_eval),
)
"""The stages of a round, in the order they run; each writes ``round-N/<name>/``. Their names
are ``loop_config.STAGES``, which ``rewardloop loop status`` reads without importing them."""


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _round_record(n: int, figures: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One round as a record for the cross-round alarms and the summary."""
    ev = figures.get("eval", {})
    return {"round": n, "proxy": ev.get("rm_win_rate"), "gold": ev.get("gold_win_rate"),
            "human": ev.get("human_win_rate"), "kl": ev.get("kl"),
            "proxy_ci": ev.get("rm_win_rate_ci"), "gold_ci": ev.get("gold_win_rate_ci"),
            "human_ci": ev.get("human_win_rate_ci"),
            "length": ev.get("policy_words_mean"),
            **{f"{stage}/{k}": v for stage, f in figures.items() for k, v in f.items()
               if isinstance(v, int | float | str | list)}}


def _write_best(cfg: LoopConfig, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    index = best_index(records, ("gold", "human", "proxy"))
    if index is None:
        return None
    n = records[index]["round"]
    best = {"round": n, "model": str(round_dir(cfg.workdir, n) / "policy" / "model"),
            **{k: records[index].get(k) for k in ("gold", "human", "proxy")}}
    atomic_write_text(cfg.workdir / BEST, json.dumps(best, indent=2) + "\n")
    return best


def summarize(cfg: LoopConfig, records: list[dict[str, Any]]) -> dict[str, Any]:
    """``WORKDIR/summary.json``: the last round's headline figures, every round, alarms, best."""
    alarms = [f"round {r['round']} RL run: {a}" for r in records
              for a in r.get("policy/alarms", [])]
    alarms += check_alarms(records, AlarmSettings(
        step_key="round", window=1, max_kl=cfg.max_kl, max_length_ratio=None, ci_suffix="_ci"))
    for message in alarms:
        log.warning("alarm: %s", message)
    last = records[-1]
    summary: dict[str, Any] = {
        "rounds": len(records),
        "gold_win_rate": last.get("eval/gold_win_rate"),
        "gold_win_rate_ci": last.get("eval/gold_win_rate_ci"),
        "rm_win_rate": last.get("eval/rm_win_rate"),
        "human_win_rate": last.get("eval/human_win_rate"),
        "human_win_rate_ci": last.get("eval/human_win_rate_ci"),
        "rm_accuracy": last.get("rm/eval_accuracy"),
        "rm_label_ceiling": last.get("rm/label_ceiling"),
        "kl": last.get("eval/kl"),
        "alarms": alarms,
        "best": _write_best(cfg, records),
        "per_round": records,
    }
    atomic_write_text(cfg.workdir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def run_loop(cfg: LoopConfig, after_stage: StageHook | None = None) -> dict[str, Any]:
    """Run (or resume) every round of ``cfg``; returns the summary written to summary.json.

    ``after_stage(round, stage)`` is called after each stage finishes (and its marker is
    written); tests raise from it to interrupt a run.
    """
    claim_workdir(cfg.workdir, "loop")  # the demo claimed its own first
    atomic_write_text(cfg.workdir / CONFIG_FILE, _yaml(config_to_dict(cfg)))
    check_judges(cfg)  # refused now, not after a round's sampling
    if cfg.for_groups is not None:
        check_for_groups(cfg)
    records = []
    for n in range(1, cfg.rounds + 1):
        ctx = RoundContext(cfg, n)
        figures: dict[str, dict[str, Any]] = {}
        for stage, fn in STAGE_TABLE:
            figures[stage] = run_stage(ctx.dir / stage, stage, functools.partial(fn, ctx))
            if after_stage is not None:
                after_stage(n, stage)
        records.append(_round_record(n, figures))
    return summarize(cfg, records)


def _yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False)
