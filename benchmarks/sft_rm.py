"""SFT and reward-model training, rewardloop vs TRL (SFTTrainer, RewardTrainer), same everything.

Same tiny random Llama (``build_tiny``), same synthetic data (``synthetic.sft_rows`` /
``preference_rows``), batch size, max length, epochs and learning rate; CPU; fp32 without
activation checkpointing on both sides (TRL 1.16 defaults to bf16 autocast and checkpointing:
both are turned off); TRL with reporting, saving and in-training evaluation off. Each side runs
in its own process (``run_side``), so peak RSS is per side. ``wall_s`` and ``samples_per_s``
time the training call after the imports (model loading, tokenisation, training; ours also
saves the model and, for the RM, evaluates, which TRL's side does not); ``train_samples_per_s``
only the optimisation loop as each library measures it; ``median_step_s`` is the steady state,
the median optimizer step after 2 warm-up steps. RM accuracy is on held-out pairs labelled by
the gold judge.

    python -m benchmarks.sft_rm [--train N] [--eval N] [--epochs E] [--hidden H]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median_after_warmup, peak_rss_mb, print_table, run_side, step_timer

SIDES = ("rewardloop", "trl")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(work: Path, args: argparse.Namespace) -> None:
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    build_tiny(work / "tiny", synthetic.corpus_texts(2000), vocab_size=1024,
               hidden_size=args.hidden, num_layers=args.layers, num_heads=4, max_position=512)
    _write(work / "sft.jsonl", synthetic.sft_rows(args.train, seed=1))
    pairs = synthetic.preference_rows(args.train + args.eval, seed=2)
    for row in pairs:
        row.pop("margin")  # neither side uses margins: plain Bradley-Terry
    _write(work / "pairs.jsonl", pairs[:args.train])
    _write(work / "pairs_eval.jsonl", pairs[args.train:])


def ours(task: str, work: Path, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    common = {"model": str(work / "tiny"), "batch_size": args.batch_size, "epochs": args.epochs,
              "max_length": args.max_length, "lr": args.lr, "device": "cpu",
              "overwrite": True, "log_every": 50}
    if task == "sft":
        from rewardloop.train.sft import SFTConfig, train_sft

        summary = train_sft(SFTConfig(data=work / "sft.jsonl", out=work / "ours-sft", **common))
    else:
        from rewardloop.train.reward import RewardConfig, train_rm

        summary = train_rm(RewardConfig(data=work / "pairs.jsonl", out=work / "ours-rm",
                                        eval_data=work / "pairs_eval.jsonl", **common))
    wall = time.perf_counter() - start
    return {"samples_per_s": args.train * args.epochs / wall, "wall_s": wall,
            "train_samples_per_s": summary["samples_per_s"], "peak_rss_mb": peak_rss_mb(),
            "median_step_s": summary["median_step_s"],
            "eval_accuracy": summary.get("eval_accuracy")}


def trl(task: str, work: Path, args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(x) for x in (work / ("sft.jsonl" if task == "sft" else "pairs.jsonl"))
            .read_text().splitlines()]
    common = {"output_dir": str(work / f"trl-{task}"), "per_device_train_batch_size":
              args.batch_size, "num_train_epochs": args.epochs, "learning_rate": args.lr,
              "max_length": args.max_length, "report_to": "none", "save_strategy": "no",
              "eval_strategy": "no", "logging_steps": 50, "use_cpu": True, "seed": 0,
              "disable_tqdm": True, "dataloader_num_workers": 0,
              # TRL 1.16 defaults both to True; ours trains in fp32 without recomputation.
              "bf16": False, "fp16": False, "gradient_checkpointing": False}
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(work / "tiny")
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=str(work / "tiny"), args=SFTConfig(**common),
                             train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer)
    else:
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(work / "tiny", num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common),
                                train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer)
    timer = step_timer()
    trainer.add_callback(timer)
    result = trainer.train()
    wall = time.perf_counter() - start
    out = {"samples_per_s": args.train * args.epochs / wall, "wall_s": wall,
           "train_samples_per_s": result.metrics["train_samples_per_second"],
           "median_step_s": median_after_warmup(timer.times),
           "peak_rss_mb": peak_rss_mb(), "eval_accuracy": None}
    if task == "rm":
        held = [json.loads(x) for x in (work / "pairs_eval.jsonl").read_text().splitlines()]
        metrics = trainer.evaluate(datasets.Dataset.from_list(held))
        out["eval_accuracy"] = metrics["eval_accuracy"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", help="internal: run one side (TASK:SIDE) and print JSON")
    parser.add_argument("--work", help="internal: prepared directory")
    parser.add_argument("--train", type=int, default=2000, help="training rows / pairs")
    parser.add_argument("--eval", type=int, default=500, help="held-out pairs")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if args.side:
        task, side = args.side.split(":")
        result = (ours if side == "rewardloop" else trl)(task, Path(args.work), args)
        print(json.dumps(result))
        return
    passthrough = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="bench-sft-rm-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        for task in ("sft", "rm"):
            results = {side: run_side("benchmarks.sft_rm", f"{task}:{side}",
                                      ["--work", str(work), *passthrough]) for side in SIDES}
            keys = ["samples_per_s", "train_samples_per_s", "wall_s", "median_step_s",
                    "peak_rss_mb"]
            if task == "rm":
                keys.append("eval_accuracy")
            print_table(f"train {task}: {args.train} rows, {args.epochs} epoch(s), batch "
                        f"{args.batch_size}, max_length {args.max_length}, hidden "
                        f"{args.hidden} x {args.layers} layers, CPU", results, keys)


if __name__ == "__main__":
    main()
