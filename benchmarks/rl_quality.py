"""Does RL against a learned reward model raise the hidden gold score? GRPO and PPO (ours) and
TRL's GRPOTrainer, same reward model, prompts, steps, batch and learning rate, several seeds.

    python -m benchmarks.rl_quality [--steps 100] [--seeds 0,1,2] [--workdir DIR]
    python -m benchmarks.rl_quality --beta 0.04 --sides ours-grpo,ours-grpo-uwo

The second line is the over-optimisation setting: at beta 0.04 the plain reward model is gamed
(gold falls while its reward climbs); ``ours-grpo-uwo`` optimises a 4-head ensemble trained on
the same preferences with ``--reward-uncertainty-penalty`` (mean - lambda x std, Coste et al.
2023; ``--penalty``).

The set-up is RLHF's: the SFT policy of ``benchmarks.grpo`` samples two answers to each of 2000
fresh prompts, the hidden gold judge (``rewardloop.synthetic:gold_score``) prefers one (pairs
closer than 0.2 in gold are dropped), and a reward model is trained on those preferences
(``train rm``, initialised from the SFT model). Every side then optimises that reward model's
normalised score -- never the gold -- and is judged by the gold on 1024 answers to 64 held-out
prompts (same sampling seed for every model).
TRL gets the reward model as a Python reward function built by ``rewardloop.rewards`` (the same
normalised scores ours computes), with TRL's KL bias correction off so both optimise the same
objective. Sides run in this one process, one after another (this measures learning, not
speed; ``benchmarks.grpo`` measures speed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.grpo import EVAL_PROMPTS, MAX_NEW_TOKENS, gold_samples, prepare

STEPS = 100
GENERATIONS, PROMPTS_PER_STEP = 4, 4
# PPO takes half the learning rate: it makes 4 passes per batch. beta 0.2, not the 0.04 of the
# speed benchmark: with a reward model of ~0.68 accuracy, beta 0.04 let both our GRPO and TRL's
# over-optimise it within 100 steps (reward +1.5, KL 2.5 per token, gold -1.0 on both sides).
LR, BETA = 2e-4, 0.2
EVAL_SAMPLES = 16  # per held-out prompt: 1024 answers, s.e. of the mean gold ~0.045
RM_PROMPTS, RM_MIN_GAP = 2000, 0.2


ENSEMBLE, PENALTY = 4, 1.0


def build_reward_model(work: Path, ensemble: int = 1) -> Path:
    """Preferences of the gold judge between two SFT samples per prompt -> ``work/rm`` (an
    ``ensemble``-head model on the same data: ``work/rm-ensN``)."""
    from rewardloop.train.reward import RewardConfig, train_rm

    rm = work / ("rm" if ensemble == 1 else f"rm-ens{ensemble}")
    if (rm / "summary.json").is_file():
        return rm
    if not (work / "rm_train.jsonl").is_file():
        _preferences(work)
    train_rm(RewardConfig(model=str(work / "sft" / "model"), data=work / "rm_train.jsonl",
                          eval_data=work / "rm_eval.jsonl", out=rm, epochs=2, batch_size=32,
                          lr=1e-3, max_length=128, device="cpu", overwrite=True,
                          ensemble=ensemble))
    return rm


def _preferences(work: Path) -> None:
    """``rm_train.jsonl`` / ``rm_eval.jsonl``: the gold judge's preferences between SFT
    samples."""
    from rewardloop import synthetic
    from rewardloop.models import load_policy, load_tokenizer
    from rewardloop.rollout import HFGenerator, SamplingSettings, encode_prompts

    policy = str(work / "sft" / "model")
    tokenizer = load_tokenizer(policy, padding_side="left")
    generator = HFGenerator(load_policy(policy, device="cpu"), tokenizer)
    prompts = [r["prompt"] for r in synthetic.prompt_rows(RM_PROMPTS, seed=3)]
    rows = []
    torch.manual_seed(3)
    for start in range(0, len(prompts), 64):
        chunk = prompts[start:start + 64]
        out = generator.generate(encode_prompts(tokenizer, chunk, 256), 2,
                                 SamplingSettings(max_new_tokens=MAX_NEW_TOKENS))
        gold = synthetic.gold_score([p for p in chunk for _ in range(2)], out.texts)
        for i, prompt in enumerate(chunk):
            (a, b), (ga, gb) = out.texts[2 * i:2 * i + 2], gold[2 * i:2 * i + 2]
            if a != b and abs(ga - gb) > RM_MIN_GAP:  # near-ties are coin flips to a person
                chosen, rejected = (a, b) if ga > gb else (b, a)
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    random.Random(0).shuffle(rows)
    cut = len(rows) // 5
    for name, part in (("rm_eval.jsonl", rows[:cut]), ("rm_train.jsonl", rows[cut:])):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in part))


def _gold(model_dir: str, work: Path) -> tuple[float, float]:
    scores = gold_samples(model_dir, work, EVAL_SAMPLES)
    mean = sum(scores) / len(scores)
    var = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)
    return mean, math.sqrt(var / len(scores))


def _curves(out: Path, reward_key: str, kl_key: str) -> tuple[list[float], list[float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[reward_key] for r in rows], [r.get(kl_key, 0.0) for r in rows]


def side_ours_grpo(work: Path, rm: Path, steps: int, seed: int, lr: float, beta: float,
                   penalty: float = 0.0, name: str = "ours-grpo") -> dict[str, Any]:
    from rewardloop.train.grpo import GRPOConfig, train

    out = work / f"{name}-{seed}"
    train(GRPOConfig(
        policy=str(work / "sft" / "model"), prompts=work / "prompts.jsonl", out=out,
        rewards=(str(rm),), advantage="grpo", num_generations=GENERATIONS,
        batch_size=GENERATIONS * PROMPTS_PER_STEP, max_steps=steps, lr=lr,
        max_new_tokens=MAX_NEW_TOKENS, kl_coef=beta, seed=seed, device="cpu",
        loss_aggregation="token-mean", sample_every=0, save_every=10_000, overwrite=True,
        reward_uncertainty_penalty=penalty))
    rewards, kl = _curves(out, "reward/mean", "kl_k3")
    return {"model": str(out / "model"), "reward_curve": rewards, "kl_curve": kl}


def side_ours_grpo_uwo(work: Path, rm: Path, steps: int, seed: int, lr: float, beta: float,
                       penalty: float = PENALTY) -> dict[str, Any]:
    """GRPO against the ENSEMBLE reward model, mean - penalty x std (``rm`` is not used: the
    ensemble is trained on the same preferences)."""
    return side_ours_grpo(work, build_reward_model(work, ENSEMBLE), steps, seed, lr, beta,
                          penalty=penalty, name="ours-grpo-uwo")


def side_ours_ppo(work: Path, rm: Path, steps: int, seed: int, lr: float, beta: float
                  ) -> dict[str, Any]:
    from rewardloop.train.ppo import PPOConfig, train

    out = work / f"ours-ppo-{seed}"
    train(PPOConfig(
        policy=str(work / "sft" / "model"), prompts=work / "prompts.jsonl", out=out,
        rewards=(str(rm),), value_model=str(rm), batch_size=GENERATIONS * PROMPTS_PER_STEP,
        max_steps=steps, lr=lr / 2, max_new_tokens=MAX_NEW_TOKENS, kl_coef=beta, seed=seed,
        device="cpu", sample_every=0, save_every=10_000, overwrite=True))
    rewards, kl = _curves(out, "reward/mean", "kl_k1")
    return {"model": str(out / "model"), "reward_curve": rewards, "kl_curve": kl}


def side_trl_grpo(work: Path, rm: Path, steps: int, seed: int, lr: float, beta: float
                  ) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rewardloop.rewards import ModelReward

    scorer = ModelReward(str(rm), device="cpu")

    def reward_model(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return scorer(prompts, completions)

    out = work / f"trl-grpo-{seed}"
    policy = str(work / "sft" / "model")
    prompts = [json.loads(x) for x in (work / "prompts.jsonl").read_text().splitlines()]
    args = GRPOConfig(
        output_dir=str(out), use_cpu=True, per_device_train_batch_size=GENERATIONS
        * PROMPTS_PER_STEP, gradient_accumulation_steps=1, num_generations=GENERATIONS,
        max_completion_length=MAX_NEW_TOKENS, learning_rate=lr, lr_scheduler_type="constant",
        max_steps=steps, beta=beta, temperature=1.0, seed=seed, logging_steps=1,
        report_to="none", save_strategy="no", bf16=False, disable_dropout=True,
        dataloader_num_workers=0, activation_checkpointing=False, loss_type="dapo",
        scale_rewards="group", use_bias_correction_kl=False)
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy,
                                                                     dtype=torch.float32),
                          reward_funcs=reward_model, args=args,
                          train_dataset=Dataset.from_list(prompts),
                          processing_class=AutoTokenizer.from_pretrained(policy,
                                                                         padding_side="left"))
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; the tables stay whole
        trainer.train()
    trainer.save_model(str(out / "model"))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"model": str(out / "model"), "reward_curve": [h["reward"] for h in logs],
            "kl_curve": [h.get("kl", 0.0) for h in logs]}


SIDES = {"ours-grpo": side_ours_grpo, "trl-grpo": side_trl_grpo, "ours-ppo": side_ours_ppo,
         "ours-grpo-uwo": side_ours_grpo_uwo}


def _every(values: list[float], n: int) -> str:
    """Means of consecutive blocks of ``n`` values, as a compact curve."""
    blocks = [values[i:i + n] for i in range(0, len(values), n)]
    return " ".join(f"{sum(b) / len(b):+.2f}" for b in blocks if b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimisation steps per run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds per side")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides")
    parser.add_argument("--lr", type=float, default=LR, help="GRPO learning rate (PPO: half)")
    parser.add_argument("--beta", type=float, default=BETA, help="KL coefficient of every side")
    parser.add_argument("--workdir", type=Path, default=None, help="where models and runs go")
    parser.add_argument("--penalty", type=float, default=PENALTY,
                        help="lambda of ours-grpo-uwo's ensemble reward mean - lambda x std")
    args = parser.parse_args()
    sides = {**SIDES, "ours-grpo-uwo": functools.partial(side_ours_grpo_uwo,
                                                         penalty=args.penalty)}
    torch.set_num_threads(1)
    work = args.workdir or Path(tempfile.gettempdir()) / "rewardloop-bench-grpo"
    prepare(work)
    rm = build_reward_model(work)
    rm_summary = json.loads((rm / "summary.json").read_text())
    before, before_se = _gold(str(work / "sft" / "model"), work)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"\n## RL against a learned reward model: {args.steps} steps x "
          f"{GENERATIONS * PROMPTS_PER_STEP} completions, {MAX_NEW_TOKENS} new tokens, "
          f"lr {args.lr} (PPO {args.lr / 2}), beta {args.beta}, CPU")
    print(f"reward model: held-out accuracy {rm_summary.get('eval_accuracy', float('nan')):.3f}"
          f" on the gold judge's preferences between SFT samples")
    print(f"gold before (SFT policy, {EVAL_PROMPTS * EVAL_SAMPLES} samples): {before:+.3f} "
          f"(s.e. {before_se:.3f})\n")
    print("| side | seed | gold after (s.e.) | gain | wall s | reward, means of 10 steps | "
          "KL per token, means of 10 steps |")
    print("|---|---|---|---|---|---|---|")
    gains: dict[str, list[float]] = {}
    for name in args.sides.split(","):
        for seed in seeds:
            t0 = time.perf_counter()
            result = sides[name](work, rm, args.steps, seed, args.lr, args.beta)
            wall = time.perf_counter() - t0
            after, se = _gold(result["model"], work)
            gains.setdefault(name, []).append(after - before)
            print(f"| {name} | {seed} | {after:+.3f} ({se:.3f}) | {after - before:+.3f} | "
                  f"{wall:.0f} | {_every(result['reward_curve'], 10)} | "
                  f"{_every(result['kl_curve'], 10)} |", flush=True)
    print("\n| side | mean gold gain over seeds | min | max |")
    print("|---|---|---|---|")
    for name, values in gains.items():
        print(f"| {name} | {sum(values) / len(values):+.3f} | {min(values):+.3f} | "
              f"{max(values):+.3f} |")


if __name__ == "__main__":
    main()
