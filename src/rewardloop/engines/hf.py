"""The built-in engine: a KV-cached decoding loop over the Hugging Face model being trained.

It samples from the trainer's own model object, so its log-probs are the trainer's and there is
no weight copy to keep in sync (``Rollout.sampler_logps`` stays None).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from rewardloop import ops
from rewardloop.engines.base import (
    Rollout,
    SamplingSettings,
    check_request,
    decode_completions,
    stop_token_ids,
)
from rewardloop.engines.options import DECODINGS
from rewardloop.engines.static import StaticDecoder, StaticSteps, static_cache_problem
from rewardloop.errors import UserError
from rewardloop.ops import position_ids


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


DONE_CHECK_EVERY = 16
"""On a GPU the loop reads whether every row has finished once per this many tokens."""


def done_check_interval(device: torch.device) -> int:
    """Tokens between two reads of "has every row finished": 1 where the read is free (CPU),
    :data:`DONE_CHECK_EVERY` where it stalls the device queue (CUDA)."""
    return DONE_CHECK_EVERY if device.type == "cuda" else 1


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

    ``compute_dtype`` (a torch dtype name) is the precision a trainer computes in: when it is a
    half precision and the weights are fp32 master weights, decoding runs under autocast to it,
    as the trainer's forward passes do. Sampling in fp32 there would cost twice the memory
    traffic of every decoding step and draw from slightly other numbers than the trainer scores.
    """

    def __init__(self, model: Any, tokenizer: Any, decoding: str = "dynamic",
                 compute_dtype: str | None = None) -> None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from EOS (TRL #1623)")
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(compute_dtype or "")
        weights = next(model.parameters()).dtype
        self.autocast_dtype = half if half is not None and weights == torch.float32 else None
        problem = (static_cache_problem(model, self.autocast_dtype) if decoding != "dynamic"
                   else None)
        if problem:
            raise UserError(f"--hf-decoding {decoding}: {problem}; use --hf-decoding dynamic")
        self.model = model
        self.tokenizer = tokenizer
        self.decoding = decoding
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        # transformers 5.x names the KV cache argument and output ``cache``; 4.x
        # ``past_key_values``. A peft wrapper's forward takes **kwargs: ask the model inside.
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(inner.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        config = getattr(model, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        # A sliding-window cache (Mistral, Qwen2, Gemma 2/3) keeps only the last W keys, which a
        # ready full-width 4D mask does not fit: those models build their own mask every step.
        self.additive_mask = (attention in ("sdpa", "eager")
                              and not getattr(config, "sliding_window", None))
        self.static: StaticDecoder | None = None

    def _steps(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               limit: int) -> DynamicSteps | StaticSteps:
        positions = position_ids(prompt_mask)
        if self.decoding == "dynamic":
            return DynamicSteps(self, prompt_ids, prompt_mask, positions, limit)
        if self.static is None:
            self.static = StaticDecoder(self.model, self.cache_name,
                                        compiled=self.decoding == "compiled")
        return StaticSteps(self.static, prompt_ids, prompt_mask, positions, limit)

    def _decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                settings: SamplingSettings) -> torch.Tensor:
        """Sampled completion tokens (B, C), pad after each row's EOS; C <= max_new_tokens."""
        rows = prompt_ids.shape[0]
        limit = settings.max_new_tokens
        steps = self._steps(prompt_ids, prompt_mask, limit)
        logits = steps.logits
        tokens = prompt_ids.new_full((rows, limit), self.pad_id)
        stop = torch.tensor(self.eos_ids, device=prompt_ids.device)
        done = torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device)
        # Reading ``done`` on the host waits for the device: on a GPU that stall every token
        # would keep the CPU from queueing the next steps, so there it is read every
        # DONE_CHECK_EVERY tokens and the columns past the last real token are cut afterwards
        # (finished rows only add padding; the tokens kept are the ones a per-token check keeps).
        every = done_check_interval(prompt_ids.device)
        for t in range(limit):
            logits = logits.float()
            logits[:, self.pad_id] = -float("inf")
            token = sample_tokens(warp_logits(logits, settings).softmax(dim=-1))
            token = token.masked_fill(done, self.pad_id)
            tokens[:, t] = token
            done |= torch.isin(token, stop)
            if t + 1 == limit or ((t + 1) % every == 0 and bool(done.all())):
                return _trim_padding(tokens[:, : t + 1], self.pad_id)
            logits = steps.advance(token)
        return tokens

    def policy_updated(self, model: Any) -> None:
        """Nothing to push: this loop samples from the trainer's model object itself (``model``
        may be it, or a DDP wrapper around it)."""
        if self.model not in (model, getattr(model, "module", None)):
            raise ValueError("HFGenerator samples from the model it was built with; build a "
                             "new one for another model")

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        check_request(prompts, n)
        from rewardloop.tokenize import pad

        device = next(self.model.parameters()).device
        prompt_ids = pad(prompts, self.pad_id, side="left").to(device).repeat_interleave(n, 0)
        prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").to(device)
        prompt_mask = prompt_mask.repeat_interleave(n, dim=0)
        was_training = self.model.training
        self.model.eval()
        try:
            # inference_mode skips autograd's bookkeeping (a quarter of a small model's
            # decoding time); the result is cloned out of it so training can use it.
            amp: Any = (torch.autocast(device.type, dtype=self.autocast_dtype)
                        if self.autocast_dtype is not None else contextlib.nullcontext())
            with torch.inference_mode(), amp:
                completion_ids = self._decode(prompt_ids, prompt_mask, settings)
            completion_ids = completion_ids.clone()
        finally:
            self.model.train(was_training)
        completion_mask, has_eos = ops.completion_mask(completion_ids, self.eos_ids, self.pad_id)
        texts = decode_completions(self.tokenizer, completion_ids, completion_mask)
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=completion_ids, completion_mask=completion_mask,
                       has_eos=has_eos, texts=texts)


def _trim_padding(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """``tokens`` (B, C) without its trailing all-padding columns (the loop never samples the
    pad token, so such a column comes after every row has finished); at least one column."""
    real = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(real[-1]) + 1] if len(real) else tokens[:, :1]


class DynamicSteps:
    """One generation's decoding with transformers' default cache, which grows by one column per
    step (the reference the static path is tested against): the prefill, then :meth:`advance`
    once per sampled token."""

    def __init__(self, generator: HFGenerator, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, positions: torch.Tensor, limit: int) -> None:
        rows, width = prompt_ids.shape
        self.model, self.cache_name, self.width = generator.model, generator.cache_name, width
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, limit)], dim=1)
        if generator.additive_mask:
            # Decoding steps get the ready 4D mask (0 = attend, -inf-ish = padding), which
            # transformers uses as is instead of rebuilding one from the 2D mask every step.
            dtype = next(self.model.parameters()).dtype
            mask = ((1 - mask[:, None, None, :]).to(dtype) * torch.finfo(dtype).min)
        self.mask = mask
        self.out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                              position_ids=positions, use_cache=True, logits_to_keep=1)
        self.logits = self.out.logits[:, -1]
        self.positions = positions[:, -1:] + 1

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (B,) and return the next logits (B, V)."""
        self.width += 1
        cache = getattr(self.out, self.cache_name)
        self.out = self.model(input_ids=token[:, None], attention_mask=self.mask[..., :self.width],
                              position_ids=self.positions, use_cache=True,
                              **{self.cache_name: cache})
        self.positions = self.positions + 1
        return self.out.logits[:, -1]


