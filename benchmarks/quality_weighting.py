"""Does quality-aware reward-model training win back what spammers cost?

A simulated pool (honest annotators plus spammers who answer at random or always pick the answer
shown first) judges synthetic customer-support pairs through the task service. The tasks are
planned by ``feedback.select`` (a share of overlap items for agreement, gold items with the gold
judge's answer, the rest at random). Four reward models are then trained by ``train.reward``
with the same tiny model, data order seed and number of steps:

  (a) honest-only labels   (b) all labels, unweighted
  (c) ``weighting=reliability`` (Dawid–Skene accuracy per annotator from the store)
  (d) ``exclude_flagged`` (judgments of annotators ``feedback.quality`` flags are dropped)

and scored on held-out pairs labelled by the hidden gold judge. Printed: accuracy of each, the
accuracy spammers cost (a - b) and the share of it (c) and (d) win back.

    python -m benchmarks.quality_weighting [--budget 600] [--steps 60] [--seeds 1]
        [--honest 6] [--random-spam 2] [--constant-spam 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rewardloop import synthetic
from rewardloop.data.records import CandidatesRecord, PairRecord, RankingRecord
from rewardloop.feedback.simulate import SimulatedAnnotator

GOLD = "rewardloop.synthetic:gold_score"


def pool(honest: int = 6, random_spam: int = 2, constant_spam: int = 1,
         temperature: float = 1.0) -> list[SimulatedAnnotator]:
    """Bradley–Terry annotators on the gold score, then random and constant (always the answer
    shown first) spammers, named ``spam-*``."""
    return ([SimulatedAnnotator(f"honest-{i}", temperature=temperature)
             for i in range(1, honest + 1)]
            + [SimulatedAnnotator(f"spam-random-{i}", spam="random")
               for i in range(1, random_spam + 1)]
            + [SimulatedAnnotator(f"spam-constant-{i}", spam="constant")
               for i in range(1, constant_spam + 1)])


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_rows(pairs: Sequence[PairRecord]) -> list[dict[str, Any]]:
    """TRL rows (ties dropped: the judges here never tie) keeping the annotator's name."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
             "annotator": p.annotator} for p in pairs if not p.tie]


def build_model(workdir: Path, seed: int = 0) -> Path:
    """The tiny reward-model trunk: a random 2-layer Llama over a BPE fitted to the domain."""
    from rewardloop.tiny import build_tiny

    return build_tiny(workdir / "tiny", synthetic.corpus_texts(500, seed=seed), vocab_size=512,
                      hidden_size=32, num_layers=2, num_heads=2, max_position=256,
                      seed=seed, overwrite=True)


def eval_file(workdir: Path, seed: int, n: int = 400) -> Path:
    """Held-out pairs labelled by the gold judge (gap >= 0.5, so the answer is clear)."""
    return write_jsonl(workdir / f"eval-{seed}.jsonl",
                       synthetic.preference_rows(n, seed=10_000 + seed, min_gap=0.5))


def gold_rows(n: int, seed: int) -> list[RankingRecord]:
    """Known answers for gold items: candidate pairs ranked by the gold judge (clear gaps)."""
    out = []
    for row in synthetic.candidate_rows(4 * n, k=2, seed=20_000 + seed):
        a, b = synthetic.gold_score([row["prompt"]] * 2, row["responses"])
        if abs(a - b) >= 1.0 and row["responses"][0] != row["responses"][1]:
            out.append(RankingRecord(row["prompt"], row["responses"],
                                     [[0], [1]] if a > b else [[1], [0]]))
    return out[:n]


def train_eval(model: Path, data: Path, evals: Path, out: Path, *, steps: int, seed: int,
               ensemble: int = 1, **options: Any) -> dict[str, Any]:
    """``train.reward.train_rm`` on CPU with the benchmark's fixed settings; its summary."""
    from rewardloop.feedback.quality import annotators_from_db
    from rewardloop.train.reward import RewardConfig, train_rm

    cfg = RewardConfig(model=str(model), data=data, eval_data=evals, out=out, max_steps=steps,
                       batch_size=16, lr=1e-3, max_length=128, device="cpu", seed=seed,
                       ensemble=ensemble, overwrite=True, **options)
    stored = (annotators_from_db(cfg.db, weights=cfg.weighting == "reliability",
                                 flagged=cfg.exclude_flagged) if cfg.db is not None else None)
    return train_rm(cfg, stored)


def collect(workdir: Path, budget: int, seed: int, annotators: list[SimulatedAnnotator]
            ) -> tuple[Any, list[PairRecord]]:
    """A store with the pool's judgments of a planned batch; (store, every judged pair)."""
    from rewardloop.data.load import load_pairs
    from rewardloop.data.store import Store
    from rewardloop.feedback import select as S
    from rewardloop.feedback import tasks as T
    from rewardloop.feedback.simulate import simulate

    store = Store(f"sqlite:///{workdir / f'labels-{seed}.db'}")
    rows = [CandidatesRecord(r["prompt"], r["responses"])
            for r in synthetic.candidate_rows(budget, k=2, seed=seed)]
    golds = gold_rows(max(1, budget // 20), seed)
    cfg = S.SelectionConfig(budget=budget, overlap_share=0.3, overlap=3, gold_rate=0.05,
                            seed=seed)
    planned = S.plan(cfg, S.candidate_pairs(rows), S.gold_pairs(golds))
    with store.write() as s:
        batch = T.get_or_create_batch(s, "bench")
        S.create_planned_tasks(s, planned, rows, golds, batch=batch)
    simulate(store, annotators, GOLD, batch="bench", seed=seed)
    return store, load_pairs(store)


def one_seed(workdir: Path, model: Path, budget: int, steps: int, seed: int,
             annotators: list[SimulatedAnnotator]) -> dict[str, Any]:
    from rewardloop.feedback.quality import annotator_weights, flagged_annotators

    t0 = time.perf_counter()
    store, pairs = collect(workdir, budget, seed, annotators)
    collect_s = time.perf_counter() - t0
    evals = eval_file(workdir, seed)
    honest = [p for p in pairs if not str(p.annotator).startswith("spam-")]
    files = {"a_honest_only": write_jsonl(workdir / "honest.jsonl", pairs_rows(honest)),
             "all": write_jsonl(workdir / "all.jsonl", pairs_rows(pairs))}
    arms = {
        "a_honest_only": (files["a_honest_only"], {}),
        "b_all_unweighted": (files["all"], {}),
        "c_reliability": (files["all"], {"weighting": "reliability", "db": store.url}),
        "d_exclude_flagged": (files["all"], {"exclude_flagged": True, "db": store.url}),
    }
    result: dict[str, Any] = {"seed": seed, "labels": len(pairs), "collect_s": collect_s,
                              "weights": annotator_weights(store),
                              "flagged": sorted(flagged_annotators(store))}
    for name, (data, options) in arms.items():
        summary = train_eval(model, data, evals, workdir / f"rm-{name}-{seed}", steps=steps,
                             seed=seed, **options)
        result[name] = {"accuracy": summary["eval_accuracy"],
                        "pairs": summary["train_comparisons"], "wall_s": summary["wall_s"]}
    store.dispose()
    return result


def recovered(a: float, b: float, x: float) -> str:
    return f"{(x - b) / (a - b):.0%}" if a - b > 1e-9 else "- (spammers cost nothing)"


def report(results: list[dict[str, Any]], budget: int, steps: int, pool_line: str) -> None:
    arms = ("a_honest_only", "b_all_unweighted", "c_reliability", "d_exclude_flagged")
    acc = {arm: float(np.mean([r[arm]["accuracy"] for r in results])) for arm in arms}
    print(f"\n## Quality-aware reward-model training ({len(results)} seed(s), budget {budget} "
          f"labels, {steps} steps, tiny RM; pool {pool_line})")
    print("| training labels | pairs | held-out gold accuracy | train s |")
    print("|---|---|---|---|")
    for arm in arms:
        pairs = int(np.mean([r[arm]["pairs"] for r in results]))
        wall = float(np.mean([r[arm]["wall_s"] for r in results]))
        print(f"| {arm} | {pairs} | {acc[arm]:.3f} | {wall:.0f} |")
    a, b = acc["a_honest_only"], acc["b_all_unweighted"]
    print(f"\nspammers cost {a - b:+.3f} accuracy (a - b); reliability weighting recovers "
          f"{recovered(a, b, acc['c_reliability'])}, excluding flagged annotators recovers "
          f"{recovered(a, b, acc['d_exclude_flagged'])}")
    for r in results:
        weights = ", ".join(f"{n} {w:.2f}" for n, w in sorted(r["weights"].items()))
        print(f"seed {r['seed']}: flagged {r['flagged']}; reliability {weights}; "
              f"{r['labels']} labels collected in {r['collect_s']:.0f} s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=600, help="Labels collected per seed.")
    parser.add_argument("--steps", type=int, default=60, help="Training steps of every RM.")
    parser.add_argument("--seeds", type=int, default=1, help="Seeds to average over.")
    parser.add_argument("--honest", type=int, default=6, help="Honest annotators.")
    parser.add_argument("--random-spam", type=int, default=2, help="Random spammers.")
    parser.add_argument("--constant-spam", type=int, default=1,
                        help="Spammers who always pick the answer shown first.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rl-quality-") as tmp:
        workdir = Path(tmp)
        model = build_model(workdir)
        annotators = pool(args.honest, args.random_spam, args.constant_spam)
        results = [one_seed(workdir, model, args.budget, args.steps, seed, annotators)
                   for seed in range(args.seeds)]
    report(results, args.budget, args.steps, f"{args.honest} honest, {args.random_spam} random "
           f"+ {args.constant_spam} constant spammers")


if __name__ == "__main__":
    main()
