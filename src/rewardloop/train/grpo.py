"""Critic-free online RL: GRPO, RLOO and REINFORCE++ in one explicit loop.

Each step: draw ``batch_size / num_generations`` prompts, sample ``num_generations`` completions
per prompt, score them (``rewardloop.rewards``), turn the scores into advantages with the
estimator named by ``advantage`` (``ADVANTAGES``), then run ``ppo_epochs`` passes of clipped
policy-gradient updates over minibatches of the batch. The three methods differ only in the
baseline:

- ``grpo`` (Shao et al. 2024): score minus its group's mean, divided by the group's std unless
  ``scale_rewards=False`` (Dr. GRPO); KL to the reference as a k3 term in the loss by default;
- ``rloo`` (Ahmadian et al. 2024): score minus the mean of the OTHER samples of its prompt; KL
  (k1, summed over the sequence) subtracted from the score by default, as in the paper;
- ``reinforce++`` (Hu 2025): per-token rewards (k1 KL penalty on every token, score on the last
  real one), discounted returns whitened over the whole batch; no groups needed.

Batch sizes, all counted in completions: ``batch_size`` per step (sampled together);
``mini_batch_size`` per optimizer update (``ppo_epochs * batch_size / mini_batch_size`` updates
a step); ``micro_batch_size`` per forward/backward (gradient accumulation; the losses are
normalised by the minibatch's global token/sequence counts, so the split does not change them).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rewardloop import ops, pg_losses
from rewardloop.engines.options import EngineOptions
from rewardloop.errors import UserError
from rewardloop.models import LoraSettings
from rewardloop.ops import KL_ESTIMATORS
from rewardloop.train.configs import GRPOConfig
from rewardloop.train.runtime import Runtime

if TYPE_CHECKING:
    from rewardloop.models import HFModel
    from rewardloop.rewards import FunctionReward, RewardOutput, Rewards
    from rewardloop.rollout import Rollout
    from rewardloop.train.data import EpochSampler
    from rewardloop.train.roles import RemoteReference, RemoteRoles
    from rewardloop.train.run import RunDir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Advantage estimators, chosen once by name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInput:
    """What an estimator sees: N = prompts x num_generations completions, contiguous groups."""

    scores: torch.Tensor  # (N,) total reward of each completion
    kl: torch.Tensor | None  # (N, C) per-token KL estimate to the reference (None: no KL)
    mask: torch.Tensor  # (N, C) completion mask
    kl_coef: float
    kl_in_reward: bool
    group_size: int
    scale_rewards: bool
    gamma: float
    reduce_sum: ops.ReduceSum | None = None  # sums over processes: whole-batch statistics


def _sequence_scores(a: AdvantageInput) -> torch.Tensor:
    """Scores with the sequence's summed KL subtracted when the KL lives in the reward. (N,)"""
    if a.kl_in_reward and a.kl is not None and a.kl_coef:
        return a.scores - a.kl_coef * ops.masked_sum(a.kl, a.mask, dim=-1)
    return a.scores


def _grpo(a: AdvantageInput) -> torch.Tensor:
    return ops.group_advantages(_sequence_scores(a), a.group_size, a.scale_rewards)[0]


def _rloo(a: AdvantageInput) -> torch.Tensor:
    return ops.rloo_advantages(_sequence_scores(a), a.group_size)


def _reinforce_pp(a: AdvantageInput) -> torch.Tensor:
    kl = a.kl if a.kl is not None and a.kl_in_reward else torch.zeros_like(a.scores[:, None]
                                                                           * a.mask)
    return ops.reinforce_pp_advantages(a.scores, kl, a.mask, a.kl_coef, a.gamma,
                                       reduce_sum=a.reduce_sum)[0]


ADVANTAGES: dict[str, Callable[[AdvantageInput], torch.Tensor]] = {
    "grpo": _grpo,
    "rloo": _rloo,
    "reinforce++": _reinforce_pp,
}
"""Estimator name -> advantages, (N,) one per sequence or (N, C) one per token."""


# ---------------------------------------------------------------------------------------------
# Set-up shared with train/ppo.py
# ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything an RL run builds before its loop."""

    rt: Runtime
    run: RunDir
    tokenizer: Any
    policy: HFModel  # the trained causal LM (peft-wrapped with LoRA), wrapped for DDP/FSDP
    inner: HFModel  # the same model unwrapped: generation and adapters-off reference
    # Frozen copy, or a reference in another process (RemoteReference: Ray); None with LoRA
    # (adapters off) or without KL.
    reference: HFModel | RemoteReference | None
    prompts: list[Any]  # prompt texts / chats
    prompt_ids: list[list[int]]
    extras: dict[str, list[Any]]  # meta keys every prompt has, for reward functions
    rewards: Rewards
    gold: FunctionReward | None
    sampler: EpochSampler  # over prompts
    kl_ctl: ops.AdaptiveKLController | ops.FixedKLController


def setup_run(cfg: Any, rt: Runtime, *, needs_reference: bool,
              roles: RemoteRoles | None = None) -> Setup:
    """Run dir (checked; the trainer starts it after its restore), seeding, tokenizer, policy
    (+LoRA), reference, prompts, rewards, sampler.

    The sampler draws the step's prompts alike on every process; each takes its share
    (``Runtime.shard``). The policy comes back wrapped for the runtime's strategy. ``roles``
    may score the reward models elsewhere (Ray actors).
    """
    from rewardloop.data.formats import PromptRecord, read_records
    from rewardloop.models import disable_dropout, load_policy, load_tokenizer, match_tokenizer
    from rewardloop.rewards import FunctionReward, ModelReward, Rewards, parse_reward_spec
    from rewardloop.rollout import encode_prompts
    from rewardloop.train.data import EpochSampler
    from rewardloop.train.run import RunDir
    from rewardloop.util.seed import seed_everything

    check_sizes(cfg, rt)
    rt.check_merge_lora(cfg.merge_lora)
    records = [r for r in read_records(cfg.prompts, "prompts")[1] if isinstance(r, PromptRecord)]
    if len(records) < cfg.prompts_per_step:
        raise UserError(f"{cfg.prompts} has {len(records)} prompts but each step needs "
                        f"{cfg.prompts_per_step} (batch_size / num_generations)")
    # Checked now, started by the trainer once everything has loaded (RunDir.start).
    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, runtime=rt,
                 report_to=cfg.report_to, start=False)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code,
                               add_pad_token=cfg.add_pad_token, padding_side="left",
                               chat_template=cfg.chat_template)
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None
    inner = load_policy(cfg.policy, dtype=rt.weights_dtype(cfg.dtype), device=str(rt.device),
                        lora=lora, trust_remote_code=cfg.trust_remote_code)
    match_tokenizer(inner, tokenizer)
    disable_dropout(inner)  # rollout and update must see the same log-probs
    reference: HFModel | RemoteReference | None = None
    if needs_reference and lora is None:
        reference = roles.reference() if roles is not None else None
        if reference is None:
            # Frozen: kept in the compute precision, not in the policy's fp32 master weights.
            frozen = copy.deepcopy(inner).eval().to(rt.compute_dtype)
            frozen.requires_grad_(False)
            reference = rt.prepare(frozen, trainable=False)
    policy = rt.prepare(inner)
    prompts = [r.prompt for r in records]
    metas = [r.meta for r in records]
    common = set.intersection(*(set(m) for m in metas)) if metas else set()
    extras = {k: [m[k] for m in metas] for k in sorted(common)}
    rewards = Rewards([parse_reward_spec(s) for s in cfg.rewards], reward_clip=cfg.reward_clip,
                      missing_eos_penalty=cfg.missing_eos_penalty, device=str(rt.device),
                      batch_size=cfg.reward_batch_size,
                      max_length=cfg.max_prompt_length + cfg.max_new_tokens,
                      uncertainty_penalty=cfg.reward_uncertainty_penalty,
                      model_reward=roles.reward_model if roles is not None else None)
    if rt.strategy == "fsdp":
        # Reward models are sharded like the policy. Every rank scores as many completions
        # in as many batches, so their forward passes (collectives under FSDP) line up.
        for _, _, source in rewards.sources:
            if isinstance(source, ModelReward):
                source.scorer.model = rt.prepare(source.scorer.model, trainable=False)
    gold = FunctionReward(cfg.gold, "--gold") if cfg.gold else None
    sampler = EpochSampler(len(records), cfg.prompts_per_step, cfg.seed, drop_last=True)
    kl_ctl = (ops.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
              if cfg.kl_target is not None else ops.FixedKLController(cfg.kl_coef))
    return Setup(rt, run, tokenizer, policy, inner, reference, prompts,
                 encode_prompts(tokenizer, prompts, cfg.max_prompt_length), extras, rewards,
                 gold, sampler, kl_ctl)


def seed_sampling(cfg: Any, rt: Runtime) -> None:
    """After the models are built (alike on every process): each process samples its own
    completions, so each gets its own random stream."""
    if rt.distributed:
        from rewardloop.util.seed import seed_everything

        seed_everything(cfg.seed + 7919 * rt.rank)


def check_sizes(cfg: Any, rt: Runtime) -> None:
    """Every process gets whole prompts (groups) and whole minibatches (exit 2 otherwise)."""
    rt.check_divisible(cfg.prompts_per_step, "prompts per step (batch_size / num_generations)")
    rt.check_divisible(cfg.mini_batch_size, "--mini-batch-size")
    local_mini = cfg.mini_batch_size // rt.world_size
    if local_mini % local_micro(cfg, rt):
        raise UserError(f"each process's share of --mini-batch-size ({local_mini}) must be a "
                        f"multiple of --micro-batch-size ({cfg.micro_batch_size})")


def local_micro(cfg: Any, rt: Runtime) -> int:
    """Completions per forward/backward pass in this process."""
    return min(cfg.micro_batch_size, cfg.mini_batch_size // rt.world_size)


def make_optimizer(model: Any, cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters, with linear warm-up then a constant rate."""
    from rewardloop.train.run import adamw

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: min(1.0, (update + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def reference_logps(setup: Setup, rollout: Any, temperature: float, micro_batch_size: int
                    ) -> torch.Tensor:
    """(B, C) log-probs under the reference: the frozen copy, or the policy with LoRA off."""
    from rewardloop.models import disable_adapter
    from rewardloop.rollout import batched_logps

    if setup.reference is not None and not isinstance(setup.reference, torch.nn.Module):
        return setup.reference.logps(rollout, temperature, micro_batch_size)
    with setup.rt.autocast():
        if setup.reference is not None:
            return batched_logps(setup.reference, rollout, temperature, micro_batch_size)
    with disable_adapter(setup.inner) as base, setup.rt.autocast():
        return batched_logps(base, rollout, temperature, micro_batch_size)


def score_rollout(setup: Setup, rows: list[int], rollout: Any, n: int) -> tuple[Any, dict]:
    """Rewards of a rollout whose prompts are ``rows`` (each repeated ``n`` times), their total
    on the rollout's device (reward functions and models answer on the CPU; the advantages are
    computed beside the log-probs); metrics include the gold judge's mean when one is
    configured."""
    prompts = [setup.prompts[i] for i in rows for _ in range(n)]
    mask = rollout.completion_mask.bool()
    extra = {k: [v[i] for i in rows for _ in range(n)] for k, v in setup.extras.items()}
    ids = [row[m].tolist() for row, m in zip(rollout.completion_ids, mask, strict=True)]
    prompt_ids = [setup.prompt_ids[i] for i in rows for _ in range(n)]
    out = setup.rewards(prompts, rollout.texts, has_eos=rollout.has_eos.tolist(),
                        completion_ids=ids, prompt_ids=prompt_ids, **extra)
    metrics = out.metrics()
    out = dataclasses.replace(out, total=out.total.to(rollout.completion_ids.device))
    if setup.gold is not None:
        gold = setup.gold(prompts, rollout.texts, completion_ids=ids,
                          has_eos=rollout.has_eos.tolist(), **extra)
        metrics["gold/mean"] = sum(gold) / len(gold)
    return out, metrics


def write_samples(setup: Setup, cfg: Any, step: int, rows: list[int], rollout: Any,
                  rewards: torch.Tensor) -> None:
    """Every ``sample_every`` steps, the first ``num_samples`` completions to samples.jsonl."""
    from rewardloop.rollout import append_samples, sample_records

    if cfg.sample_every and step % cfg.sample_every == 0 and setup.rt.is_main:
        prompts = [setup.prompts[i] for i in rows for _ in range(cfg.num_generations)]
        append_samples(setup.run.out / "samples.jsonl",
                       sample_records(step, prompts, rollout, rewards, cfg.num_samples))


def finish(setup: Setup, cfg: Any, history: Sequence[Mapping[str, Any]], **extra_models: Any
           ) -> dict[str, Any]:
    """Save the model(s) and summary.json (throughput, memory, reward/gold first vs last)."""
    setup.rt.save_model(setup.policy, setup.tokenizer, setup.run.model_dir,
                        merge_lora=getattr(cfg, "merge_lora", False))
    for name, model in extra_models.items():
        setup.rt.save_model(model, setup.tokenizer, setup.run.out / name)
    figures: dict[str, Any] = {}
    tail = max(1, len(history) // 10)  # the last 10% of steps (at least one)
    for key in ("reward/mean", "gold/mean", "kl_k1", "completion_length_mean"):
        values = [h[key] for h in history if isinstance(h.get(key), int | float)]
        if values:
            short = key.replace("/mean", "").replace("/", "_")
            figures[f"{short}_first"] = values[0]
            figures[f"{short}_last"] = sum(values[-tail:]) / len(values[-tail:])
    return setup.run.write_summary(figures)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """One step's sampled batch and everything the update needs (B completions, width C)."""

    rows: list[int]  # prompt indices, each sampled num_generations times
    rollout: Rollout
    rewards: RewardOutput
    old_logps: torch.Tensor | None  # (B, C) sampling-time policy log-probs, when needed
    ref_logps: torch.Tensor | None  # (B, C) reference log-probs (None without KL)
    advantages: torch.Tensor | None  # (B,) or (B, C); None until the update computes them
    kl_coef: float
    metrics: dict[str, float]
    # With the KL in the reward and one update on one micro-batch, the advantages need the
    # sampling policy's log-probs, which the update's own forward pass gives (detached): this
    # makes them from those, saving a separate forward pass of the policy every step.
    advantages_from: Callable[[torch.Tensor], torch.Tensor] | None = None
    is_weights: torch.Tensor | None = None  # (B, C) off-policy correction (another engine)
    loss_mask: torch.Tensor | None = None
    """(B, C) the tokens the update trains on when not every completion token is
    (``--mask-truncated``: a cut completion's are none)."""

    @property
    def trained_mask(self) -> torch.Tensor:
        return self.loss_mask if self.loss_mask is not None else self.rollout.completion_mask


def make_experience(cfg: GRPOConfig, setup: Setup, generator: Any, settings: Any,
                    reuse_samples: bool) -> Experience:
    """Sample, score, compute old/reference log-probs and advantages for one step."""
    from rewardloop.rollout import batched_logps

    rt = setup.rt
    n, mb = cfg.num_generations, local_micro(cfg, rt)
    use_kl = cfg.kl_coef > 0 or cfg.kl_target is not None
    rows = rt.shard(setup.sampler.next_batch())  # this process's prompts, whole groups
    t0 = time.perf_counter()
    with rt.gathered(setup.policy):
        rollout = generator.generate([setup.prompt_ids[i] for i in rows], n, settings)
    t1 = time.perf_counter()
    reward_out, metrics = score_rollout(setup, rows, rollout, n)
    t2 = time.perf_counter()
    kl_in_reward = use_kl and cfg.kl_in == "reward"
    # With one update on the whole batch the sampling policy IS the one being updated, so its
    # log-probs are the detached new ones and need no extra pass. If the reward needs the KL
    # before the update, the update computes the advantages from its own forward pass when it
    # is a single micro-batch (``advantages_from``); otherwise an extra pass gives them now.
    # Samples from another engine (sampler_logps set) always need the trainer's own pass.
    external = rollout.sampler_logps is not None
    deferred = kl_in_reward and not reuse_samples and mb >= len(rollout) and not external
    with rt.autocast():
        old_logps = (batched_logps(setup.policy, rollout, cfg.temperature, mb)
                     if reuse_samples or external or (kl_in_reward and not deferred) else None)
    is_weights = None
    if external:
        assert old_logps is not None  # computed above whenever the samples are external
        is_weights, mismatch = off_policy_correction(cfg, rollout, old_logps)
        metrics.update(mismatch)
    ref_logps = reference_logps(setup, rollout, cfg.temperature, mb) if use_kl else None
    kl_coef = setup.kl_ctl.value

    def advantages_from(sampled_logps: torch.Tensor | None) -> torch.Tensor:
        kl_tokens = None  # (B, C) with the KL in the reward: then both log-probs are there
        if kl_in_reward and sampled_logps is not None and ref_logps is not None:
            kl_tokens = KL_ESTIMATORS[cfg.kl_estimator](sampled_logps, ref_logps)
        return ADVANTAGES[cfg.advantage](AdvantageInput(
            reward_out.total, kl_tokens, rollout.completion_mask, kl_coef, kl_in_reward, n,
            cfg.scale_rewards, cfg.gamma, rt.all_reduce if rt.distributed else None))

    advantages = None if deferred else advantages_from(old_logps)
    if n > 1:
        group_std = reward_out.total.view(-1, n).std(dim=1)
        metrics["frac_reward_zero_std"] = float((group_std < 1e-6).float().mean())
    metrics.update({"time_generate_s": t1 - t0, "time_score_s": t2 - t1})
    if advantages is not None:
        metrics["advantage_abs_mean"] = float(advantages.abs().mean())
    metrics["time_ref_s"] = time.perf_counter() - t2
    return Experience(rows, rollout, reward_out, old_logps, ref_logps, advantages, kl_coef,
                      metrics, advantages_from if deferred else None, is_weights,
                      without_truncated(rollout) if cfg.mask_truncated else None)


def without_truncated(rollout: Rollout) -> torch.Tensor:
    """The completion mask (B, C) with the completions cut at max_new_tokens (no EOS) left out
    (DAPO's overlong filtering, Yu et al. 2025; TRL's mask_truncated_completions): an answer
    that did not end is not judged as if it had. It still counts for its group's baseline."""
    return rollout.completion_mask * rollout.has_eos.to(rollout.completion_mask.dtype)[:, None]


def prefetch_next(cfg: Any, setup: Setup, generator: Any, settings: Any) -> None:
    """One-step off-policy (``async_rollout``): ask ``generator`` (a Ray generator) to start
    sampling the next step's prompts now, with the weights from before this step's update;
    the sampler itself is left where it is."""
    state = setup.sampler.state_dict()
    rows = setup.rt.shard(setup.sampler.next_batch())
    setup.sampler.load_state_dict(state)
    generator.prefetch([setup.prompt_ids[i] for i in rows], cfg.num_generations, settings)


def off_policy_correction(cfg: Any, rollout: Any, old_logps: torch.Tensor
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights (B, C) for samples drawn by another engine (``cfg.is_level``,
    ``cfg.is_cap``) and the sampler/trainer mismatch metrics (docs/generation.md)."""
    mask = rollout.completion_mask
    weights = pg_losses.truncated_is_weights(old_logps, rollout.sampler_logps, mask,
                                             cfg.is_cap, cfg.is_level)
    metrics = pg_losses.sampler_mismatch(old_logps, rollout.sampler_logps, mask)
    metrics["is_weight_mean"] = float(ops.masked_mean(weights, mask))
    return weights, metrics


def micro_step(cfg: Any, rt: Runtime, policy: Any, exp: Experience, idx: torch.Tensor,
               common: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward + backward of one micro-batch ``idx``; returns its new log-probs (b, C) and
    metrics (loss parts, token means)."""
    from rewardloop.rollout import completion_forward

    mc = exp.rollout.select(idx)
    mask = exp.trained_mask[idx]
    with rt.autocast():
        fwd = completion_forward(policy, mc, cfg.temperature, with_entropy=True,
                                 entropy_grad=cfg.entropy_coef > 0)
    old = exp.old_logps[idx] if exp.old_logps is not None else fwd.logps.detach()
    if exp.advantages is None:  # deferred: this micro-batch is the whole batch, in order
        if exp.advantages_from is None or len(idx) != len(exp.rollout):
            raise RuntimeError("deferred advantages need the whole batch in one micro-batch")
        exp.advantages = exp.advantages_from(old)
        exp.metrics["advantage_abs_mean"] = float(exp.advantages.abs().mean())
    loss, metrics = pg_losses.ppo_clip_loss(
        fwd.logps, old, exp.advantages[idx], mask, cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
        is_weights=exp.is_weights[idx] if exp.is_weights is not None else None, **common)
    metrics["pg_loss"] = loss.detach()
    if exp.ref_logps is not None and cfg.kl_in == "loss":
        kl_loss, _ = pg_losses.kl_penalty_loss(fwd.logps, exp.ref_logps[idx], mask, exp.kl_coef,
                                               cfg.kl_estimator, **common)
        loss = loss + kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    assert fwd.entropy is not None  # asked for with with_entropy=True
    ent_loss, ent = pg_losses.entropy_bonus(fwd.entropy, mask, cfg.entropy_coef, **common)
    if cfg.entropy_coef:
        loss = loss + ent_loss
    rt.backward(loss)
    metrics.update(ent, loss=loss.detach())
    return fwd.logps.detach(), metrics


@dataclass
class Minibatch:
    """This process's share of one optimizer update."""

    common: dict[str, Any]  # loss aggregation mode and the minibatch's GLOBAL counts
    micro: list[torch.Tensor]  # row indices of each forward/backward pass


def minibatches(cfg: Any, rt: Runtime, mask: torch.Tensor, order: torch.Tensor
                ) -> Iterator[Minibatch]:
    """The minibatches of one pass over this process's rows in ``order``; each carries the
    token and sequence counts summed over all processes, which its losses divide by."""
    mini, micro = cfg.mini_batch_size // rt.world_size, local_micro(cfg, rt)
    for start in range(0, len(order), mini):
        rows = order[start:start + mini]
        # Sequences count when they are in the loss: one cut under --mask-truncated has no
        # trained token, and counting it would shrink the step with the truncation rate.
        tokens, seqs = rt.sum_floats(float(mask[rows].sum()),
                                     float((mask[rows].sum(dim=1) > 0).sum()))
        # (no tokens at all: every completion was cut under --mask-truncated; the sums are 0)
        yield Minibatch({"mode": cfg.loss_aggregation, "global_tokens": max(tokens, 1.0),
                         "global_seqs": max(seqs, 1.0),
                         "norm_length": float(cfg.max_new_tokens)},
                        [rows[k:k + micro] for k in range(0, len(rows), micro)])


def add_metrics(sums: dict[str, float], metrics: dict[str, torch.Tensor], tokens: float,
                loss_keys: tuple[str, ...]) -> None:
    """Loss parts add up as they are (each already divided by a global count); the other
    metrics are token means, weighted by the micro-batch's ``tokens``."""
    for key, value in metrics.items():
        sums[key] = sums.get(key, 0.0) + float(value) * (1.0 if key in loss_keys else tokens)


def update_policy(cfg: GRPOConfig, setup: Setup, optimizer: Any, scheduler: Any,
                  exp: Experience, reuse_samples: bool, step: int
                  ) -> tuple[dict[str, float], torch.Tensor]:
    """``ppo_epochs`` passes of minibatch updates; returns metrics of the whole batch (all
    processes) and this process's first-pass log-probs (B, C) (the sampling policy's when
    ``reuse_samples`` is off).

    Each process updates on its share of every minibatch; the losses divide by the
    minibatch's token and sequence counts summed over all processes.
    """
    rt, policy = setup.rt, setup.policy
    mask = exp.trained_mask
    first_pass = torch.zeros_like(mask, dtype=torch.float32)
    # Loss parts are summed over micro-batches (each already divided by the global count);
    # token statistics are token-weighted means over everything processed.
    loss_keys = ("loss", "pg_loss", "kl_loss")
    sums: dict[str, float] = {}
    tokens, updates, grad_norms = 0.0, 0, 0.0
    params = [p for g in optimizer.param_groups for p in g["params"]]  # see ppo.update
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(mask)) if reuse_samples else torch.arange(len(mask))
        for mb in minibatches(cfg, rt, mask, order):
            local_loss = 0.0
            for k, idx in enumerate(mb.micro):
                rt.sync_gradients(policy, last=k == len(mb.micro) - 1)
                logps, m = micro_step(cfg, rt, policy, exp, idx, mb.common)
                if epoch == 0:
                    first_pass[idx] = logps
                weight = float(mask[idx].sum())
                tokens += weight
                local_loss += float(m["loss"])
                add_metrics(sums, m, weight, loss_keys)
            lr = optimizer.param_groups[0]["lr"]  # the last update's (the scheduler moves it)
            grad_norms += rt.optimizer_step(optimizer, params, cfg.max_grad_norm, step=step,
                                            loss=local_loss, run=setup.run, scheduler=scheduler)
            updates += 1
    keys = sorted(sums)
    *totals, tokens = rt.sum_floats(*(sums[k] for k in keys), tokens)
    metrics = {k: v / (updates if k in loss_keys else max(tokens, 1.0))
               for k, v in zip(keys, totals, strict=True)}
    metrics["grad_norm"] = grad_norms / updates
    metrics["lr"] = lr
    return metrics, first_pass


TOKEN_MEANS = ("kl_k1", "kl_k3", "sampler_kl", "sampler_kl_k3", "is_ratio_mean",
               "is_weight_mean", "returns_mean")
"""Logged means over completion tokens, which ranks hold in different numbers: reduced over
ranks weighed by each one's tokens (``Runtime.reduce_metrics``), not as a mean of means."""


def token_weights(local: Mapping[str, float], mask: torch.Tensor) -> dict[str, float]:
    """``reduce_metrics``'s weights for the token means of ``local``: this rank's tokens."""
    tokens = float(mask.sum())
    return {k: tokens for k in TOKEN_MEANS if k in local}


def kl_metrics(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
               ) -> dict[str, float]:
    """Both estimators of KL(policy || reference), per token, and k1 summed per sequence."""
    k1 = ops.kl_k1(policy_logps, ref_logps)
    return {"kl_k1": float(ops.masked_mean(k1, mask)),
            "kl_k3": float(ops.masked_mean(ops.kl_k3(policy_logps, ref_logps), mask)),
            "kl_seq_k1": float(ops.masked_sum(k1, mask) / mask.shape[0])}


def train(cfg: GRPOConfig, roles: RemoteRoles | None = None) -> dict[str, Any]:
    """Run GRPO / RLOO / REINFORCE++ per ``cfg``; returns the summary written to summary.json.
    ``roles``: generation and reward-model scoring in other processes (``rewardloop.cluster``)."""
    from rewardloop.train.runtime import runtime_for

    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt, roles)


def _train(cfg: GRPOConfig, rt: Runtime, roles: RemoteRoles | None = None) -> dict[str, Any]:
    from rewardloop.engines.factory import make_generator
    from rewardloop.rollout import SamplingSettings, rollout_metrics, truncate_samples
    from rewardloop.train.run import save_checkpoint
    from rewardloop.util.progress import progress_bar

    setup = setup_run(cfg, rt, needs_reference=cfg.kl_coef > 0 or cfg.kl_target is not None,
                      roles=roles)
    run, policy = setup.run, setup.policy
    optimizer, scheduler = make_optimizer(policy, cfg)
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    # The built-in loop samples from the unwrapped model (under FSDP inside Runtime.gathered);
    # an engine gets pushed the weights after every update.
    generator: Any = roles.generator(setup.inner, setup.tokenizer, settings) if roles else \
        make_generator(EngineOptions.of(cfg), setup.inner, setup.tokenizer, cfg.policy,
                       seed=cfg.seed, logprob_settings=settings, dtype=rt.frozen_dtype("auto"),
                       max_lengths=(cfg.max_prompt_length, cfg.max_new_tokens))
    if rt.distributed:  # a colocated engine of several ranks lives on their process group
        rt.before_leaving(getattr(generator, "close", None))
    reuse_samples = cfg.ppo_epochs > 1 or cfg.mini_batch_size < cfg.batch_size
    seed_sampling(cfg, rt)
    step = 0
    ckpt = run.restore(models={"policy": policy}, optimizers={"policy": optimizer},
                       schedulers={"policy": scheduler}, runtime=rt)
    if ckpt is not None:
        step = ckpt.step
        setup.sampler.load_state_dict(ckpt.sampler_state)
        setup.kl_ctl.load_state_dict(ckpt.extra["kl_ctl"])
        generator.policy_updated(policy)  # an engine's copy holds the initial weights
    run.start()  # everything loaded and the checkpoint accepted: only now is --out changed
    if rt.is_main:
        truncate_samples(run.out / "samples.jsonl", step)
    history = run.logged_metrics()  # a resumed run's summary covers the steps before it too
    policy.train()
    with progress_bar(cfg.max_steps, cfg.advantage, start=step) as show:
        while step < cfg.max_steps:
            exp = make_experience(cfg, setup, generator, settings, reuse_samples)
            if cfg.async_rollout:  # the next step's samples are drawn during this update
                exp.metrics["staleness"] = generator.staleness
                prefetch_next(cfg, setup, generator, settings)
            t0 = time.perf_counter()
            train_metrics, first_pass = update_policy(cfg, setup, optimizer, scheduler, exp,
                                                      reuse_samples, step + 1)
            generator.policy_updated(policy)
            step += 1
            time_ref = exp.metrics.pop("time_ref_s")  # reference/old log-probs count as training
            local = {**exp.metrics, **rollout_metrics(exp.rollout),
                     "time_train_s": time.perf_counter() - t0 + time_ref}
            if exp.ref_logps is not None:
                sampled = exp.old_logps if exp.old_logps is not None else first_pass
                local.update(kl_metrics(sampled, exp.ref_logps, exp.rollout.completion_mask))
            metrics = {**rt.reduce_metrics(local, count=len(exp.rollout), weights=token_weights(
                local, exp.rollout.completion_mask)), **train_metrics}
            if exp.ref_logps is not None:
                metrics["kl_coef"] = exp.kl_coef
                setup.kl_ctl.update(metrics["kl_seq_k1"], len(exp.rollout) * rt.world_size)
            tokens = rt.sum_floats(float(exp.rollout.attention_mask.sum()))[0]
            run.meter.step(samples=len(exp.rollout) * rt.world_size, tokens=int(tokens))
            run.log_metrics(step, metrics)
            history.append(metrics)
            write_samples(setup, cfg, step, exp.rows, exp.rollout, exp.rewards.total)
            show(step, f"reward {metrics['reward/mean']:.3f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(run, step, models={"policy": policy},
                                optimizers={"policy": optimizer},
                                schedulers={"policy": scheduler},
                                sampler_state=setup.sampler.state_dict(),
                                extra={"kl_ctl": setup.kl_ctl.state_dict()}, runtime=rt)
    return finish(setup, cfg, history)
