"""Whose preferences does the reward model serve? ``--group-balance`` on a split pool.

A simulated pool of a majority group (6 annotators) and a minority group (2 annotators) judges
synthetic customer-support pairs (``feedback.simulate.judge_offline``, each pair by the next
annotator in turn). Both groups like polite replies; on length they are opposite: the majority
prefers short replies, the minority long ones (``synthetic.style_components``, weights
``polite`` 1, ``brief`` +2 / -2). Reward models are trained by ``train.reward`` with the same
tiny model, seed and steps under ``--group-balance none``, ``equal`` and ``minmax``, and with
``--group-heads`` (one head per group; each group's accuracy is its own head's), and scored on
held-out pairs judged by the same pool. Printed per arm: overall held-out accuracy, each group's
accuracy, the worst group's accuracy and the minority's share of the training weight, as the
mean (and min-max) over seeds.

    python -m benchmarks.groups [--seeds 3] [--train 1000] [--eval 500] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewardloop import synthetic
from rewardloop.feedback.simulate import judge_offline, opposed_groups_pool

TASTE = {"polite": 1.0, "brief": 2.0}
ARMS = ("none", "equal", "minmax", "group-heads")


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_model(workdir: Path) -> Path:
    """The tiny reward-model trunk (positions up to 256: whole replies, so length is seen)."""
    from rewardloop.tiny import build_tiny

    return build_tiny(workdir / "tiny", synthetic.corpus_texts(200), vocab_size=300,
                      hidden_size=16, num_layers=1, num_heads=2, max_position=256)


def one_seed(workdir: Path, model: Path, seed: int, n_train: int, n_eval: int, steps: int
             ) -> dict[str, Any]:
    from rewardloop.train.reward import RewardConfig, train_rm

    pool = opposed_groups_pool(TASTE, "brief")
    style = synthetic.style_components
    train = write_jsonl(workdir / f"train-{seed}.jsonl", judge_offline(
        pool, synthetic.candidate_rows(n_train, seed=seed), style, seed))
    held = write_jsonl(workdir / f"eval-{seed}.jsonl", judge_offline(
        pool, synthetic.candidate_rows(n_eval, seed=1000 + seed), style, 1000 + seed))
    groups = workdir / "groups.json"
    groups.write_text(json.dumps({a.name: [a.group] for a in pool}))
    out: dict[str, Any] = {}
    for arm in ARMS:
        heads = arm == "group-heads"
        summary = train_rm(RewardConfig(
            model=str(model), data=train, eval_data=held, out=workdir / f"rm-{arm}-{seed}",
            annotator_groups=groups, group_balance="none" if heads else arm, group_heads=heads,
            group_step_size=1.0, max_length=256,
            batch_size=16, lr=1e-2, max_steps=steps, seed=seed, device="cpu", overwrite=True))
        g = summary["groups"]
        out[arm] = {"overall": summary["eval_accuracy"],
                    "majority": g["by_group"]["majority"]["accuracy"],
                    "minority": g["by_group"]["minority"]["accuracy"],
                    "worst": g["worst_group_accuracy"],
                    "minority_share": g["by_group"]["minority"]["weight_share"],
                    "wall_s": summary["wall_s"]}
        print(f"seed {seed} {arm}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[arm].items()),
              flush=True)
    return out


def report(results: list[dict[str, Any]], n_train: int, steps: int) -> None:
    def cell(arm: str, key: str) -> str:
        v = [r[arm][key] for r in results]
        return f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"

    print(f"\n## Group balance ({len(results)} seeds, {n_train} labels by 6 majority + 2 "
          f"minority annotators, {steps} steps, tiny RM)")
    print("| --group-balance | overall | majority | minority | worst group | minority weight |")
    print("|---|---|---|---|---|---|")
    for arm in ARMS:
        print(f"| {arm} | " + " | ".join(cell(arm, k) for k in (
            "overall", "majority", "minority", "worst", "minority_share")) + " |")
    base = np.mean([r["none"]["worst"] for r in results])
    for arm in ARMS[1:]:
        gain = np.mean([r[arm]["worst"] for r in results]) - base
        cost = np.mean([r[arm]["overall"] - r["none"]["overall"] for r in results])
        print(f"{arm}: worst group {gain:+.3f}, overall {cost:+.3f} against none")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds to average over.")
    parser.add_argument("--train", type=int, default=1000, help="Judged training pairs.")
    parser.add_argument("--eval", type=int, default=500, help="Judged held-out pairs.")
    parser.add_argument("--steps", type=int, default=200, help="Training steps of every RM.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rl-groups-") as tmp:
        workdir = Path(tmp)
        model = build_model(workdir)
        results = [one_seed(workdir, model, seed, args.train, args.eval, args.steps)
                   for seed in range(args.seeds)]
    report(results, args.train, args.steps)


if __name__ == "__main__":
    main()
