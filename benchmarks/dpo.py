"""DPO side by side with TRL's ``DPOTrainer`` on the same tiny model, data and settings.

``python -m benchmarks.dpo`` builds a tiny Llama, fine-tunes it briefly on ``synthetic.sft_rows``
(``rewardloop train sft``'s loop), then runs one epoch of DPO (sigmoid loss, same batch, beta,
learning rate, linear schedule, max length, reference log-probs precomputed once, fp32 without
activation checkpointing on both sides: TRL 1.16 defaults to checkpointing, turned off here)
with rewardloop and with TRL, each side in its own process. It prints pairs/s (the whole job:
loading, tokenising, reference pass, training, evaluation, saving), peak RSS, the implicit-reward
accuracy on held-out pairs, and the hidden gold score (``synthetic.gold_score``) of answers
sampled from the SFT model and from each trained model (same prompts, seed and sampler).

    python -m benchmarks.dpo [--pairs 2048] [--eval-pairs 512] [--sft-rows 2000]
                             [--gold-prompts 200] [--work DIR]

(A reused ``--work`` keeps the data it was prepared with; give a new one to change sizes.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import median_after_warmup, peak_rss_mb, print_table, run_side, step_timer

MODULE = "benchmarks.dpo"
SETTINGS = {"pairs": 2048, "eval_pairs": 512, "batch_size": 16, "beta": 0.1, "lr": 1e-4,
            "max_length": 160, "sft_rows": 2000, "gold_prompts": 200}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n: int, seed: int) -> list[dict]:
    """Preference rows whose answers start with a space, so that TRL's joined prompt+answer
    tokenisation and ours (prompt and answer apart) see the same tokens."""
    from rewardloop.synthetic import preference_rows

    return [{"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in preference_rows(n, seed=seed)]


def prepare(work: Path) -> dict[str, str]:
    """Tiny model + a short SFT + the train/eval preference files (in this process)."""
    from rewardloop.synthetic import corpus_texts, sft_rows
    from rewardloop.tiny import build_tiny
    from rewardloop.train.sft import SFTConfig, train_sft

    if (work / "sft" / "model" / "config.json").is_file():  # reuse a prepared --work dir
        return _data(work)
    base = build_tiny(work / "base", corpus_texts(2000), vocab_size=1024, hidden_size=64,
                      num_layers=2, num_heads=4, max_position=256)
    sft = _write_jsonl(work / "sft.jsonl", [{"prompt": r["prompt"],
                                             "completion": " " + r["completion"]}
                                            for r in sft_rows(SETTINGS["sft_rows"], seed=0)])
    train_sft(SFTConfig(model=str(base), data=sft, out=work / "sft", epochs=1, batch_size=32,
                        lr=3e-3, warmup_steps=10, max_length=SETTINGS["max_length"],
                        device="cpu", dtype="float32"))
    return _data(work)


def _data(work: Path) -> dict[str, str]:
    return {"model": str(work / "sft" / "model"),
            "train": str(_write_jsonl(work / "train.jsonl", _pairs(SETTINGS["pairs"], 1))),
            "eval": str(_write_jsonl(work / "eval.jsonl", _pairs(SETTINGS["eval_pairs"], 2)))}


def side_rewardloop(paths: dict[str, str], out: Path) -> dict:
    # The same libraries are imported before the clock starts on both sides (the TRL side
    # imports transformers and trl first); otherwise our side would pay transformers' import.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from rewardloop.train.dpo import DPOConfig, train_dpo

    start = time.perf_counter()
    summary = train_dpo(DPOConfig(
        model=paths["model"], data=Path(paths["train"]), eval_data=Path(paths["eval"]), out=out,
        loss="dpo", beta=SETTINGS["beta"], lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"],
        epochs=1, max_length=SETTINGS["max_length"], ref_batch_size=32, device="cpu",
        dtype="float32", log_every=10))
    wall = time.perf_counter() - start
    return {"pairs_per_s": SETTINGS["pairs"] / wall, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
            "median_step_s": summary["median_step_s"], "model": str(out / "model")}


def side_trl(paths: dict[str, str], out: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    data = load_dataset("json", data_files={"train": paths["train"], "eval": paths["eval"]})
    args = DPOConfig(
        output_dir=str(out), use_cpu=True, report_to="none", seed=0, beta=SETTINGS["beta"],
        loss_type=["sigmoid"], learning_rate=SETTINGS["lr"], lr_scheduler_type="linear",
        per_device_train_batch_size=SETTINGS["batch_size"], per_device_eval_batch_size=32,
        num_train_epochs=1, max_length=SETTINGS["max_length"], precompute_ref_log_probs=True,
        precompute_ref_batch_size=32, save_strategy="no", eval_strategy="no", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
        gradient_checkpointing=False)  # TRL 1.16 defaults it to True; ours does not recompute
    trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"],
                         eval_dataset=data["eval"], processing_class=tokenizer)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(str(out / "model"))
    wall = time.perf_counter() - start
    return {"pairs_per_s": SETTINGS["pairs"] / wall, "wall_s": wall, "peak_rss_mb": peak_rss_mb(),
            "eval_accuracy": metrics["eval_rewards/accuracies"],
            "eval_loss": metrics["eval_loss"], "median_step_s": median_after_warmup(timer.times),
            "model": str(out / "model")}


def side_gold(model_dir: str) -> dict:
    """Mean gold score of 2 sampled answers (temperature 0.7) to each of the held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardloop.synthetic import gold_score, prompt_rows
    from rewardloop.tokenize import pad

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [r["prompt"] for r in prompt_rows(SETTINGS["gold_prompts"], seed=99)] * 2
    scores: list[float] = []
    for start in range(0, len(prompts), 32):
        chunk = prompts[start:start + 32]
        ids = [tokenizer(p)["input_ids"] for p in chunk]
        input_ids = pad(ids, tokenizer.pad_token_id, side="left")
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=input_ids.ne(
                tokenizer.pad_token_id).long(), do_sample=True, temperature=0.7, top_k=0,
                max_new_tokens=64, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        scores.extend(gold_score(chunk, answers))
    return {"gold": sum(scores) / len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", choices=("rewardloop", "trl", "gold"))
    parser.add_argument("--paths", help="JSON of model/train/eval paths (set by the parent)")
    parser.add_argument("--out", help="output directory of this side")
    parser.add_argument("--work", help="keep the tiny/SFT models here (reused when present)")
    parser.add_argument("--settings", help="internal: the parent's sizes, as JSON")
    for name in ("pairs", "eval_pairs", "sft_rows", "gold_prompts"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=SETTINGS[name],
                            help=f"default {SETTINGS[name]}")
    args = parser.parse_args()
    SETTINGS.update(json.loads(args.settings) if args.settings else
                    {n: getattr(args, n) for n in ("pairs", "eval_pairs", "sft_rows",
                                                   "gold_prompts")})
    sizes = ["--settings", json.dumps(SETTINGS)]  # every side runs at the parent's sizes
    if args.side == "gold":
        print(json.dumps(side_gold(args.paths)))
        return
    if args.side is not None:
        fn = side_rewardloop if args.side == "rewardloop" else side_trl
        print(json.dumps(fn(json.loads(args.paths), Path(args.out))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"preparing: tiny model + SFT in {work} ...", file=sys.stderr)
        paths = prepare(work)
        results = {}
        for side in ("rewardloop", "trl"):
            results[side] = run_side(MODULE, side, ["--paths", json.dumps(paths),
                                                    "--out", str(Path(tmp) / side), *sizes])
        gold_sft = run_side(MODULE, "gold", ["--paths", paths["model"], *sizes])["gold"]
        for res in results.values():
            res["gold_before"] = gold_sft
            res["gold_after"] = run_side(MODULE, "gold", ["--paths", res.pop("model"),
                                                          *sizes])["gold"]
        print(f"settings: {json.dumps(SETTINGS)}")
        print_table("DPO (sigmoid), 1 epoch, tiny Llama on CPU", results,
                    ["pairs_per_s", "wall_s", "median_step_s", "peak_rss_mb", "eval_accuracy",
                     "eval_loss",
                     "gold_before", "gold_after"])


if __name__ == "__main__":
    main()
