"""Batched sampling of completions behind one interface, and the log-probs of what was sampled.

Algorithms (``train/grpo.py``, ``train/ppo.py``) only see :class:`Generator` and :class:`Rollout`:
``HFGenerator`` samples with Hugging Face ``generate`` (KV cache, left-padded prompts); a vLLM
generator can be added later by implementing the same ``generate`` method, without touching the
algorithms. Such an engine's log-probs differ slightly from the trainer's, so ``Rollout`` has an
optional ``sampler_logps`` field for a truncated importance-sampling correction.

Layout of a rollout of ``P`` prompts with ``n`` samples each (``B = P * n`` rows): the ``n``
samples of a prompt are contiguous (rows ``i * n ... i * n + n - 1``), which is what the group
advantage estimators in ``ops`` expect. Prompts are LEFT-padded (so every completion starts at
the same column) and completions RIGHT-padded; the sequence fed to the model is
``cat(prompt_ids, completion_ids)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from rewardloop import ops


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled. Log-probs for training use the same ``temperature``."""

    max_new_tokens: int = 64
    """Longest completion in tokens; a completion cut here has no EOS (``has_eos=False``)."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = no limit)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass(frozen=True)
class Rollout:
    """Sampled completions of a batch of prompts (``B`` rows, ``n`` per prompt, contiguous)."""

    prompt_ids: torch.Tensor
    """(B, P) long: prompt tokens, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(B, P) long: 1 on real prompt tokens."""
    completion_ids: torch.Tensor
    """(B, C) long: sampled tokens, right-padded with the pad id after the first EOS."""
    completion_mask: torch.Tensor
    """(B, C) long: 1 on the completion's tokens up to and including its first EOS."""
    has_eos: torch.Tensor
    """(B,) bool: False when the completion was cut at ``max_new_tokens`` (it never ended)."""
    texts: list[str]
    """B decoded completions (special tokens removed)."""
    sampler_logps: torch.Tensor | None = None
    """(B, C) float log-probs the sampling engine assigned to its tokens, when it reports them
    (an external engine such as vLLM); None for ``HFGenerator``, whose log-probs equal the
    trainer's."""

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + C): prompt and completion, the sequence the model scores."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + C): 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a minibatch).

        Prompt columns that are padding in every selected row are dropped (less compute); the
        completion width C is kept, so (B, C) tensors computed for the whole rollout (old
        log-probs, advantages, values) index the same way with ``[rows]``.
        """
        index = torch.as_tensor(rows, dtype=torch.long)
        prompt_mask = self.prompt_mask[index]
        first = int(prompt_mask.any(dim=0).long().argmax())  # first column real in some row
        sampler = self.sampler_logps[index] if self.sampler_logps is not None else None
        return replace(
            self, prompt_ids=self.prompt_ids[index][:, first:], prompt_mask=prompt_mask[:, first:],
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index], has_eos=self.has_eos[index],
            texts=[self.texts[int(i)] for i in index], sampler_logps=sampler)


class Generator(Protocol):
    """Anything that samples ``n`` completions for each of a batch of tokenised prompts."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        """Sample ``n`` completions per prompt (unpadded token-id lists); rows of a prompt are
        contiguous in the returned :class:`Rollout`."""
        ...


def _never_sample(token_id: int) -> Any:
    """A logits processor that sets one token's logit to -inf in place.

    transformers' ``suppress_tokens`` builds a vocabulary-sized mask every decoding step (~15%
    of generation time for a tiny model); writing one column costs almost nothing.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    class _NeverSample(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scores[:, token_id] = -float("inf")
            return scores

    return LogitsProcessorList([_NeverSample()])


class HFGenerator:
    """Sampling with Hugging Face ``generate`` on the policy being trained.

    Uses the KV cache, left-padded prompts and ``num_return_sequences``; the pad token is never
    sampled (it would read as padding inside an answer). Dropout is off while
    sampling (``eval()``), and the model's previous train/eval mode is restored afterwards.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS (TRL #1623)")
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = int(tokenizer.eos_token_id)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        if n < 1:
            raise ValueError("n must be at least 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        from rewardloop.train.tokenize import pad

        device = next(self.model.parameters()).device
        prompt_ids = pad(prompts, self.pad_id, side="left").to(device)  # (P0, Lp)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                max_new_tokens=settings.max_new_tokens, num_return_sequences=n,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id, use_cache=True,
                # A sampled pad token would be masked as padding in the middle of an answer.
                logits_processor=_never_sample(self.pad_id),
            )  # (P0 * n, Lp + C'), C' <= max_new_tokens
        finally:
            self.model.train(was_training)
        width = prompt_ids.shape[1]
        completion_ids = out[:, width:]
        if completion_ids.shape[1] == 0:  # generate may return nothing only in degenerate setups
            completion_ids = torch.full((out.shape[0], 1), self.pad_id, dtype=torch.long,
                                        device=device)
        # generate pads finished rows with pad_id after their EOS; the mask keeps up to the EOS.
        completion_mask, has_eos = ops.completion_mask(completion_ids, self.eos_id, self.pad_id)
        texts = self.tokenizer.batch_decode(completion_ids * completion_mask
                                            + self.pad_id * (1 - completion_mask),
                                            skip_special_tokens=True)
        # A byte-level model can emit any byte; NUL breaks JSONL readers and PostgreSQL text.
        texts = [t.replace("\x00", "") for t in texts]
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            completion_ids=completion_ids, completion_mask=completion_mask, has_eos=has_eos,
            texts=texts,
        )


@dataclass(frozen=True)
class ForwardOut:
    """What one policy forward pass over a rollout gives the losses."""

    logps: torch.Tensor
    """(B, C) per-token log-probs of the completion tokens at the sampling temperature."""
    entropy: torch.Tensor | None
    """(B, C) entropy of the temperature-scaled next-token distribution (None if not asked)."""


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: (B, T) -> (B, T).

    ``generate`` numbers a left-padded prompt's tokens from 0 at its first real token; a plain
    forward pass would number them from the first (padding) column, so the trainer would score
    the tokens under different positions than they were sampled with.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def completion_forward(model: Any, rollout: Rollout, temperature: float, *,
                       with_entropy: bool = False, entropy_grad: bool = False) -> ForwardOut:
    """Log-probs (and entropy) of the rollout's completion tokens under ``model``.

    Only the logits that predict completion tokens are computed (``logits_to_keep``), so the
    (B, T, V) tensor of the prompt part never exists. The entropy is a monitor computed without
    gradient unless ``entropy_grad`` (an entropy bonus in the loss).
    """
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    width = rollout.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask), use_cache=False,
                   logits_to_keep=width + 1).logits  # (B, C + 1, V)
    logits = logits[:, :-1]  # position t predicts completion token t: (B, C, V)
    logps = ops.token_log_probs(logits, rollout.completion_ids, temperature)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            scaled = logits / temperature if temperature != 1.0 else logits
            entropy = ops.entropy_from_logits(scaled if entropy_grad else scaled.detach())
    return ForwardOut(logps=logps, entropy=entropy)


# ---------------------------------------------------------------------------------------------
# Helpers every RL loop uses around a rollout
# ---------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], max_prompt_length: int
                   ) -> list[list[int]]:
    """Token ids of each prompt (chat prompts through the chat template), cut from the left to
    ``max_prompt_length`` tokens (the end of a conversation matters most)."""
    from rewardloop.train.tokenize import encode

    return [encode(tokenizer, p, None, max_length=max(max_prompt_length, 2),
                   max_prompt_length=max_prompt_length).input_ids for p in prompts]


@torch.no_grad()
def batched_logps(model: Any, rollout: Rollout, temperature: float, micro_batch_size: int
                  ) -> torch.Tensor:
    """Per-token completion log-probs (B, C) without gradient, ``micro_batch_size`` rows at a
    time (old-policy and reference log-probs)."""
    parts = []
    for start in range(0, len(rollout), micro_batch_size):
        rows = range(start, min(start + micro_batch_size, len(rollout)))
        parts.append(completion_forward(model, rollout.select(rows), temperature).logps)
    return torch.cat(parts, dim=0)


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
    """Drop sample rows written after ``after_step`` (a resumed run writes them again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line)["step"]) <= after_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept), encoding="utf-8")
