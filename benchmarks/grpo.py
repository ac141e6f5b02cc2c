"""GRPO and RLOO: rewardloop vs TRL 1.16 on the same tiny SFT'd model, prompts and reward.

    python -m benchmarks.grpo [--steps 16] [--algos grpo,rloo] [--workdir DIR] [--seed 0]

The parent process builds a tiny Llama model, fine-tunes it briefly on the synthetic
customer-support task (``rewardloop.train.sft``) and writes the prompts; then every side runs in
its own process launch (``benchmarks.common.run_side``), so peak memory is per side. Both sides
optimise the hidden gold judge ``rewardloop.synthetic:gold_score`` as a Python reward with the
same prompts x generations per step, max new tokens, steps, learning rate, KL coefficient and
clip range. TRL's GRPO default ``use_bias_correction_kl=True`` multiplies the k3 penalty by the
importance ratio, which leaves its value alone but changes its gradient to the unbiased
reverse-KL one; it is turned off so both sides optimise the same k3 gradient (the loss and
gradient on a fixed batch then agree to float precision: tests/parity/test_trl_parity.py).
TRL's default activation checkpointing is off too: ours does not recompute activations, and it
only costs TRL time. Gold before/after is measured the same way for both (our ``HFGenerator``
sampling 4 answers to each of 64 held-out prompts, fixed seed), outside the timed region.

With 16 completions a step the KL and entropy curves vary a lot from seed to seed (after 6
GRPO steps the KL to the reference ranged 0.014-0.13 for ours and 0.021-0.11 for TRL over 16
seeds, median 0.031 for both), so compare curves over several ``--seed`` values, not one run.

Both sides run with the same ``--threads`` (default 1: on a shared, oversubscribed CPU OpenMP
spin-waiting made 2-thread runs ~30x slower and noisy).

Timed region: model load + training + final save (``train()`` for rewardloop; trainer
construction + ``train()`` + ``save_model`` for TRL). samples_per_s = completions / that time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median_after_warmup, peak_rss_mb, print_table, run_side, step_timer

REWARD = "rewardloop.synthetic:gold_score"
GENERATIONS = 4
PROMPTS_PER_STEP = 4
MAX_NEW_TOKENS = 24
LR = 2e-4
BETA = {"grpo": 0.04, "rloo": 0.05}  # each trainer's paper default
EVAL_PROMPTS, EVAL_SAMPLES = 64, 4


def prepare(work: Path) -> None:
    """Tiny model -> short SFT -> ``work/sft/model``; prompt files for training and eval."""
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny
    from rewardloop.train.sft import SFTConfig, train_sft

    work.mkdir(parents=True, exist_ok=True)
    if (work / "sft" / "summary.json").is_file():
        return
    rows = synthetic.sft_rows(600, seed=0, quality=(0.3, 0.9))
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, n, seed in (("prompts", 128, 1), ("eval_prompts", EVAL_PROMPTS, 2)):
        (work / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in synthetic.prompt_rows(n, seed=seed)))
    build_tiny(work / "tiny", synthetic.corpus_texts(2000), vocab_size=512, hidden_size=64,
               num_layers=2, num_heads=4, overwrite=True)
    train_sft(SFTConfig(model=str(work / "tiny"), data=work / "sft.jsonl", out=work / "sft",
                        epochs=3, batch_size=16, lr=3e-3, max_length=96, schedule="cosine",
                        warmup_steps=10, overwrite=True, device="cpu"))


def gold_samples(model_dir: str, work: Path, samples: int = EVAL_SAMPLES) -> list[float]:
    """Gold scores of ``samples`` sampled answers to each held-out prompt (same seed for every
    model)."""
    import torch

    from rewardloop.models import load_policy, load_tokenizer
    from rewardloop.rollout import HFGenerator, SamplingSettings, encode_prompts
    from rewardloop.synthetic import gold_score

    prompts = [json.loads(x)["prompt"] for x in
               (work / "eval_prompts.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        rollout = HFGenerator(model, tokenizer).generate(
            encode_prompts(tokenizer, prompts, 256), samples,
            SamplingSettings(max_new_tokens=MAX_NEW_TOKENS))
    return gold_score([p for p in prompts for _ in range(samples)], rollout.texts)


def gold_of(model_dir: str, work: Path) -> float:
    """Mean gold score of sampled answers to the held-out prompts."""
    scores = gold_samples(model_dir, work)
    return sum(scores) / len(scores)


def side_ours(algo: str, work: Path, steps: int, seed: int) -> dict[str, Any]:
    from rewardloop.train.grpo import GRPOConfig, train

    out = work / f"ours-{algo}"
    policy = str(work / "sft" / "model")
    gold_before = gold_of(policy, work)
    cfg = GRPOConfig(
        policy=policy, prompts=work / "prompts.jsonl", out=out, rewards=(REWARD,),
        advantage=algo, num_generations=GENERATIONS,
        batch_size=GENERATIONS * PROMPTS_PER_STEP, max_steps=steps, lr=LR,
        max_new_tokens=MAX_NEW_TOKENS, kl_coef=BETA[algo], seed=seed, device="cpu",
        # TRL's RLOO loss is the mean over sequences of a sequence-level ratio times the
        # advantage: the same gradient as our per-sequence token sum.
        loss_aggregation="token-mean" if algo == "grpo" else "seq-mean-token-sum",
        sample_every=0, save_every=10_000, overwrite=True)
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kl_key = "kl_k3" if algo == "grpo" else "kl_k1"  # what TRL logs as "kl" for each
    return {
        "samples_per_s": steps * cfg.batch_size / wall, "wall_s": wall,
        "median_step_s": summary.get("median_step_s"),
        "completion_length_mean": sum(m["completion_length_mean"] for m in metrics)
        / max(len(metrics), 1),
        "generate_s": sum(m["time_generate_s"] for m in metrics),
        "train_s": sum(m["time_train_s"] for m in metrics),
        "peak_rss_mb": peak_rss_mb(), "gold_before": gold_before,
        "gold_after": gold_of(str(out / "model"), work),
        "reward_curve": [m["reward/mean"] for m in metrics],
        "kl_curve": [m.get(kl_key, 0.0) for m in metrics], "steps": summary["steps"],
    }


def side_trl(algo: str, work: Path, steps: int, seed: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardloop.synthetic import gold_score

    if algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    out = work / f"trl-{algo}"
    policy = str(work / "sft" / "model")
    gold_before = gold_of(policy, work)
    prompts = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    gen_time = [0.0]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    original = model.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            gen_time[0] += time.perf_counter() - t0

    model.generate = timed_generate
    args = Config(
        output_dir=str(out), use_cpu=True, per_device_train_batch_size=GENERATIONS
        * PROMPTS_PER_STEP, gradient_accumulation_steps=1, num_generations=GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS, learning_rate=LR, lr_scheduler_type="constant",
        max_steps=steps, beta=BETA[algo], temperature=1.0, seed=seed, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, disable_dropout=True,
        dataloader_num_workers=0, activation_checkpointing=False,
        **({"loss_type": "dapo", "scale_rewards": "group", "use_bias_correction_kl": False}
           if algo == "grpo" else {}))
    trainer = Trainer(model=model, reward_funcs=gold_score, args=args,
                      train_dataset=Dataset.from_list(prompts),
                      processing_class=AutoTokenizer.from_pretrained(policy, padding_side="left"))
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    lengths = [h["completions/mean_length"] for h in logs if "completions/mean_length" in h]
    return {
        "samples_per_s": steps * GENERATIONS * PROMPTS_PER_STEP / wall, "wall_s": wall,
        "median_step_s": median_after_warmup(timer.times),
        "completion_length_mean": sum(lengths) / len(lengths) if lengths else None,
        "generate_s": gen_time[0], "train_s": wall - gen_time[0],
        "peak_rss_mb": peak_rss_mb(), "gold_before": gold_before,
        "gold_after": gold_of(str(out / "model"), work),
        "reward_curve": [h["reward"] for h in logs], "kl_curve": [h.get("kl", 0.0) for h in logs],
        "steps": trainer.state.global_step,
    }


def _curves(algo: str, results: dict[str, dict]) -> None:
    print(f"\n### {algo}: per-step mean reward and KL (per token)")
    print("| step | " + " | ".join(f"{s} reward | {s} kl" for s in results) + " |")
    print("|---" * (1 + 2 * len(results)) + "|")
    steps = max(len(r["reward_curve"]) for r in results.values())
    for i in range(steps):
        cells = []
        for r in results.values():
            rew, kl = r["reward_curve"], r["kl_curve"]
            cells += [f"{rew[i]:.3f}" if i < len(rew) else "-",
                      f"{kl[i]:.4f}" if i < len(kl) else "-"]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", help="run one side (internal): ours-grpo, trl-rloo, ...")
    parser.add_argument("--steps", type=int, default=16, help="optimisation steps per side")
    parser.add_argument("--algos", default="grpo,rloo", help="comma-separated: grpo,rloo")
    parser.add_argument("--workdir", type=Path, default=None, help="where models and runs go")
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt order and sampling seed of both sides")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of every side (OMP_NUM_THREADS); 1 avoids "
                        "OpenMP spin-waiting on a shared, oversubscribed CPU")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each side this many times (alternating); keep the fastest")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.gettempdir()) / "rewardloop-bench-grpo"
    if args.side:
        who, algo = args.side.split("-", 1)
        result = (side_ours if who == "ours" else side_trl)(algo, work, args.steps, args.seed)
        print(json.dumps(result))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both sides
    prepare(work)
    common = ["--steps", str(args.steps), "--workdir", str(work), "--seed", str(args.seed)]
    for algo in args.algos.split(","):
        results: dict[str, dict] = {}
        for _ in range(args.repeats):
            for who, name in (("ours", "rewardloop"), ("trl", "trl")):
                r = run_side("benchmarks.grpo", f"{who}-{algo}", common)
                if name not in results or r["wall_s"] < results[name]["wall_s"]:
                    results[name] = r
        print_table(f"{algo.upper()}: {args.steps} steps x {GENERATIONS * PROMPTS_PER_STEP} "
                    f"completions ({PROMPTS_PER_STEP} prompts x {GENERATIONS}), "
                    f"{MAX_NEW_TOKENS} new tokens, lr {LR}, beta {BETA[algo]}, CPU", results,
                    ["samples_per_s", "wall_s", "median_step_s", "generate_s", "train_s",
                     "completion_length_mean", "peak_rss_mb", "gold_before", "gold_after",
                     "steps"])
        _curves(algo, results)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
