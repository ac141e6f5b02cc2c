"""The actors of an online-RL run: a trainer rank, a generation engine, a reward-model scorer.

Plain classes (``ray.remote`` makes them actors in ``rl.py``), each building what its role
needs from the run's config, with the library's own pieces: the trainer rank calls the very
``train`` function torchrun runs, the generation actor the engine factory, the reward actor
``rewards.ModelReward``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from rewardloop.util.net import free_port


class TrainerActor:
    """One rank of the trainer group: torch.distributed's environment, then ``train``."""

    def __init__(self, rank: int, world_size: int) -> None:
        # Ray gives each actor only its own GPUs (CUDA_VISIBLE_DEVICES), so every rank's
        # device is the first visible one: LOCAL_RANK 0.
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})

    def ready(self) -> bool:
        return True

    def endpoint(self) -> tuple[str, int]:
        """Where rank 0 listens for the others: this node's address and a free port."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def train(self, kind: str, cfg: Any, master: tuple[str, int], roles: Any) -> dict[str, Any]:
        """Run the trainer ``kind`` (grpo or ppo) as this rank; rank 0 returns the summary."""
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master[0], str(master[1])
        # Only the trainer asked for is imported (each pulls in torch and transformers).
        if kind == "ppo":
            from rewardloop.train import ppo

            return ppo.train(cfg, roles)
        from rewardloop.train import grpo

        return grpo.train(cfg, roles)


class RolloutActor:
    """A generation engine (``--generator``) over its own copy of the policy, which trainer
    rank 0 overwrites with the trained weights (``load_weights``) before generations."""

    def __init__(self, cfg: Any, index: int) -> None:
        from rewardloop.engines.factory import EngineOptions, engine_model_path, make_generator
        from rewardloop.models import (
            disable_dropout,
            load_policy,
            load_tokenizer,
            match_tokenizer,
            resolve_device,
        )
        from rewardloop.rollout import SamplingSettings
        from rewardloop.util.seed import seed_everything

        seed_everything(cfg.seed + 7919 * (index + 1))  # its own stream, unlike any rank's
        tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code,
                                   add_pad_token=cfg.add_pad_token, padding_side="left",
                                   chat_template=cfg.chat_template)
        path = engine_model_path(cfg.policy)  # an adapter's base: the merged weights come next
        # The trainer samples from its fp32 master weights; so does this copy, unless the
        # user chose the trained weights' dtype.
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        device = "cpu" if cfg.generator == "vllm" else str(resolve_device(cfg.device))
        self.model = load_policy(path, dtype=dtype, device=device,
                                 trust_remote_code=cfg.trust_remote_code)
        match_tokenizer(self.model, tokenizer)
        disable_dropout(self.model)
        self.model.eval()
        settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.generator = make_generator(EngineOptions.of(cfg), self.model, tokenizer, path,
                                        seed=cfg.seed + index, logprob_settings=settings,
                                        dtype=_compute_dtype(cfg.precision),
                                        max_lengths=(cfg.max_prompt_length, cfg.max_new_tokens))

    def ready(self) -> bool:
        return True

    def load_weights(self, weights: dict[str, Any]) -> int:
        """Copy ``weights`` (checkpoint name -> tensor, ``engines.weight_sync`` names) into this
        copy of the policy; returns how many tensors were loaded."""
        import torch

        params = dict(self.model.named_parameters())
        unknown = sorted(set(weights) - set(params))
        if unknown:
            raise ValueError(f"weights the generation actor's model does not have: "
                             f"{unknown[:3]}")
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        self.generator.policy_updated(self.model)  # an engine pushes its own copy in turn
        return len(weights)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, settings: Any,
                 with_logps: bool = False) -> Any:
        """``n`` completions per prompt: a ``Rollout`` on the CPU (it travels to a trainer).
        ``with_logps``: with this copy's log-probs of its samples (``sampler_logps``; an
        engine with its own weights reports them anyway), which off-policy samples need."""
        from rewardloop.rollout import batched_logps

        rollout = self.generator.generate(prompts, n, settings)
        if with_logps and rollout.sampler_logps is None:
            logps = batched_logps(self.model, rollout, settings.temperature, len(rollout))
            rollout = dataclasses.replace(rollout, sampler_logps=logps * rollout.completion_mask)
        return moved(rollout, "cpu")


def moved(rollout: Any, device: Any) -> Any:
    """``rollout`` with its tensors on ``device`` (rollouts travel between actors on the CPU)."""
    import torch

    tensors = {f.name: getattr(rollout, f.name).to(device) for f in dataclasses.fields(rollout)
               if isinstance(getattr(rollout, f.name), torch.Tensor)}
    return dataclasses.replace(rollout, **tensors)


class ReferenceActor:
    """The KL reference: the initial policy, frozen in the compute precision (as a trainer's
    own copy would be), giving the log-probs of the rollouts trainers send it."""

    def __init__(self, cfg: Any) -> None:
        from rewardloop.models import (
            disable_dropout,
            load_policy,
            load_tokenizer,
            match_tokenizer,
            resolve_device,
        )

        tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code,
                                   add_pad_token=cfg.add_pad_token, padding_side="left",
                                   chat_template=cfg.chat_template)
        self.device = resolve_device(cfg.device)
        self.model = load_policy(cfg.policy, dtype=_compute_dtype(cfg.precision),
                                 device=str(self.device),
                                 trust_remote_code=cfg.trust_remote_code)
        match_tokenizer(self.model, tokenizer)
        disable_dropout(self.model)
        self.model.eval().requires_grad_(False)

    def ready(self) -> bool:
        return True

    def logps(self, rollout: Any, temperature: float, micro_batch_size: int) -> Any:
        """(B, C) reference log-probs of ``rollout``'s completions, on the CPU."""
        from rewardloop.rollout import batched_logps

        logps = batched_logps(self.model, moved(rollout, self.device), temperature,
                              micro_batch_size)
        return logps.cpu()


def _compute_dtype(precision: str) -> str:
    """The dtype a vLLM engine computes in: the trainers' compute precision (``Runtime``'s
    rule for auto: bf16 on a GPU that supports it), not the fp32 of the weights it is sent."""
    import torch

    if precision == "auto":
        gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        precision = "bf16" if gpu else "fp32"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


class RewardActor:
    """The run's reward models (``rewards.ModelReward``, normalised by their stats), scoring
    the batches trainers send it."""

    def __init__(self, specs: Sequence[str], device: str, batch_size: int,
                 max_length: int) -> None:
        from rewardloop.rewards import ModelReward

        self.models = {spec: ModelReward(spec, device=device, batch_size=batch_size,
                                         max_length=max_length) for spec in specs}

    def ready(self) -> bool:
        return True

    def names(self) -> dict[str, str]:
        """Reward-model spec -> the name its metrics are logged under."""
        return {spec: model.name for spec, model in self.models.items()}

    def score(self, spec: str, prompts: Sequence[Any], completions: Sequence[Any]
              ) -> list[float]:
        return self.models[spec](prompts, completions)
