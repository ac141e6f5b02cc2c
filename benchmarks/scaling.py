"""The same training job on 1 and on N processes (torch.distributed, gloo on CPU).

Workload: SFT of a tiny Llama (``build_tiny``; ``--hidden``, ``--layers``) on synthetic
support rows, global batch ``--batch-size``, ``--steps`` optimizer steps, fp32, through
``rewardloop train sft`` (``--nproc N`` for the multi-process side, DDP or FSDP2). Each side is
one process launch; the table gives the whole-job wall time (start-up, loading, training,
saving) and the steady-state median step time after 2 warm-up steps (``summary.json``'s
``median_step_s``), and checks that every side ends with the same loss.

On a CPU, N processes share the machine's cores (each gets cores / N threads), so the
speed-up here measures the runtime's overhead (all-reduce, sharding), not GPU scaling.

    python -m benchmarks.scaling [--nproc 2] [--strategy ddp|fsdp] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepare(work: Path, args: argparse.Namespace) -> None:
    from rewardloop import synthetic
    from rewardloop.tiny import build_tiny

    build_tiny(work / "tiny", synthetic.corpus_texts(1000), vocab_size=1024,
               hidden_size=args.hidden, num_layers=args.layers, num_heads=4, max_position=512)
    rows = synthetic.sft_rows(args.batch_size * args.steps, seed=1)
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(work: Path, args: argparse.Namespace, nproc: int) -> dict:
    out = work / f"run-{nproc}"
    command = [sys.executable, "-m", "rewardloop", "train", "sft", "--model",
               str(work / "tiny"), "--data", str(work / "sft.jsonl"), "--out", str(out),
               "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
               "--max-length", "128", "--lr", "1e-4", "--overwrite", "--device", "cpu"]
    if nproc > 1:
        command += ["--nproc", str(nproc), "--strategy", args.strategy]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=3600)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"processes": nproc, "job_s": wall, "median_step_s": summary["median_step_s"],
            "final_loss": last["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        results = [run(work, args, 1), run(work, args, args.nproc)]
    print(f"\n## SFT, tiny Llama (hidden {args.hidden}, {args.layers} layers), global batch "
          f"{args.batch_size}, {args.steps} steps, {args.strategy} on {args.nproc} processes "
          f"vs 1, {os.cpu_count()} CPU cores")
    print("| processes | whole job (s) | median step after warm-up (s) | final loss |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['processes']} | {r['job_s']:.1f} | {r['median_step_s']:.4f} | "
              f"{r['final_loss']:.6f} |")
    one, many = results
    print(f"\nspeed-up: whole job {one['job_s'] / many['job_s']:.2f}x, steady state "
          f"{one['median_step_s'] / many['median_step_s']:.2f}x; losses agree to "
          f"{abs(one['final_loss'] - many['final_loss']):.1e}")


if __name__ == "__main__":
    main()
