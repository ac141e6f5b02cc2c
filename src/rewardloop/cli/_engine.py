"""The generation-engine flags (``--generator`` and ``--vllm-*``), spelled and explained once
for every command that generates (train grpo|rloo|ppo, eval, generate)."""

from __future__ import annotations

import typer

GENERATOR = typer.Option(None, "--generator", help="Generation engine: hf (built-in "
                         "KV-cached loop over the model) or vllm (needs the vllm extra). "
                         "Default hf. See docs/generation.md.")
VLLM_MODE = typer.Option(None, "--vllm-mode", help="With --generator vllm: colocate (an "
                         "engine inside this process, one per rank) or server (a running "
                         "`rewardloop vllm-serve`, see --vllm-server). Default colocate.")
VLLM_MEMORY = typer.Option(None, "--vllm-gpu-memory-utilization", help="Colocate: share of "
                           "the GPU's memory the engine may take (weights + KV cache); the "
                           "trainer needs the rest. Default 0.3.")
VLLM_TP = typer.Option(None, "--vllm-tensor-parallel-size", help="Colocate: GPUs one engine "
                       "spans. Default 1.")
VLLM_SLEEP = typer.Option(None, "--vllm-sleep/--no-vllm-sleep", help="Colocate: free the "
                          "engine's memory while the trainer optimises (vLLM sleep mode, GPUs "
                          "only). Default off.")
VLLM_SERVER = typer.Option(None, "--vllm-server", help="Server mode: URL of `rewardloop "
                           "vllm-serve`, e.g. http://10.0.0.5:8000.")
VLLM_MAX_LEN = typer.Option(None, "--vllm-max-model-len", help="Longest prompt + completion "
                            "the engine accepts, in tokens. Default: the model's limit.")
IS_LEVEL = typer.Option(None, "--is-level", help="Off-policy correction of samples from "
                        "another engine (vllm): token (truncated importance sampling), "
                        "sequence (drop sequences whose ratio exceeds --is-cap) or off. "
                        "Default token.")
IS_CAP = typer.Option(None, "--is-cap", help="Cap C of the trainer/sampler importance ratio. "
                      "Default 2.")
