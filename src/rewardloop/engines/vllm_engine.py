"""vLLM inside the trainer's process ("colocate"): ``vllm.LLM`` sampling from its own copy of
the policy, kept in sync by pushing the trainer's weights before a generation that follows an
update.

Only the stable part of vLLM's API is used (``LLM``, ``SamplingParams``, ``generate``,
``collective_rpc("reload_weights")``, ``reset_prefix_cache``, ``sleep``/``wake_up``):
every integration that reached deeper broke with vLLM's releases (TRL #3304, OpenRLHF #1193).
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a push hands it the
trainer's tensors without a copy between processes. With several ranks, each rank runs its own
engine over its own devices (``distributed_executor_backend="external_launcher"``); an engine
that spans several ranks (``--vllm-tensor-parallel-size``) gets the same prompts from each of
them (``base.TensorParallelShare``) and every rank the same seeds.

Seeds. In this process vLLM's sampler draws from torch's global generator, which the trainers
seed per rank and a checkpoint restores: an engine of one rank is reproducible as it is. The
ranks of one tensor-parallel engine, seeded apart, would sample different tokens and feed them
into their shared forward passes (a mixture no policy produced). So their requests carry a seed
of their own (vLLM then samples each from a generator of its own), drawn from the global
generator (``base.request_seed``), the group's first rank's on every rank of the engine; so do
a server's when its client sends one. Only then: vLLM samples seeded rows one by one, which
costs time on a GPU (not measured).

Log-probs. The trainer scores tokens with temperature-scaled, untruncated logits. vLLM reports
either ``raw_logprobs`` (before temperature) or ``processed_logprobs`` (after temperature AND
top-p/top-k, renormalised over the kept tokens, which biases an importance ratio, TRL #6789).
So: temperature 1 -> raw (exact for any top-p/top-k); temperature != 1 without top-p/top-k ->
processed (exact); temperature != 1 with top-p/top-k -> refused when log-probs are needed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import vllm
from vllm.platforms import current_platform

from rewardloop.engines.base import (
    Rollout,
    SamplingSettings,
    TensorParallelShare,
    check_context,
    check_request,
    request_seed,
    rollout_from_tokens,
    saved_stop_ids,
)
from rewardloop.engines.options import EngineOptions, vllm_sampling_fields
from rewardloop.engines.weight_sync import WeightSync, engine_weights
from rewardloop.errors import UserError

log = logging.getLogger(__name__)


def _repack_tied_head(model: Any) -> None:
    """Redo the output head's kernel preparation after a reload when it shares the embedding.

    The reload only processes the layers it loads; a tied head is not loaded (its weight IS
    the embedding's), and the CPU build computes it from a copy packed at start-up, so without
    this it keeps the old embedding (found by tests/vllm: a push of a tied model left the
    logits stale). On GPUs the head reads the embedding itself and this is a no-op.
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if getattr(model.config, "tie_word_embeddings", False) and method is not None:
        method.process_weights_after_loading(head)


class _WarmupWithoutTokenizer(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" warning and its traceback when the cause is
    the missing tokenizer: the engine runs with ``skip_tokenizer_init`` (token ids in and out),
    so the chat-template warmup at start always fails, and the traceback in the log of a
    healthy run reads like a failure. Any other warmup failure is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        cause = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage() == "Chat template warmup failed"
                    and "skip_tokenizer_init" in str(cause))


@contextmanager
def _quiet_warmup() -> Iterator[None]:
    """:class:`_WarmupWithoutTokenizer` on vLLM's renderer logger while an engine starts."""
    logger, quiet = logging.getLogger("vllm.renderers.base"), _WarmupWithoutTokenizer()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class VLLMGenerator:
    """A :class:`~rewardloop.engines.base.Generator` over an in-process ``vllm.LLM``.

    ``logprobs_mode`` is vLLM's (``factory.logprobs_mode`` picks the one that matches the
    trainer's log-probs for the run's sampling settings); ``stop_ids`` end an answer (None:
    those of the model in ``model_path``, ``base.saved_stop_ids``)."""

    def __init__(self, model_path: str | Path, tokenizer: Any, options: EngineOptions, *,
                 seed: int = 0, world_size: int = 1, dtype: str = "auto",
                 logprobs_mode: str = "raw_logprobs",
                 stop_ids: Sequence[int] | None = None) -> None:
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer's pad token is its EOS (TRL #1623): load it with "
                             "load_tokenizer(sampling_only=True)")
        if options.vllm_sleep and not current_platform.is_sleep_mode_available():
            raise UserError(f"--vllm-sleep: vLLM {vllm.__version__} has no sleep mode on this "
                            f"platform ({current_platform.device_name}); drop --vllm-sleep")
        self.tokenizer = tokenizer
        # None: a model without a pad (Llama 3, GPT-2), nothing to keep from sampling.
        self.pad_id: int | None = tokenizer.pad_token_id
        self.stop_ids = list(stop_ids or saved_stop_ids(model_path, tokenizer))
        self.sleep_between = options.vllm_sleep
        self.sync = WeightSync()
        self.asleep = False
        self.logprobs_mode = logprobs_mode
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs: dict[str, Any] = {
            "model": str(model_path), "seed": seed, "dtype": dtype,
            "tensor_parallel_size": options.vllm_tensor_parallel_size,
            "gpu_memory_utilization": options.vllm_gpu_memory_utilization,
            "enable_sleep_mode": options.vllm_sleep,
            "logprobs_mode": logprobs_mode,
            # CUDA graphs pay off on GPUs; on CPU compiling them only costs start-up time.
            "enforce_eager": not current_platform.is_cuda_alike(),
            # Token ids in, token ids out: the trainer's tokenizer decodes, once.
            "skip_tokenizer_init": True,
        }
        if options.vllm_max_model_len is not None:
            kwargs["max_model_len"] = options.vllm_max_model_len
        # With several ranks each runs an engine of its own devices; one that spans several
        # ranks (tensor parallel) is fed the same prompts by each of them and must draw the
        # same numbers on each (vLLM's seed at start here, the requests' seeds in ``generate``),
        # while two engines draw differently.
        self.share: TensorParallelShare | None = None
        if world_size > 1:
            import torch.distributed as dist

            kwargs["distributed_executor_backend"] = "external_launcher"
            if options.vllm_tensor_parallel_size > 1:
                self.share = TensorParallelShare(options.vllm_tensor_parallel_size)
            kwargs["seed"] = seed + 7919 * (dist.get_rank() // options.vllm_tensor_parallel_size)
        log.info("starting vLLM %s on %s", vllm.__version__, model_path)
        with _quiet_warmup():
            self.llm = vllm.LLM(**kwargs)
        # Longest prompt + completion the engine takes (--vllm-max-model-len, or the model's).
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def policy_updated(self, model: Any) -> None:
        self.sync.mark(model)

    def close(self) -> None:
        """Shut the engine down now. vLLM otherwise does it at interpreter exit, and with
        several ranks that is after the trainer left the process group the engine's groups
        were made in: their teardown then fails with a traceback after a run that succeeded.
        (The engine's shutdown sits below ``LLM``; where a version moves it, this does
        nothing and vLLM's own exit-time shutdown remains.)"""
        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(client, "shutdown", None)
        if callable(shutdown):
            shutdown()

    def load_weights(self, weights: Sequence[tuple[str, Any]]) -> int:
        """Copy ``(checkpoint name, tensor)`` pairs into the engine's model and forget cached
        prefixes computed with the old weights. vLLM's in-place reload fuses q/k/v and gate/up
        and repeats the kernel-specific processing of loading (the CPU build repacks weights,
        so a plain ``model.load_weights`` after start-up fails)."""
        self.llm.collective_rpc("reload_weights", kwargs={
            "weights_iterator": list(weights), "is_checkpoint_format": True})
        self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()
        return len(weights)

    def _prepare(self) -> None:
        """Wake the weights, push the trainer's if they changed, then wake the KV cache (waking
        both before the push would hold both while the push needs room, vLLM #15254)."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        model = self.sync.take()
        if model is not None:
            with engine_weights(model) as weights:
                self.load_weights(weights)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def sample(self, prompts: Sequence[Sequence[int]], n: int, settings: SamplingSettings,
               seed: int | None = None, never: Sequence[int] = ()
               ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` completions per prompt (contiguous) and the log-prob of each of their tokens.

        With a ``seed`` each completion is drawn from a generator of its own: vLLM seeds the
        k-th of a request's ``n`` copies with the request's seed + k
        (``vllm/v1/engine/parallel_sampling.py``), so prompt i's request gets ``seed + i * n``
        and no two rows share a stream (two equal prompts under one seed would get equal
        answers). Without, vLLM draws from torch's global generator. ``never``: token ids not
        to sample besides the pad (a client's pad, which this engine's model may not call
        one). A prompt that does not
        leave room for ``max_new_tokens`` in the engine's context is a UserError, as is any
        request vLLM refuses."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        check_context(self.max_model_len, max(len(p) for p in prompts),
                      settings.max_new_tokens, "a prompt")
        own = [] if self.pad_id is None else [self.pad_id]
        fields = vllm_sampling_fields(settings, n, [*own, *never], self.stop_ids)
        params: Any = vllm.SamplingParams(**fields) if seed is None else [
            vllm.SamplingParams(**fields, seed=seed + i * n) for i in range(len(prompts))]
        self._prepare()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                use_tqdm=False)
        except VLLMValidationError as exc:
            raise UserError(f"vLLM refused the request: {exc}") from None
        if self.sleep_between:
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped
            self.asleep = True
        ids, logps = [], []
        for request in outputs:
            for completion in request.outputs:
                tokens = list(completion.token_ids)
                ids.append(tokens)
                logps.append([float(step[tok].logprob)
                              for step, tok in zip(completion.logprobs, tokens, strict=True)])
        return ids, logps

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        check_request(prompts, n)
        if self.share is None:
            ids, logps = self.sample(prompts, n, settings)
        else:  # the group's prompts and seed, on every rank of it; this rank keeps its rows
            everyone, mine = self.share.gather(prompts)
            ids, logps = self.sample(everyone, n, settings,
                                     seed=self.share.common_seed(request_seed()))
            rows = slice(mine.start * n, mine.stop * n)
            ids, logps = ids[rows], logps[rows]
        return rollout_from_tokens(prompts, n, ids, logps, self.tokenizer, self.stop_ids)
