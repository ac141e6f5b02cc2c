"""PPO with a learned critic for language models (Ziegler et al. 2019; Ouyang et al. 2022), in
one explicit loop, following "The N Implementation Details of RLHF with PPO" (Huang et al.).

Each step: sample ``batch_size`` completions, score them, build per-token rewards (``-kl_coef *
k1`` on every token, plus the sequence score on the LAST REAL token of the completion), estimate
per-token values with a separate value model, compute GAE advantages (whitened over the real
tokens) and returns, then run ``ppo_epochs`` passes of minibatch updates of the policy (clipped
surrogate, optional dual clip, entropy bonus) and of the value model (clipped value loss).

The value model is a scalar-head classifier (``models.load_value_model``) started from
``value_model`` (usually the reward model's directory) or, without one, from the policy's
weights with a fresh head. The reference is a frozen copy of the initial policy, or the policy
with its LoRA adapters disabled. Batch-size semantics are those of ``train/grpo.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rewardloop import ops, pg_losses
from rewardloop.engines.options import EngineOptions
from rewardloop.train.configs import PPOConfig
from rewardloop.train.grpo import (
    Setup,
    add_metrics,
    finish,
    kl_metrics,
    local_micro,
    make_optimizer,
    minibatches,
    off_policy_correction,
    reference_logps,
    score_rollout,
    seed_sampling,
    setup_run,
    token_weights,
    write_samples,
)
from rewardloop.train.runtime import Runtime

if TYPE_CHECKING:
    from rewardloop.rewards import RewardOutput
    from rewardloop.rollout import Rollout
    from rewardloop.train.roles import RemoteRoles



def load_value(cfg: PPOConfig, setup: Setup) -> Any:
    """The value model in fp32 master weights: from ``value_model`` or the policy's weights,
    fresh head, dropout off; wrapped for the runtime's strategy."""
    from rewardloop.models import LoraSettings, disable_dropout, load_value_model, match_tokenizer

    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None
    source = cfg.value_model or cfg.policy
    if cfg.value_model is not None and (Path(source) / "model" / "config.json").is_file():
        source = str(Path(source) / "model")
    model = load_value_model(source, dtype=setup.rt.weights_dtype(cfg.dtype),
                             device=str(setup.rt.device), lora=lora,
                             trust_remote_code=cfg.trust_remote_code,
                             pad_token_id=setup.tokenizer.pad_token_id)
    match_tokenizer(model, setup.tokenizer)
    return setup.rt.prepare(disable_dropout(model))


def token_values(value_model: Any, rollout: Any) -> torch.Tensor:
    """V(s_t) for every completion position: (B, C), read from the hidden state that predicts
    completion token t (the state before it), with the model's scalar head."""
    from rewardloop.models import HFModel, is_peft
    from rewardloop.rollout import position_ids
    from rewardloop.score import trunk_states

    inner: HFModel = Runtime.unwrap(value_model)
    classifier: HFModel = inner.get_base_model() if is_peft(inner) else inner
    mask = rollout.attention_mask
    hidden = trunk_states(value_model, classifier, input_ids=rollout.input_ids,
                          attention_mask=mask, position_ids=position_ids(mask))  # (B, T, H)
    width = rollout.completion_ids.shape[1]
    return classifier.score(hidden[:, -width - 1:-1]).squeeze(-1).float()  # (B, C)


@dataclass
class PPOBatch:
    """One step's experience (B completions of width C)."""

    rows: list[int]
    rollout: Rollout
    rewards: RewardOutput
    old_logps: torch.Tensor  # (B, C)
    ref_logps: torch.Tensor | None  # (B, C)
    old_values: torch.Tensor  # (B, C)
    advantages: torch.Tensor  # (B, C)
    returns: torch.Tensor  # (B, C)
    kl_coef: float
    metrics: dict[str, float]
    is_weights: torch.Tensor | None = None  # (B, C) off-policy correction (another engine)


def make_experience(cfg: PPOConfig, setup: Setup, value_model: Any, generator: Any,
                    settings: Any) -> PPOBatch:
    """Sample, score, and turn scores + per-token KL + values into GAE advantages."""
    from rewardloop.rollout import batched_logps

    rt = setup.rt
    mb = local_micro(cfg, rt)
    rows = rt.shard(setup.sampler.next_batch())  # this process's share of the prompts
    t0 = time.perf_counter()
    with rt.gathered(setup.policy):
        rollout = generator.generate([setup.prompt_ids[i] for i in rows], cfg.num_generations,
                                     settings)
    t1 = time.perf_counter()
    reward_out, metrics = score_rollout(setup, rows, rollout, cfg.num_generations)
    t2 = time.perf_counter()
    mask = rollout.completion_mask
    with rt.autocast():
        old_logps = batched_logps(setup.policy, rollout, cfg.temperature, mb)
    is_weights = None
    if rollout.sampler_logps is not None:  # sampled by another engine
        is_weights, mismatch = off_policy_correction(cfg, rollout, old_logps)
        metrics.update(mismatch)
    use_kl = cfg.kl_coef > 0 or cfg.kl_target is not None
    ref_logps = (reference_logps(setup, rollout, cfg.temperature, mb) if use_kl else None)
    with torch.no_grad(), rt.autocast():
        old_values = torch.cat([token_values(value_model, rollout.select(range(s, min(
            s + mb, len(rollout))))) for s in range(0, len(rollout), mb)])
    kl = (ops.KL_ESTIMATORS[cfg.kl_estimator](old_logps, ref_logps) if ref_logps is not None
          else torch.zeros_like(old_logps))
    kl_coef = setup.kl_ctl.value
    token_rewards = ops.kl_shaped_rewards(reward_out.total, kl, mask, kl_coef)  # (B, C)
    advantages, returns = ops.gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # over the whole batch: every process's tokens
        advantages = ops.masked_whiten(advantages, mask,
                                       reduce_sum=rt.all_reduce if rt.distributed else None)
    metrics.update({
        "time_generate_s": t1 - t0, "time_score_s": t2 - t1,
        "value_explained_variance": float(ops.explained_variance(
            old_values, returns, mask, reduce_sum=rt.all_reduce if rt.distributed else None))
        if rt.sum_floats(float(mask.sum()))[0] > 1 else 0.0,
        "returns_mean": float(ops.masked_mean(returns, mask)),
        "time_ref_s": time.perf_counter() - t2})
    return PPOBatch(rows, rollout, reward_out, old_logps, ref_logps, old_values, advantages,
                    returns, kl_coef, metrics, is_weights)


def micro_step(cfg: PPOConfig, rt: Runtime, policy: Any, value_model: Any, batch: PPOBatch,
               idx: torch.Tensor, common: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Policy and value losses of micro-batch ``idx``, backpropagated; returns metrics."""
    from rewardloop.rollout import completion_forward

    mc = batch.rollout.select(idx)
    mask = mc.completion_mask
    with rt.autocast():
        fwd = completion_forward(policy, mc, cfg.temperature, with_entropy=True,
                                 entropy_grad=cfg.entropy_coef > 0)
        values = token_values(value_model, mc)
    pg_loss, metrics = pg_losses.ppo_clip_loss(
        fwd.logps, batch.old_logps[idx], batch.advantages[idx], mask, cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
        is_weights=batch.is_weights[idx] if batch.is_weights is not None else None, **common)
    assert fwd.entropy is not None  # asked for with with_entropy=True
    ent_loss, ent = pg_losses.entropy_bonus(fwd.entropy, mask, cfg.entropy_coef, **common)
    vf_loss, vf = pg_losses.value_loss(values, batch.old_values[idx], batch.returns[idx], mask,
                                       cfg.value_clip, **common)
    loss = pg_loss + cfg.vf_coef * vf_loss + (ent_loss if cfg.entropy_coef else 0.0)
    rt.backward(loss)
    return {**metrics, **ent, **vf, "pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
            "loss": loss.detach()}


def update(cfg: PPOConfig, rt: Runtime, models: dict[str, Any], optimizers: dict[str, Any],
           schedulers: dict[str, Any], batch: PPOBatch, step: int, run: Any
           ) -> dict[str, float]:
    """``ppo_epochs`` passes of shuffled minibatch updates of the policy and value model;
    each process updates on its share of every minibatch, losses divided by global counts."""
    mask = batch.rollout.completion_mask
    loss_keys = ("loss", "pg_loss", "vf_loss")
    sums: dict[str, float] = {}
    norms: dict[str, float] = {}
    tokens, updates = 0.0, 0
    # The optimizers' own parameter lists: FSDP2 swaps a module's registered parameters for
    # unsharded ones while its weights are gathered (after a forward of the root), so
    # ``model.parameters()`` is not always the sharded set the optimizer updates.
    params = {name: [p for g in optimizers[name].param_groups for p in g["params"]]
              for name in models}
    for _epoch in range(cfg.ppo_epochs):
        for mb in minibatches(cfg, rt, mask, torch.randperm(len(mask))):
            local_loss = 0.0
            for k, idx in enumerate(mb.micro):
                for model in models.values():
                    rt.sync_gradients(model, last=k == len(mb.micro) - 1)
                m = micro_step(cfg, rt, models["policy"], models["value"], batch, idx,
                               mb.common)
                weight = float(mask[idx].sum())
                tokens += weight
                local_loss += float(m["loss"])
                add_metrics(sums, m, weight, loss_keys)
            lr = optimizers["policy"].param_groups[0]["lr"]  # the last update's
            # Both models checked before either steps: a critic with an infinite gradient
            # must not leave the policy updated.
            for name in models:
                norm = rt.checked_grad_norm(optimizers[name], params[name], cfg.max_grad_norm,
                                            step=step, loss=local_loss, run=run)
                norms[f"grad_norm_{name}"] = norms.get(f"grad_norm_{name}", 0.0) + norm
            rt.apply_steps([(optimizers[name], schedulers[name]) for name in models])
            updates += 1
    keys = sorted(sums)
    *totals, tokens = rt.sum_floats(*(sums[k] for k in keys), tokens)
    metrics = {k: v / (updates if k in loss_keys else tokens)
               for k, v in zip(keys, totals, strict=True)}
    metrics.update({k: v / updates for k, v in norms.items()})
    metrics["lr"] = lr
    return metrics


def train(cfg: PPOConfig, roles: RemoteRoles | None = None) -> dict[str, Any]:
    """Run PPO per ``cfg``; returns the summary written to summary.json. ``roles``: generation
    and reward-model scoring in other processes (``rewardloop.cluster``)."""
    from rewardloop.train.runtime import runtime_for

    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt, roles)


def _train(cfg: PPOConfig, rt: Runtime, roles: RemoteRoles | None = None) -> dict[str, Any]:
    from dataclasses import replace

    from rewardloop.engines.factory import make_generator
    from rewardloop.rollout import SamplingSettings, rollout_metrics, truncate_samples
    from rewardloop.train.run import save_checkpoint
    from rewardloop.util.progress import progress_bar

    setup = setup_run(cfg, rt, needs_reference=cfg.kl_coef > 0 or cfg.kl_target is not None,
                      roles=roles)
    run, policy = setup.run, setup.policy
    value_model = load_value(cfg, setup)
    models = {"policy": policy, "value": value_model}
    optimizers, schedulers = {}, {}
    optimizers["policy"], schedulers["policy"] = make_optimizer(policy, cfg)
    optimizers["value"], schedulers["value"] = make_optimizer(
        value_model, replace(cfg, lr=cfg.value_lr))
    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    generator: Any = roles.generator(setup.inner, setup.tokenizer, settings) if roles else \
        make_generator(EngineOptions.of(cfg), setup.inner, setup.tokenizer, cfg.policy,
                       seed=cfg.seed, logprob_settings=settings,
                       dtype=rt.frozen_dtype("auto"),  # see grpo._train
                       max_lengths=(cfg.max_prompt_length, cfg.max_new_tokens))
    if rt.distributed:  # see grpo._train
        rt.before_leaving(getattr(generator, "close", None))
    seed_sampling(cfg, rt)
    step = 0
    ckpt = run.restore(models=models, optimizers=optimizers, schedulers=schedulers, runtime=rt)
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
    value_model.train()
    with progress_bar(cfg.max_steps, "ppo", start=step) as show:
        while step < cfg.max_steps:
            batch = make_experience(cfg, setup, value_model, generator, settings)
            t0 = time.perf_counter()
            train_metrics = update(cfg, rt, models, optimizers, schedulers, batch, step + 1,
                                   run)
            generator.policy_updated(policy)
            step += 1
            time_ref = batch.metrics.pop("time_ref_s")
            local = {**batch.metrics, **rollout_metrics(batch.rollout),
                     "time_train_s": time.perf_counter() - t0 + time_ref}
            if batch.ref_logps is not None:
                local.update(kl_metrics(batch.old_logps, batch.ref_logps,
                                        batch.rollout.completion_mask))
            metrics = {**rt.reduce_metrics(local, count=len(batch.rollout), weights=token_weights(
                local, batch.rollout.completion_mask)), **train_metrics}
            if batch.ref_logps is not None:
                metrics["kl_coef"] = batch.kl_coef
                setup.kl_ctl.update(metrics["kl_seq_k1"], len(batch.rollout) * rt.world_size)
            tokens = rt.sum_floats(float(batch.rollout.attention_mask.sum()))[0]
            run.meter.step(samples=len(batch.rollout) * rt.world_size, tokens=int(tokens))
            run.log_metrics(step, metrics)
            history.append(metrics)
            write_samples(setup, cfg, step, batch.rows, batch.rollout, batch.rewards.total)
            show(step, f"reward {metrics['reward/mean']:.3f}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save_checkpoint(run, step, models=models, optimizers=optimizers,
                                schedulers=schedulers, sampler_state=setup.sampler.state_dict(),
                                extra={"kl_ctl": setup.kl_ctl.state_dict()}, runtime=rt)
    return finish(setup, cfg, history, value_model=value_model)
