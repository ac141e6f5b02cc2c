"""Log-probs of sampled completions and the helpers every RL loop uses around a rollout.

Sampling itself lives in ``rewardloop.engines`` (one :class:`Generator` protocol; the built-in
Hugging Face loop and vLLM behind ``engines.make_generator``). The names that lived here before
(``Rollout``, ``SamplingSettings``, ``Generator``, ``HFGenerator``, ``warp_logits``,
``sample_tokens``, ``position_ids``) are re-exported so existing imports keep working.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardloop.data.records import CandidatesRecord, Text
from rewardloop.engines.base import Generator, Rollout, SamplingSettings
from rewardloop.engines.factory import EngineOptions, make_generator
from rewardloop.engines.hf import HFGenerator, position_ids, sample_tokens, warp_logits
from rewardloop.lm_head import label_logps, with_end_label
from rewardloop.models import load_policy, load_tokenizer, match_tokenizer
from rewardloop.tokenize import encode_many
from rewardloop.util.files import atomic_file
from rewardloop.util.seed import seed_everything

__all__ = [
    "CandidateSampler", "ForwardOut", "Generator", "HFGenerator", "Rollout", "SamplingSettings",
    "append_samples", "batched_logps", "completion_forward", "encode_prompts", "position_ids",
    "rollout_metrics", "sample_candidates", "sample_records", "sample_tokens",
    "truncate_samples", "warp_logits",
]


@dataclass(frozen=True)
class ForwardOut:
    """What one policy forward pass over a rollout gives the losses."""

    logps: torch.Tensor
    """(B, C) per-token log-probs of the completion tokens at the sampling temperature."""
    entropy: torch.Tensor | None
    """(B, C) entropy of the temperature-scaled next-token distribution (None if not asked)."""


def completion_forward(model: Any, rollout: Rollout, temperature: float, *,
                       with_entropy: bool = False, entropy_grad: bool = False) -> ForwardOut:
    """Log-probs (and entropy) of the rollout's completion tokens under ``model``.

    Only the positions that predict completion tokens are projected (``logits_to_keep``), and
    those a chunk at a time (``lm_head.label_logps``): no (B, C, V) logits are kept. The entropy
    is a monitor computed without gradient unless ``entropy_grad`` (an entropy bonus in the
    loss).
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    width = rollout.completion_ids.shape[1]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "position_ids": position_ids(attention_mask), "use_cache": False,
              "logits_to_keep": width + 1}  # position t predicts completion token t
    out = label_logps(model, inputs, with_end_label(rollout.completion_ids), temperature,
                      with_entropy=with_entropy, entropy_grad=entropy_grad)
    logps = out.logps[:, :-1]
    entropy = out.entropy[:, :-1] if out.entropy is not None else None
    return ForwardOut(logps=logps, entropy=entropy)


# ---------------------------------------------------------------------------------------------
# Helpers every RL loop uses around a rollout
# ---------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], max_prompt_length: int
                   ) -> list[list[int]]:
    """Token ids of each prompt (chat prompts through the chat template), cut from the left to
    ``max_prompt_length`` tokens (the end of a conversation matters most)."""
    return [e.input_ids for e in encode_many(tokenizer, [(p, None) for p in prompts],
                                             max_length=max(max_prompt_length, 2),
                                             max_prompt_length=max_prompt_length)]


def batched_logps(model: Any, rollout: Rollout, temperature: float, micro_batch_size: int
                  ) -> torch.Tensor:
    """Per-token completion log-probs (B, C) without gradient, ``micro_batch_size`` rows at a
    time (old-policy and reference log-probs). Computed in inference mode and cloned out of
    it, so the losses can use them as constants."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(rollout), micro_batch_size):
            rows = range(start, min(start + micro_batch_size, len(rollout)))
            parts.append(completion_forward(model, rollout.select(rows), temperature).logps)
        logps = torch.cat(parts, dim=0)
    return logps.clone()


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """Length and truncation of the sampled completions (watch them for length drift)."""
    lengths = rollout.completion_mask.sum(dim=1).float()
    return {"completion_length_mean": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated_frac": float((~rollout.has_eos).float().mean())}


def sample_records(step: int, prompts: Sequence[Any], rollout: Rollout,
                   rewards: torch.Tensor, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` completions of a step as ``samples.jsonl`` rows."""
    return [{"step": step, "prompt": prompts[i], "completion": rollout.texts[i],
             "reward": float(rewards[i]), "has_eos": bool(rollout.has_eos[i])}
            for i in range(min(limit, len(rollout)))]


def append_samples(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append sample rows to ``samples.jsonl`` (one JSON object a line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)


def truncate_samples(path: Path, after_step: int) -> None:
    """Drop sample rows written after ``after_step`` (a resumed run writes them again). The
    file is replaced atomically: a run killed here keeps every row it had."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as rows, atomic_file(path) as out:
        for line in rows:
            try:
                if int(json.loads(line)["step"]) <= after_step:
                    out.write(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                continue


# ---------------------------------------------------------------------------------------------
# Candidate answers for people to compare
# ---------------------------------------------------------------------------------------------


class CandidateSampler:
    """A policy (loaded here) and its generator, sampling candidates one batch of prompts at a
    time. Each batch draws from its own seed (the run's seed and the batch's index), so a batch
    comes out the same whichever process samples it and whatever ran before: the batches of a
    file can be spread over processes (``generate --ray``) and an interrupted job resumed."""

    def __init__(self, policy: str | Path, *, seed: int = 0, device: str = "auto",
                 dtype: str = "auto", model_label: str | None = None,
                 engine: EngineOptions | None = None, chat_template: Path | None = None,
                 max_prompt_length: int = 512) -> None:
        seed_everything(seed)
        # The built-in loop needs a pad only to left-pad prompts (never sampled): a model
        # shipped without one (Llama 3, Mistral, GPT-2) gets one here, as eval's do. vLLM pads
        # nothing, and a token beyond the model's vocabulary is one it cannot load.
        engine = engine or EngineOptions()
        built_in = engine.generator == "hf"
        self.tokenizer = load_tokenizer(policy, padding_side="left", chat_template=chat_template,
                                        add_pad_token=built_in, sampling_only=not built_in)
        model = load_policy(policy, dtype=dtype, device=device, trainable=False)
        match_tokenizer(model, self.tokenizer)
        self.generator = make_generator(engine, model, self.tokenizer, policy, seed=seed)
        self.seed, self.label, self.max_prompt_length = seed, model_label, max_prompt_length

    def sample(self, prompts: Sequence[Text], n: int, settings: SamplingSettings, index: int
               ) -> list[CandidatesRecord]:
        """``n`` answers to each of ``prompts``, the file's batch number ``index``; repeated
        answers to one prompt are kept once (a task compares distinct texts)."""
        seed_everything(self.seed * 1_000_003 + index)
        encoded = encode_prompts(self.tokenizer, prompts, self.max_prompt_length)
        rollout = self.generator.generate(encoded, n, settings)
        rows = []
        for i, prompt in enumerate(prompts):
            answers = list(dict.fromkeys(rollout.texts[i * n:(i + 1) * n]))
            rows.append(CandidatesRecord(prompt, answers, [self.label] * len(answers)))
        return rows


def sample_candidates(policy: str | Path, prompts: Sequence[Text], n: int,
                      settings: SamplingSettings, *, seed: int = 0, batch_size: int = 8,
                      max_prompt_length: int = 512, device: str = "auto", dtype: str = "auto",
                      model_label: str | None = None, engine: EngineOptions | None = None,
                      chat_template: Path | None = None) -> list[CandidatesRecord]:
    """``n`` sampled answers per prompt from ``policy`` (loaded here), ``batch_size`` prompts at
    a time (:class:`CandidateSampler`), with the generator ``engine`` names (default: the
    built-in loop); ``models`` is ``model_label``. ``chat_template``: a template file for chat
    prompts."""
    sampler = CandidateSampler(policy, seed=seed, device=device, dtype=dtype,
                               model_label=model_label, engine=engine,
                               chat_template=chat_template, max_prompt_length=max_prompt_length)
    rows = []
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        rows += sampler.sample(list(prompts[start:start + batch_size]), n, settings, index)
    return rows
