"""The generation-engine flags (``--generator``, ``--hf-decoding`` and ``--vllm-*``) of every
command that generates (train grpo|rloo|ppo, eval, generate); their help is ``EngineOptions``'
field docstrings and defaults."""

from __future__ import annotations

import typer

from rewardloop.engines.options import EngineOptions
from rewardloop.options import flag_help


def _help(name: str) -> str:
    return flag_help(EngineOptions, name)


GENERATOR = typer.Option(None, "--generator", help=_help("generator") + " See "
                         "docs/generation.md.")
HF_DECODING = typer.Option(None, "--hf-decoding", help=_help("hf_decoding"))
VLLM_MODE = typer.Option(None, "--vllm-mode", help=_help("vllm_mode"))
VLLM_MEMORY = typer.Option(None, "--vllm-gpu-memory-utilization",
                           help=_help("vllm_gpu_memory_utilization"))
VLLM_TP = typer.Option(None, "--vllm-tensor-parallel-size",
                       help=_help("vllm_tensor_parallel_size"))
VLLM_SLEEP = typer.Option(None, "--vllm-sleep/--no-vllm-sleep", help=_help("vllm_sleep"))
VLLM_SERVER = typer.Option(None, "--vllm-server", help=_help("vllm_server"))
VLLM_MAX_LEN = typer.Option(None, "--vllm-max-model-len", help=_help("vllm_max_model_len"))
IS_LEVEL = typer.Option(None, "--is-level", help="Off-policy correction of samples from "
                        "another engine (vllm): token (truncated importance sampling), "
                        "sequence (drop sequences whose ratio exceeds --is-cap) or off. "
                        "Default token.")
IS_CAP = typer.Option(None, "--is-cap", help="Cap C of the trainer/sampler importance ratio. "
                      "Default 2.")
