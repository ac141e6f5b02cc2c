"""The same GRPO job in one process, on 2 processes (``--nproc 2``) and on Ray (``--ray``).

Workload: ``train grpo`` of a tiny Llama (``--hidden``, ``--layers``, vocabulary 1024) on
synthetic support prompts, ``--batch-size`` completions a step (groups of 4), ``--new-tokens``
tokens each, rewarded by a reward model (a saved tiny classifier) and the synthetic gold
function, fp32 on CPU, ``--steps`` steps. Each side is one process launch of the command line;
the table gives the whole job's wall time (for Ray: starting a local Ray and its actors too)
and the steady-state median step after 2 warm-up steps (``summary.json``'s
``median_step_s``). Every side runs one math thread per process (OMP_NUM_THREADS=1), so the
sides differ in orchestration, not in threads.

Sides: ``one`` (one process), ``nproc2`` (2 ranks, DDP), ``ray1`` (1 trainer actor, 1
generation actor, 1 reward actor: the same work as ``one``, moved into actors, so the
difference of their step times is Ray's orchestration overhead: weight push through the
object store, calls, transfers of rollouts), ``ray2`` (2 trainer actors, 1 generation actor,
1 reward actor).

    python -m benchmarks.cluster [--steps 12] [--batch-size 16] [--new-tokens 32]
        [--sides one,nproc2,ray1,ray2]
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

SIDES = {"one": [], "nproc2": ["--nproc", "2"],
         "ray1": ["--ray", "--trainers", "1", "--reward-actors", "1", "--actor-cpus", "0.5"],
         "ray2": ["--ray", "--trainers", "2", "--reward-actors", "1", "--actor-cpus", "0.5"]}


def prepare(work: Path, args: argparse.Namespace) -> None:
    import torch

    from rewardloop import synthetic
    from rewardloop.models import load_reward_model, load_tokenizer
    from rewardloop.tiny import build_tiny

    build_tiny(work / "tiny", synthetic.corpus_texts(1000), vocab_size=1024,
               hidden_size=args.hidden, num_layers=args.layers, num_heads=4, max_position=512)
    rows = synthetic.prompt_rows(64, seed=1)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(work / "tiny")
    torch.manual_seed(0)
    rm = load_reward_model(work / "tiny", device="cpu", pad_token_id=tokenizer.pad_token_id)
    rm.save_pretrained(work / "rm", safe_serialization=True)
    tokenizer.save_pretrained(work / "rm")
    (work / "rm" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))


def run(work: Path, args: argparse.Namespace, side: str) -> dict:
    out = work / f"run-{side}"
    command = [sys.executable, "-m", "rewardloop", "train", "grpo", "--policy",
               str(work / "tiny"), "--prompts", str(work / "prompts.jsonl"), "--reward",
               f"{work / 'rm'}@0.5", "--reward", "rewardloop.synthetic:gold_score",
               "--out", str(out), "--batch-size", str(args.batch_size), "--num-generations",
               "4", "--max-steps", str(args.steps), "--max-new-tokens", str(args.new_tokens),
               "--lr", "1e-5", "--save-every", str(args.steps), "--sample-every", "0",
               "--device", "cpu", "--overwrite", *SIDES[side]]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=3600)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tail = steps[2:] or steps
    return {"side": side, "job_s": wall, "median_step_s": summary["median_step_s"],
            "generate_s": sum(m["time_generate_s"] for m in tail) / len(tail),
            "score_s": sum(m["time_score_s"] for m in tail) / len(tail)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sides", default=",".join(SIDES))
    args = parser.parse_args()
    sides = args.sides.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args)
        results = {side: run(work, args, side) for side in sides}
    print(f"\n## GRPO, tiny Llama (hidden {args.hidden}, {args.layers} layers), "
          f"{args.batch_size} completions x {args.new_tokens} tokens a step, {args.steps} "
          f"steps, reward model + function, {os.cpu_count()} CPU cores, 1 thread a process")
    print("| side | whole job (s) | median step (s) | generate (s/step) | score (s/step) |")
    print("|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['side']} | {r['job_s']:.1f} | {r['median_step_s']:.3f} | "
              f"{r['generate_s']:.3f} | {r['score_s']:.3f} |")
    if "one" in results and "ray1" in results:
        one, ray1 = results["one"]["median_step_s"], results["ray1"]["median_step_s"]
        print(f"\norchestration overhead (ray1 vs one, median step): {ray1 - one:+.3f} s = "
              f"{(ray1 - one) / one:+.1%} of a step")


if __name__ == "__main__":
    main()
