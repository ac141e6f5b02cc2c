"""``rewardloop demo``: the whole loop on a laptop CPU, no network, in minutes.

The task is the synthetic customer-support one (``rewardloop.synthetic``), whose hidden gold
judge lets the demo say whether RLHF really helped. Steps, each a resumable stage:

1. ``prepare/data``: a support corpus of mixed-quality replies, prompt pools, and a simulated
   annotator pool of two groups with different tastes (``warm`` weighs politeness, ``concise``
   weighs brevity, both through the gold judge's components) plus one spammer;
2. ``prepare/tiny`` + ``prepare/sft``: a tiny tokenizer and model built on the corpus, then SFT;
3. one round of ``rewardloop loop`` with a built-in config (the same code path): the SFT policy
   answers prompts, the pool judges them through the task service with overlap, the quality
   report flags the spammer, a reward model trains without flagged annotators, GRPO optimises
   the policy against it with a KL leash (the gold judge is logged on every RL sample, never
   optimised), and the RLHF policy is evaluated against SFT by the gold judge, the reward model
   and a simulated-people arena;
4. ``report.html`` over the stage directories and ``summary.json`` with the headline figures.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rewardloop import synthetic
from rewardloop.eval.report import build_report
from rewardloop.loop import run_loop
from rewardloop.loop_config import LoopConfig, claim_workdir, run_stage
from rewardloop.tiny import build_tiny
from rewardloop.util.files import atomic_write_text

log = logging.getLogger(__name__)

GOLD = "rewardloop.synthetic:gold_score"
GOLD_COMPONENTS = "rewardloop.synthetic:gold_components_batch"

POOL: dict[str, Any] = {
    "groups": {
        "warm": {"weights": {"helpful": 1.0, "polite": 1.5, "concise": 0.5, "repetition": 1.0}},
        "concise": {"weights": {"helpful": 1.0, "polite": 0.3, "concise": 2.0,
                                "repetition": 1.0}},
    },
    "annotators": [
        {"name": "warm-{i}", "count": 3, "group": "warm", "temperature": 0.7,
         "position_bias": 0.1, "time_median_s": 30},
        {"name": "concise-{i}", "count": 3, "group": "concise", "temperature": 0.7,
         "time_median_s": 25},
        {"name": "spammer", "spam": "random", "time_median_s": 3},
    ],
}


@dataclass(frozen=True)
class DemoSizes:
    """How big each part of the demo is (``FULL`` by default, ``FAST`` for smoke tests)."""

    corpus: int
    """SFT rows of mixed quality."""
    prompts: int
    """Prompt pool for feedback and RL."""
    eval_prompts: int
    """Held-out prompts for evaluation."""
    hidden_size: int
    """Width of the tiny model."""
    num_layers: int
    """Transformer blocks of the tiny model."""
    sft_steps: int
    """SFT optimizer steps (batch 32)."""
    prompts_per_round: int
    """Prompts the pool judges answers to."""
    overlap: int
    """Annotators per task."""
    rm_steps: int
    """Most reward-model optimizer steps (it keeps its best held-out step, and stops early)."""
    rm_batch: int
    """Comparisons per reward-model step."""
    rl_steps: int
    """GRPO steps."""
    rl_batch: int
    """Completions per GRPO step."""
    max_new_tokens: int
    """Longest answer in tokens."""


# Sized for about 3.5 minutes on 2 quiet CPU cores: enough judgments (~880 per annotator) for
# the quality report to catch the spammer and for the reward model to learn whether a reply
# answers the customer's topic (with a quarter of them it stayed ~0.08 below its label ceiling,
# scoring like a reward that knows only politeness and "names some topic": see
# docs/reward-models.md), and enough RL steps for a clear gold win over SFT.
FULL = DemoSizes(corpus=3000, prompts=2560, eval_prompts=200, hidden_size=96, num_layers=2,
                 sft_steps=300, prompts_per_round=2048, overlap=3, rm_steps=400, rm_batch=64,
                 rl_steps=80, rl_batch=32, max_new_tokens=48)
FAST = DemoSizes(corpus=200, prompts=64, eval_prompts=24, hidden_size=32, num_layers=1,
                 sft_steps=8, prompts_per_round=24, overlap=2, rm_steps=4, rm_batch=32,
                 rl_steps=2, rl_batch=8, max_new_tokens=16)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _prepare_data(out: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    _write_jsonl(out / "sft.jsonl", synthetic.sft_rows(sizes.corpus, seed=seed))
    _write_jsonl(out / "prompts.jsonl", synthetic.prompt_rows(sizes.prompts, seed=seed + 1))
    _write_jsonl(out / "eval_prompts.jsonl",
                 synthetic.prompt_rows(sizes.eval_prompts, seed=seed + 2))
    atomic_write_text(out / "pool.yaml", yaml.safe_dump(POOL, sort_keys=False))
    return {"sft_rows": sizes.corpus, "prompts": sizes.prompts,
            "eval_prompts": sizes.eval_prompts}


def _prepare_tiny(out: Path, sizes: DemoSizes, seed: int) -> dict[str, Any]:
    texts = synthetic.corpus_texts(max(sizes.corpus, 500), seed=seed)
    build_tiny(out / "model", texts=texts, vocab_size=512 if sizes is FAST else 1024,
               hidden_size=sizes.hidden_size, num_layers=sizes.num_layers, num_heads=4,
               max_position=256, seed=seed, overwrite=True)
    return {"hidden_size": sizes.hidden_size, "num_layers": sizes.num_layers}


def _prepare_sft(out: Path, data: Path, tiny: Path, sizes: DemoSizes, seed: int
                 ) -> dict[str, Any]:
    from rewardloop.train.sft import SFTConfig, train_sft  # imports torch: only when it runs

    ckpts = out / "checkpoints"
    resume = ckpts.is_dir() and any(ckpts.iterdir())
    summary = train_sft(SFTConfig(
        model=str(tiny / "model"), data=data / "sft.jsonl", out=out, seed=seed,
        max_steps=sizes.sft_steps, batch_size=32, lr=3e-3, warmup_steps=10, schedule="cosine",
        max_length=160, save_every=max(sizes.sft_steps // 3, 1), resume=resume,
        overwrite=not resume))
    return {"loss": summary.get("loss"), "steps": summary["steps"], "wall_s": summary["wall_s"]}


def loop_config(workdir: Path, data: Path, policy: Path, sizes: DemoSizes, seed: int
                ) -> LoopConfig:
    """The demo's built-in one-round loop."""
    return LoopConfig(
        policy=str(policy), prompts=data / "prompts.jsonl", workdir=workdir, rounds=1,
        prompts_per_round=sizes.prompts_per_round, responses_per_prompt=2,
        overlap=sizes.overlap, pool=data / "pool.yaml", gold=GOLD, pool_gold=GOLD_COMPONENTS,
        algorithm="grpo", eval_prompts=data / "eval_prompts.jsonl", eval_n=sizes.eval_prompts,
        arena=True, max_new_tokens=sizes.max_new_tokens, temperature=1.0,
        max_kl=20.0, max_length_ratio=2.0, seed=seed,
        # No --length-debias: the pool has no length bias, and its taste correlates with length
        # (polite replies are longer), so ODIN's length-free reward would drop real signal.
        rm_options={"max_steps": sizes.rm_steps, "batch_size": sizes.rm_batch, "lr": 1e-3,
                    "warmup_steps": 10, "schedule": "cosine", "eval_every": 20,
                    "early_stopping_patience": 5},
        policy_options={"max_steps": sizes.rl_steps, "batch_size": sizes.rl_batch,
                        "num_generations": 4, "lr": 2e-4, "kl_coef": 0.04,
                        "missing_eos_penalty": 1.0, "sample_every": 5, "num_samples": 4,
                        "save_every": max(sizes.rl_steps // 2, 1)},
    )


def report_runs(workdir: Path) -> list[Path]:
    """The directories the demo's report covers, in reading order."""
    r1 = workdir / "round-1"
    runs = [workdir, workdir / "prepare" / "sft", r1 / "data", r1 / "rm", r1 / "policy",
            r1 / "eval"]
    return [p for p in runs if p.is_dir()]


def run_demo(workdir: Path, *, fast: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run (or resume) the demo in ``workdir``; returns the summary written to summary.json,
    with ``report`` (the HTML file) and ``wall_s`` added."""
    start = time.perf_counter()
    sizes = FAST if fast else FULL
    workdir = Path(workdir)
    claim_workdir(workdir, "demo")
    prep = workdir / "prepare"
    data, tiny, sft = prep / "data", prep / "tiny", prep / "sft"
    run_stage(data, "data", lambda d: _prepare_data(d, sizes, seed))
    run_stage(tiny, "tiny", lambda d: _prepare_tiny(d, sizes, seed))
    run_stage(sft, "sft", lambda d: _prepare_sft(d, data, tiny, sizes, seed))
    summary = run_loop(loop_config(workdir, data, sft / "model", sizes, seed))
    report = workdir / "report.html"
    summary.update({"report": str(report), "fast": fast,
                    "wall_s": round(time.perf_counter() - start, 1)})
    atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=2) + "\n")
    build_report(report_runs(workdir), report,
                 title="rewardloop demo: RLHF on synthetic customer support")
    return summary
