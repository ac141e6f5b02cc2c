"""How many labels does uncertainty selection save over random selection?

Rounds of: fit a small reward-model ensemble on the labels so far, let ``feedback.select`` pick
the next pairs (``random``, or ``uncertainty`` = the BALD disagreement of the ensemble's members
on P(a > b)), have a simulated honest annotator (``feedback.simulate.SimulatedAnnotator``,
Bradley–Terry noise on the hidden gold judge) label them, repeat. Accuracy on held-out pairs
labelled by the gold judge is printed per label budget, and how many labels uncertainty needs
to reach the accuracy random selection reaches with the largest budget.

Honest about cost: the reward model here is NOT the transformer of ``train rm``. On 2 shared CPU
cores a tiny transformer RM takes minutes per fit (about 1 s a step), and this study fits one per
round per strategy per seed. So each ensemble member is a *linear* Bradley–Terry model over fixed
hashed features of the synthetic texts (answer words and bigrams, and prompt-word x answer-word
crosses, so topic match is learnable), fitted with L2 on a bootstrap resample of the labels
(the resamples make the members disagree where the data is thin). The selection code is the
production one; only the model differs.

    python -m benchmarks.active_selection [--seeds 3] [--start 40] [--step 40] [--rounds 8]
"""

from __future__ import annotations

import argparse
import re
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewardloop import synthetic
from rewardloop.data.records import CandidatesRecord
from rewardloop.feedback import select as S
from rewardloop.feedback.simulate import SimulatedAnnotator

DIM = 2048
WORD = re.compile(r"[a-z']+")


def features(prompt: str, answer: str) -> np.ndarray:
    """Hashed features (DIM,) of one answer to one prompt, L2-normalised."""
    words = WORD.findall(answer.lower())
    asked = set(WORD.findall(prompt.lower()))
    keys = [f"w:{w}" for w in words] + [f"b:{a}_{b}" for a, b in zip(words, words[1:],
                                                                       strict=False)]
    keys += [f"x:{p}|{w}" for p in asked for w in set(words)]
    keys.append(f"len:{min(len(words) // 10, 8)}")
    vec = np.zeros(DIM)
    for key in keys:
        vec[zlib.crc32(key.encode()) % DIM] += 1.0
    return vec / max(np.linalg.norm(vec), 1e-9)


def fit_bt(diffs: np.ndarray, l2: float) -> np.ndarray:
    """Linear Bradley–Terry weights: minimise mean log(1 + exp(-w . d)) + l2/2 |w|^2, where
    each row of ``diffs`` (n, DIM) is phi(chosen) - phi(rejected)."""
    from scipy.optimize import minimize

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = diffs @ w
        value = np.logaddexp(0.0, -z).mean() + 0.5 * l2 * w @ w
        grad = -(diffs.T @ (1.0 / (1.0 + np.exp(z)))) / len(z) + l2 * w
        return float(value), grad

    return minimize(loss, np.zeros(diffs.shape[1]), jac=True, method="L-BFGS-B",
                    options={"maxiter": 200}).x


def fit_ensemble(diffs: np.ndarray, members: int, l2: float, rng: np.random.Generator
                 ) -> np.ndarray:
    """(DIM, members): one model per bootstrap resample of the labelled pairs."""
    return np.stack([fit_bt(diffs[rng.integers(0, len(diffs), len(diffs))], l2)
                     for _ in range(members)], axis=1)


def accuracy(weights: np.ndarray, eval_diffs: np.ndarray) -> float:
    """Share of held-out gold pairs the ensemble-mean reward orders right."""
    return float(((eval_diffs @ weights).mean(axis=1) > 0).mean())


def run_strategy(strategy: str, pool: dict[str, Any], eval_diffs: np.ndarray, budgets: list[int],
                 seed: int, members: int, l2: float) -> list[float]:
    """Accuracy after each budget in ``budgets`` (cumulative labels) for one strategy."""
    rows, pairs, phi, index = pool["rows"], pool["pairs"], pool["phi"], pool["index"]
    annotator = SimulatedAnnotator("honest", temperature=1.0)
    rng = np.random.default_rng([seed, 1])
    labelled: list[int] = []
    diffs: list[np.ndarray] = []
    weights = None
    out = []
    for round_no, budget in enumerate(budgets):
        done = set(labelled)
        todo = [i for i in range(len(pairs)) if i not in done]
        remaining = [pairs[i] for i in todo]
        scores = None
        if strategy == "uncertainty" and weights is not None:
            scores = S.pair_disagreement(phi @ weights, index, remaining, "bald")
        cfg = S.SelectionConfig(strategy=strategy if scores is not None else "random",
                                budget=budget - len(labelled), overlap_share=0.0,
                                gold_rate=0.0, seed=seed * 1000 + round_no)
        for task in S.plan(cfg, remaining, scores=scores).tasks:
            i = todo[remaining.index((task.row, task.a, task.b))]
            labelled.append(i)
            r, a, b = pairs[i]
            answers = rows[r].responses
            gold = synthetic.gold_score([rows[r].prompt] * 2, [answers[a], answers[b]])
            ranking = annotator.judge(rows[r].prompt, [answers[a], answers[b]], gold, rng)
            better, worse = (a, b) if ranking[0] == [0] else (b, a)
            diffs.append(phi[index[r][better]] - phi[index[r][worse]])
        weights = fit_ensemble(np.array(diffs), members, l2, rng)
        out.append(accuracy(weights, eval_diffs))
    return out


def make_pool(n_rows: int, n_eval: int, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    """Candidate pairs with their answers' features, and held-out gold pairs' differences."""
    rows = [CandidatesRecord(r["prompt"], r["responses"])
            for r in synthetic.candidate_rows(n_rows, k=2, seed=seed)]
    index, feats = [], []
    for row in rows:
        index.append(list(range(len(feats), len(feats) + len(row.responses))))
        feats.extend(features(row.prompt, a) for a in row.responses)
    held = synthetic.preference_rows(n_eval, seed=10_000 + seed, min_gap=0.5)
    eval_diffs = np.array([features(r["prompt"], r["chosen"]) - features(r["prompt"],
                                                                          r["rejected"])
                           for r in held])
    pool = {"rows": rows, "pairs": S.candidate_pairs(rows), "phi": np.array(feats),
            "index": index}
    return pool, eval_diffs


def labels_to_reach(target: float, budgets: Sequence[int], accs: Sequence[float]) -> str:
    for budget, acc in zip(budgets, accs, strict=True):
        if acc >= target - 1e-12:
            return str(budget)
    return f"> {budgets[-1]} (not reached)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="Seeds to average over.")
    parser.add_argument("--start", type=int, default=40, help="Labels of the first round.")
    parser.add_argument("--step", type=int, default=40, help="Labels added per round.")
    parser.add_argument("--rounds", type=int, default=8, help="Rounds (fits) per strategy.")
    parser.add_argument("--members", type=int, default=5, help="Ensemble members.")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 strength of each member.")
    parser.add_argument("--pool", type=int, default=1500, help="Candidate pairs to select from.")
    args = parser.parse_args(argv)
    budgets = [args.start + args.step * i for i in range(args.rounds)]
    t0 = time.perf_counter()
    accs: dict[str, list[list[float]]] = {"random": [], "uncertainty": []}
    for seed in range(args.seeds):
        pool, eval_diffs = make_pool(args.pool, 1000, seed)
        for strategy in accs:
            accs[strategy].append(run_strategy(strategy, pool, eval_diffs, budgets, seed,
                                               args.members, args.l2))
    mean = {s: np.mean(np.array(v), axis=0) for s, v in accs.items()}
    print(f"\n## Active selection: held-out gold accuracy vs labels ({args.seeds} seeds, "
          f"linear BT ensemble of {args.members}, {time.perf_counter() - t0:.0f} s)")
    print("| labels | random | uncertainty (BALD) |")
    print("|---|---|---|")
    for i, budget in enumerate(budgets):
        print(f"| {budget} | {mean['random'][i]:.3f} | {mean['uncertainty'][i]:.3f} |")
    target = float(mean["random"][-1])
    print(f"\nrandom reaches {target:.3f} with {budgets[-1]} labels; uncertainty reaches it with "
          f"{labels_to_reach(target, budgets, mean['uncertainty'])} labels")


if __name__ == "__main__":
    main()
