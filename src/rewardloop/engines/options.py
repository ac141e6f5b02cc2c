"""The generation options every sampling command shares (``--generator``, ``--hf-decoding``,
``--vllm-*``) and the log-prob mode they imply; imported by the factory and by the engines it
builds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rewardloop.errors import UserError

if TYPE_CHECKING:
    from rewardloop.engines.base import SamplingSettings


GENERATORS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")
DECODINGS = ("dynamic", "static", "compiled")
VLLM_INSTALL = "pip install 'rewardloop[vllm]'"


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """How completions are generated (``--generator`` and the ``--vllm-*`` flags).

    Also the option block of every generating command: their configs inherit it, so each field
    is declared (and documented, for ``--help``) once. Validation runs in ``__post_init__``,
    which a config that has its own calls through :meth:`of`.
    """

    generator: str = "hf"
    """hf: the built-in KV-cached loop over the trainer's own model; vllm: a vLLM engine."""
    hf_decoding: str = "dynamic"
    """Decode step of the built-in loop (--generator hf). dynamic: a KV cache that grows every
    step, any model; static: one pre-allocated KV cache, reused between batches; compiled:
    static plus a torch.compile'd step (CUDA graphs on CUDA; compiling takes a while at the
    first generation). static and compiled need a full-attention model (no sliding window)."""
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
        if self.hf_decoding not in DECODINGS:
            raise ValueError(f"hf_decoding must be one of {', '.join(DECODINGS)}, "
                             f"got {self.hf_decoding!r}")
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


def vllm_sampling_fields(settings: SamplingSettings, n: int, never: Sequence[int],
                         stop_ids: Sequence[int]) -> dict[str, Any]:
    """vLLM ``SamplingParams`` fields for ``settings`` (kept free of vLLM so they are tested
    without it): the log-prob of each sampled token, the ``never`` tokens not sampled (the pad:
    the engine's own, and a trainer's that a server is told of; it would read as padding inside
    an answer), a stop at each of ``stop_ids`` (the tokenizer's EOS and the model's
    generation-config EOS ids, as the built-in loop; the stop token stays in the output). The
    engine runs without its tokenizer (we decode), so stops are token ids."""
    fields = {"n": n, "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
              "top_p": settings.top_p, "top_k": settings.top_k if settings.top_k > 0 else -1,
              "logprobs": 0, "stop_token_ids": list(stop_ids), "detokenize": False}
    if never:
        fields["logit_bias"] = {int(i): -100.0 for i in never}
    return fields


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
