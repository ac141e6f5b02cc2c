"""One rank of a colocated vLLM engine spanning two ranks (``--vllm-tensor-parallel-size 2``),
run by test_vllm_engine.py under torchrun and set up as ``train.grpo`` does: the engine is
built, then each rank's global generator is seeded apart (``seed_sampling``: seed + 7919 *
rank), and each rank generates for its own prompt, twice. Rank 0 prints one JSON line: per
rank, what the engine drew for the group's prompts in each generation and the rows it kept."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch.distributed as dist


def main(model_dir: str) -> None:
    from rewardloop.engines.base import SamplingSettings
    from rewardloop.engines.factory import EngineOptions
    from rewardloop.engines.vllm_engine import VLLMGenerator
    from rewardloop.models import load_tokenizer
    from rewardloop.rollout import encode_prompts
    from rewardloop.util.seed import seed_everything

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = load_tokenizer(model_dir, padding_side="left")
    prompts = encode_prompts(tokenizer, ["Hi, my order is late.", "Where is my parcel?"], 64)
    options = EngineOptions(generator="vllm", vllm_gpu_memory_utilization=0.08,
                            vllm_tensor_parallel_size=2)
    engine = VLLMGenerator(model_dir, tokenizer, options, dtype="float32", seed=0, world_size=2)
    seed_everything(0 + 7919 * rank)  # train.grpo.seed_sampling
    drawn: list[list[list[int]]] = []
    sample = engine.sample

    def recorded(*args: Any, **kwargs: Any) -> Any:
        ids, logps = sample(*args, **kwargs)
        drawn.append(ids)
        return ids, logps

    engine.sample = recorded  # type: ignore[method-assign]
    kept = []
    for _ in range(2):
        rollout = engine.generate([prompts[rank]], 2, SamplingSettings(max_new_tokens=12))
        kept.append([row[mask.bool()].tolist() for row, mask in
                     zip(rollout.completion_ids, rollout.completion_mask, strict=True)])
    ranks: list[Any] = [None, None]
    dist.all_gather_object(ranks, {"drawn": drawn, "kept": kept})
    if rank == 0:
        print(json.dumps(ranks), flush=True)
    engine.close()  # its shutdown also ends the process group it was built on


if __name__ == "__main__":
    main(sys.argv[1])
