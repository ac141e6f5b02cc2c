"""Training throughput on one GPU: rewardloop vs TRL, SFT, DPO and GRPO, same card, same run.

Workload: a Qwen2-0.5B-shaped model (24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4864,
vocabulary 151,936, tied embeddings) built from its config with random weights (nothing is
downloaded), and the tiny byte-level tokenizer of ``rewardloop tiny`` (its ids are a subset of
the model's vocabulary). Both sides train in bf16 compute with fp32 master weights and AdamW:
ours with ``--precision bf16`` (fp32 weights, autocast), TRL with ``bf16=True`` on an fp32 model
(the same scheme through accelerate).

- sft: packed rows of exactly ``--seq-len`` tokens, ``--batch-size`` rows a step;
- dpo: pairs whose prompt + answer fill ``--seq-len`` tokens, reference scored every step on
  both sides (ours ``precompute_ref=False``; TRL's default);
- grpo: ``--batch-size`` completions of ``--new-tokens`` tokens (the built-in HF loop on both
  sides), a length reward, ``--generations`` per prompt.

Both sides recompute activations in the backward pass (``--gradient-checkpointing``, TRL's
default) unless ``--no-gradient-checkpointing``. Each (task, side) runs in its own process, so
peak memory is per side. Printed per side: the
whole-job time, the steady-state step time (median after 2 warm-up steps), tokens/s at that
step time (tokens of the step's sequences: sft rows, dpo chosen + rejected, grpo prompt +
completion), the model FLOPs utilisation for sft and dpo (6 x matmul parameters + attention,
per token, over the card's dense bf16 peak) and the peak GPU memory.

The script needs a CUDA build of torch, transformers and this package (and trl for TRL's side,
which is skipped with a note when trl is missing). ``--shape tiny --device cpu`` is a quick run
of the same code on a CPU, for checking the script itself (its figures mean nothing).
``--sides rewardloop,rewardloop-full,trl`` adds ours with the logits materialised
(``--no-chunked-lm-head``). On a CPU the memory columns are the side process's peak resident
memory and its growth over the job; ``--shape wide-vocab --device cpu --precision fp32`` (Qwen2's
vocabulary on a 2-layer body) is the CPU-sized check of the output head's memory.

    python -m benchmarks.gpu [--tasks sft,dpo,grpo] [--steps 20] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median_after_warmup, print_table, run_side, step_timer

SIDES = ("rewardloop", "trl")
# Also runnable: ours with the logits materialised (--no-chunked-lm-head), to show what the
# chunked output head saves: --sides rewardloop,rewardloop-full,trl.
OUR_SIDES = ("rewardloop", "rewardloop-full")
# Dense bf16 peak FLOP/s by card name (tensor cores, no sparsity), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H100 PCIe": 756e12, "A100": 312e12,
             "L40S": 362e12, "A10G": 70e12}
SHAPES = {
    "qwen2-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936},
    # Qwen2's vocabulary on a small body: the output head dominates, as it does for small
    # models on long batches; CPU-sized (memory of the head's logits vs the chunked head).
    "wide-vocab": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024},
}


def card_peak(device: str) -> tuple[str, float | None]:
    import torch

    if not device.startswith("cuda"):
        return "cpu", None
    name = torch.cuda.get_device_name()
    # The longest matching key, so "H100 PCIe" wins over "H100".
    hits = sorted((k for k in PEAK_BF16 if k in name), key=len)
    return name, PEAK_BF16[hits[-1]] if hits else None


def prepare(work: Path, args: argparse.Namespace) -> None:
    """The model directory (random weights, fp32) and the three data files."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    build_tiny(work / "tok", synthetic.corpus_texts(2000), vocab_size=1024, hidden_size=64,
               num_layers=1, num_heads=4, max_position=args.seq_len * 2)
    config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=args.seq_len * 2,
                         tie_word_embeddings=True, torch_dtype="float32")
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(work / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        if (work / "tok" / name).exists():
            (work / "model" / name).write_bytes((work / "tok" / name).read_bytes())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.save_pretrained(work / "model")
    texts = synthetic.corpus_texts(4000)
    needed = args.batch_size * (args.steps + 2)

    def text_of(n_tokens: int, start: int) -> str:
        out, i = [], start
        while len(tokenizer(" ".join(out))["input_ids"]) < n_tokens:
            out.append(texts[i % len(texts)])
            i += 1
        return " ".join(out)

    long_text = text_of(args.seq_len * 3, 0)
    sft = [{"text": long_text} for _ in range(needed)]  # packed: every row is seq-len tokens
    half = text_of(args.seq_len // 2, 7)
    pairs = [{"prompt": half, "chosen": text_of(args.seq_len // 2, 11 + i),
              "rejected": text_of(args.seq_len // 2, 101 + i)} for i in range(needed)]
    def prompt_of(n_tokens: int, start: int) -> str:
        """A prompt of at most ``n_tokens`` tokens, so that ours (which cuts at
        --max-prompt-length) and TRL (which has no prompt limit) see the same prompt."""
        ids = tokenizer(text_of(n_tokens, start))["input_ids"][:n_tokens]
        while len(tokenizer(text := tokenizer.decode(ids, skip_special_tokens=True))[
                "input_ids"]) > n_tokens:
            ids = ids[:-1]
        return text

    prompts = [{"prompt": prompt_of(args.prompt_len, 13 + i)} for i in range(needed)]
    for name, rows in (("sft", sft), ("dpo", pairs), ("grpo", prompts)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def length_reward(completions: list[Any], **_: Any) -> list[float]:
    """A reward both sides can compute: shorter answers score higher."""
    return [-len(str(c)) / 100.0 for c in completions]


def flops_per_token(model_dir: Path, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the parameters used in matmuls (all of them with tied
    embeddings: the output layer multiplies by the embedding matrix) + 12 x layers x hidden x
    seq_len for attention scores and values (forward and backward)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, layers, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads
    head = h // c.num_attention_heads
    per_layer = h * h * 2 + h * kv * head * 2 + 3 * h * c.intermediate_size
    return 6.0 * (layers * per_layer + h * c.vocab_size) + 12.0 * layers * h * seq_len


def tokens_per_step(task: str, args: argparse.Namespace) -> int:
    if task == "sft":
        return args.batch_size * args.seq_len
    if task == "dpo":
        return 2 * args.batch_size * args.seq_len
    return args.batch_size * (args.prompt_len + args.new_tokens)


def _ours(task: str, work: Path, args: argparse.Namespace, chunked_lm_head: bool = True
          ) -> dict:
    common: dict[str, Any] = {"out": work / f"ours-{task}", "batch_size": args.batch_size,
                              "max_steps": args.steps, "lr": 1e-5, "device": args.device,
                              "overwrite": True, "dtype": "float32", "precision": args.precision,
                              "gradient_checkpointing": args.gradient_checkpointing,
                              "chunked_lm_head": chunked_lm_head}
    if task == "sft":
        from rewardloop.train.sft import SFTConfig, train_sft

        return train_sft(SFTConfig(model=str(work / "model"), data=work / "sft.jsonl",
                                   max_length=args.seq_len, packing=True, log_every=10,
                                   **common))
    if task == "dpo":
        from rewardloop.train.dpo import DPOConfig, train_dpo

        return train_dpo(DPOConfig(model=str(work / "model"), data=work / "dpo.jsonl",
                                   max_length=args.seq_len, precompute_ref=False,
                                   log_every=10, **common))
    from rewardloop.train.grpo import GRPOConfig, train

    return train(GRPOConfig(policy=str(work / "model"), prompts=work / "grpo.jsonl",
                            rewards=("benchmarks.gpu:length_reward",),
                            num_generations=args.generations, max_new_tokens=args.new_tokens,
                            max_prompt_length=args.prompt_len, save_every=args.steps,
                            sample_every=0, hf_decoding=args.hf_decoding, **common))


def _trl(task: str, work: Path, args: argparse.Namespace) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(x) for x in (work / f"{task}.jsonl").read_text().splitlines()]
    data = datasets.Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", torch_dtype=torch.float32)
    common: dict[str, Any] = {
        "output_dir": str(work / f"trl-{task}"), "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps, "learning_rate": 1e-5, "report_to": "none",
        "save_strategy": "no", "logging_steps": 10, "disable_tqdm": True,
        "bf16": args.precision == "bf16", "use_cpu": not args.device.startswith("cuda"),
        "dataloader_num_workers": 0, "gradient_checkpointing": args.gradient_checkpointing}
    if task == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=args.seq_len, packing=True,
                                                         **common),
                             train_dataset=data, processing_class=tokenizer)
    elif task == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(max_length=args.seq_len, **common),
                             train_dataset=data, processing_class=tokenizer)
    else:
        from trl import GRPOConfig, GRPOTrainer

        common["per_device_train_batch_size"] = args.batch_size
        trainer = GRPOTrainer(model=model, reward_funcs=length_reward, train_dataset=data,
                              processing_class=tokenizer, args=GRPOConfig(
                                  num_generations=args.generations,
                                  max_completion_length=args.new_tokens, **common))
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    return {"median_step_s": median_after_warmup(timer.times)}


def run_one(task: str, side: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    if side == "trl":
        try:
            import trl  # noqa: F401
        except ImportError:
            return {"skipped": "trl is not installed here"}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss_start = _rss_gib()
    start = time.perf_counter()
    if side in OUR_SIDES:
        summary = _ours(task, work, args, chunked_lm_head=side == "rewardloop")
    else:
        summary = _trl(task, work, args)
    wall = time.perf_counter() - start
    step = summary.get("median_step_s")
    tokens_s = tokens_per_step(task, args) / step if step else None
    card, peak = card_peak(args.device)
    out: dict[str, Any] = {"wall_s": wall, "median_step_s": step, "tokens_per_s": tokens_s,
                           "card": card}
    if task != "grpo" and peak and tokens_s:
        out["mfu"] = tokens_s * flops_per_token(work / "model", args.seq_len) / peak
    if args.device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory, above what it held when the job started
        out["peak_rss_gib"] = _peak_rss_gib()
        out["peak_rss_growth_gib"] = out["peak_rss_gib"] - rss_start
    return out


def _rss_gib() -> float:
    """Resident memory of this process now (Linux /proc), GiB."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _side(task: str, side: str, work: Path, passthrough: list[str]) -> dict:
    """One side's figures, printed as soon as they exist (a run cut short keeps them); a side
    that fails is reported and the others still run."""
    try:
        result = run_side("benchmarks.gpu", f"{task}:{side}", ["--work", str(work), *passthrough])
    except RuntimeError as exc:
        print(f"{task}:{side} failed: {exc}", file=sys.stderr, flush=True)
        return {"failed": str(exc).splitlines()[0]}
    print(json.dumps({"task": task, "side": side, **result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", help="internal: run one side (TASK:SIDE) and print JSON")
    parser.add_argument("--work", help="internal: prepared directory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a script check)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--tasks", default="sft,dpo,grpo")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024, help="sft rows, dpo prompt+answer")
    parser.add_argument("--prompt-len", type=int, default=64, help="grpo prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="grpo completion tokens")
    parser.add_argument("--generations", type=int, default=4, help="grpo group size")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True, help="both sides alike (TRL's trainers default to it on)")
    parser.add_argument("--hf-decoding", default="dynamic", choices=("dynamic", "static",
                                                                     "compiled"),
                        help="our grpo's built-in decoding loop (TRL's side: HF generate)")
    args = parser.parse_args()
    if args.side:
        task, side = args.side.split(":")
        print(json.dumps(run_one(task, side, Path(args.work), args)))
        return
    passthrough = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        for task in args.tasks.split(","):
            results = {side: _side(task, side, work, passthrough)
                       for side in args.sides.split(",")}
            print_table(f"{task}: {args.shape}, batch {args.batch_size}, {args.steps} steps, "
                        f"{args.precision} on {next(iter(results.values())).get('card')}",
                        results, ["wall_s", "median_step_s", "tokens_per_s", "mfu",
                                  "peak_mem_gib", "peak_rss_gib", "peak_rss_growth_gib"])


if __name__ == "__main__":
    main()
