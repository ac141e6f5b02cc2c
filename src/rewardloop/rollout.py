"""Batched sampling of completions behind one interface, and the log-probs of what was sampled.

Algorithms (``train/grpo.py``, ``train/ppo.py``) only see :class:`Generator` and :class:`Rollout`:
``HFGenerator`` samples from a Hugging Face model (KV cache, left-padded prompts); a vLLM
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

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from rewardloop import ops
from rewardloop.data.records import CandidatesRecord, Text
from rewardloop.models import load_policy, load_tokenizer
from rewardloop.tokenize import encode, pad
from rewardloop.util.seed import seed_everything


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


def warp_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), in place where possible: (B, V) -> (B, V).

    The order and rules are Hugging Face ``generate``'s (its temperature, top-k and top-p
    warpers, keeping at least one token), so sampling from ``softmax`` of the result draws from
    the same distribution it would.
    """
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    if 0 < settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - settings.top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return logits


def sample_tokens(probs: torch.Tensor) -> torch.Tensor:
    """One token per row drawn from ``probs`` (B, V): (B,).

    The exponential race: ``argmax(p_i / E_i)`` with ``E_i ~ Exp(1)`` picks token i with
    probability p_i, exactly like ``torch.multinomial``, at a fraction of its cost on CPU
    (multinomial took ~8% of decoding time for a small model).
    """
    return (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS and each EOS id of the model's
    ``generation_config`` (Llama 3 and Qwen2.5 instruct models list several, e.g. end of turn
    and end of text), except the pad id (never sampled, and it would read as padding)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids += extra if isinstance(extra, list | tuple) else [extra]
    return [int(i) for i in dict.fromkeys(ids) if i is not None and i != tokenizer.pad_token_id]


class HFGenerator:
    """Sampling from a Hugging Face causal LM (the policy being trained) with its KV cache.

    A plain decoding loop instead of ``model.generate``: one prefill of the left-padded prompts,
    then one cached forward step per token, sampled after :func:`warp_logits` with
    :func:`sample_tokens`. It draws from the same distribution as ``generate`` (tested: the same
    tokens when the choice is deterministic, the same frequencies otherwise) and skips the
    machinery ``generate`` runs every step (input preparation, processors, stopping criteria).
    The pad token is never sampled (it would read as padding inside an answer). A row stops at
    the first of the model's stop tokens (:func:`stop_token_ids`). Dropout is off while sampling
    (``eval()``), and the model's previous train/eval mode is restored afterwards.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS (TRL #1623)")
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = stop_token_ids(model, tokenizer)
        # transformers 5.x names the KV cache argument and output ``cache``; 4.x
        # ``past_key_values``.
        params = inspect.signature(model.forward).parameters
        self._cache_name = "cache" if "cache" in params else "past_key_values"
        config = getattr(model, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        # A sliding-window cache (Mistral, Qwen2, Gemma 2/3) keeps only the last W keys, which a
        # ready full-width 4D mask does not fit: those models build their own mask every step.
        self._additive_mask = (attention in ("sdpa", "eager")
                               and not getattr(config, "sliding_window", None))

    def _decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                settings: SamplingSettings) -> torch.Tensor:
        """Sampled completion tokens (B, C), pad after each row's EOS; C <= max_new_tokens."""
        rows, width = prompt_ids.shape
        limit = settings.max_new_tokens
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, limit)], dim=1)
        if self._additive_mask:
            # Decoding steps get the ready 4D mask (0 = attend, -inf-ish = padding), which
            # transformers uses as is instead of rebuilding one from the 2D mask every step.
            dtype = next(self.model.parameters()).dtype
            mask = ((1 - mask[:, None, None, :]).to(dtype) * torch.finfo(dtype).min)
        positions = position_ids(prompt_mask)
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=positions, use_cache=True, logits_to_keep=1)
        next_position = positions[:, -1:] + 1
        tokens = prompt_ids.new_full((rows, limit), self.pad_id)
        stop = torch.tensor(self.eos_ids, device=prompt_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
        for t in range(limit):
            logits = out.logits[:, -1].float()
            logits[:, self.pad_id] = -float("inf")
            token = sample_tokens(warp_logits(logits, settings).softmax(dim=-1))
            token = token.masked_fill(done, self.pad_id)
            tokens[:, t] = token
            done |= torch.isin(token, stop)
            if t + 1 == limit or bool(done.all()):
                return tokens[:, : t + 1]
            cache = getattr(out, self._cache_name)
            out = self.model(input_ids=token[:, None], attention_mask=mask[..., : width + t + 1],
                             position_ids=next_position, use_cache=True,
                             **{self._cache_name: cache})
            next_position = next_position + 1
        return tokens

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        if n < 1:
            raise ValueError("n must be at least 1")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        device = next(self.model.parameters()).device
        prompt_ids = pad(prompts, self.pad_id, side="left").to(device).repeat_interleave(n, 0)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        was_training = self.model.training
        self.model.eval()
        try:
            # inference_mode skips autograd's bookkeeping (a quarter of a small model's
            # decoding time); the result is cloned out of it so training can use it.
            with torch.inference_mode():
                completion_ids = self._decode(prompt_ids, prompt_mask, settings)
            completion_ids = completion_ids.clone()
        finally:
            self.model.train(was_training)
        completion_mask, has_eos = ops.completion_mask(completion_ids, self.eos_ids, self.pad_id)
        texts = self.tokenizer.batch_decode(completion_ids * completion_mask
                                            + self.pad_id * (1 - completion_mask),
                                            skip_special_tokens=True)
        # A byte-level model can emit any byte; NUL breaks JSONL readers and PostgreSQL text.
        texts = [t.replace("\x00", "") for t in texts]
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids, completion_mask=completion_mask,
                       has_eos=has_eos, texts=texts)


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
    return [encode(tokenizer, p, None, max_length=max(max_prompt_length, 2),
                   max_prompt_length=max_prompt_length).input_ids for p in prompts]


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


# ---------------------------------------------------------------------------------------------
# Candidate answers for people to compare
# ---------------------------------------------------------------------------------------------


def sample_candidates(policy: str | Path, prompts: Sequence[Text], n: int,
                      settings: SamplingSettings, *, seed: int = 0, batch_size: int = 8,
                      max_prompt_length: int = 512, device: str = "auto", dtype: str = "auto",
                      model_label: str | None = None, chat_template: Path | None = None
                      ) -> list[CandidatesRecord]:
    """``n`` sampled answers per prompt from ``policy`` (loaded here), ``batch_size`` prompts at
    a time. Repeated answers to one prompt are kept once (a task compares distinct texts);
    ``models`` is ``model_label``. ``chat_template``: a template file for chat prompts."""
    seed_everything(seed)
    tokenizer = load_tokenizer(policy, padding_side="left", chat_template=chat_template)
    model = load_policy(policy, dtype=dtype, device=device, trainable=False)
    generator = HFGenerator(model, tokenizer)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        rollout = generator.generate(encode_prompts(tokenizer, chunk, max_prompt_length), n,
                                     settings)
        for i, prompt in enumerate(chunk):
            answers = list(dict.fromkeys(rollout.texts[i * n:(i + 1) * n]))
            rows.append(CandidatesRecord(prompt, answers, [model_label] * len(answers)))
    return rows
