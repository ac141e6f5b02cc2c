"""One rank of the collectives check in test_distributed.py (run as two processes): metrics
reduced over ranks, prompts shared by the ranks of one tensor-parallel engine, and an FSDP
model's weights gathered whole before rank 0 alone sends them. Prints one JSON line."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rewardloop import ops
from rewardloop.engines.base import TensorParallelShare
from rewardloop.engines.weight_sync import engine_weights, push_once
from rewardloop.options import RuntimeOptions
from rewardloop.train.runtime import Runtime


def main() -> None:
    rt = Runtime(RuntimeOptions(strategy="fsdp"), device="cpu")
    rank = rt.rank
    figures = rt.reduce_metrics({"loss": float(rank + 1), "is_ratio_max": [3.0, 5.0][rank],
                                 "completion_length_max": [9.0, 4.0][rank]})
    # Rewards 1, 2, 3 on rank 0 and 5, 7, 9 on rank 1: the batch's std is not the ranks' mean.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 7.0, 9.0]][rank])
    figures.update(rt.reduce_metrics({"reward/mean": float(rewards.mean()),
                                      "reward/std": float(rewards.std())}, count=3))
    # One reward a rank (REINFORCE++ with batch = processes): the std of the pair, not 0.
    one = rt.reduce_metrics({"reward/mean": [1.0, 5.0][rank], "reward/std": 0.0}, count=1)
    figures["reward_of_one/std"] = one["reward/std"]
    # A token mean over 10 tokens on rank 0 and 2 on rank 1: weighed by tokens, not ranks.
    figures.update(rt.reduce_metrics({"kl_k1": [1.0, 4.0][rank]},
                                     weights={"kl_k1": [10.0, 2.0][rank]}))
    # The critic's explained variance of the whole batch, from each rank's half.
    torch.manual_seed(1)
    returns, values = torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    half = slice(2 * rank, 2 * rank + 2)
    figures["explained_variance"] = float(ops.explained_variance(
        values[half], returns[half], mask[half], reduce_sum=rt.all_reduce))
    figures["explained_variance_whole"] = float(ops.explained_variance(values, returns, mask))
    # Unequal shares: rank 0 holds one prompt, rank 1 two.
    prompts = [[10 * rank + 1], [10 * rank + 2, 7]][: rank + 1]
    everyone, mine = TensorParallelShare(2).gather(prompts)

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1))
    whole = {name: p.detach().clone() for name, p in model.named_parameters()}
    sharded = rt.prepare(model)
    sends: list[dict[str, object]] = []

    def send(weights: list[tuple[str, torch.Tensor]]) -> None:
        sends.append({
            "names": sorted(name for name, _ in weights),
            "plain": all(type(t) is torch.Tensor for _, t in weights),
            "equal": all(torch.equal(t, whole[name]) for name, t in weights)})

    with engine_weights(sharded) as weights:
        push_once(send, weights)
    print(json.dumps({"rank": rank, "figures": figures, "everyone": everyone,
                      "mine": [mine.start, mine.stop], "sends": sends,
                      "names": sorted(whole)}))


if __name__ == "__main__":
    main()
