"""The training runtime in one process: precision (fp32 master weights), checkpointing of
activations, micro-batch dealing over ranks, whole-batch whitening, option checks. The
multi-process behaviour is in tests/invariants/test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewardloop import ops
from rewardloop.errors import UserError
from rewardloop.options import RuntimeOptions, field_docs
from rewardloop.synthetic import corpus_texts, sft_rows
from rewardloop.tiny import build_tiny
from rewardloop.train.data import rank_micro_batches
from rewardloop.train.runtime import Runtime
from rewardloop.train.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runtime")
    build_tiny(root / "tiny", corpus_texts(100), vocab_size=300, hidden_size=16, num_layers=2,
               seed=0)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8, seed=1)))
    return root


def _sft(work: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    cfg = SFTConfig(model=str(work / "tiny"), data=work / "sft.jsonl", out=out, batch_size=4,
                    max_steps=2, max_length=64, **options)
    train_sft(cfg)
    return load_file(str(out / "model" / "model.safetensors"))


def test_bf16_compute_keeps_updates_that_bf16_weights_lose(work: Path, tmp_path: Path) -> None:
    """lr 1e-7: each AdamW step moves a weight by ~1e-7, far under half a bf16 step at
    |w| ~ 0.02 (~6e-5). fp32 master weights keep it (most weights move); the same update on
    bf16 weights is lost (almost none move)."""
    base = load_file(str(work / "tiny" / "model.safetensors"))
    trained = _sft(work, tmp_path / "bf16", precision="bf16", lr=1e-7, schedule="constant")
    key = "model.layers.0.mlp.up_proj.weight"
    assert trained[key].dtype == torch.float32  # model/ holds the master weights
    moved = (trained[key] - base[key]).abs()
    assert 0 < moved.max() < 1e-5 and (moved > 0).float().mean() > 0.5

    pure = base[key].to(torch.bfloat16).clone().requires_grad_(True)
    opt = torch.optim.AdamW([pure], lr=1e-7, weight_decay=0.0)
    pure.grad = torch.randn_like(pure)
    before = pure.detach().clone()
    opt.step()
    kept = (pure.detach() != before).float().mean()
    assert kept < 0.05  # rounded away, except on the few weights within ~1e-5 of 0


def test_gradient_checkpointing_changes_memory_not_results(work: Path, tmp_path: Path) -> None:
    plain = _sft(work, tmp_path / "plain", lr=1e-3)
    checkpointed = _sft(work, tmp_path / "ckpt", lr=1e-3, gradient_checkpointing=True)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=1e-5, atol=1e-6, msg=name)
    a, b = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("plain", "ckpt"))
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-6)


def test_micro_batches_deal_every_row_once_and_fill_short_steps() -> None:
    lengths = [5, 9, 2, 7, 3, 8, 1, 4]
    batch = list(range(8))
    seen = []
    for rank in range(2):
        micro = rank_micro_batches(batch, lengths, 2, rank, 2)
        assert len(micro) == 2 and not any(filler for _, filler in micro)
        seen += [i for chunk, _ in micro for i in chunk]
    assert sorted(seen) == batch
    # An epoch's short last batch (3 rows, 2 ranks x 2 micro-batches): fillers keep every
    # rank at 2 passes, and the real rows are still each dealt once.
    short = [6, 2, 4]
    dealt = [rank_micro_batches(short, lengths, 2, r, 2) for r in range(2)]
    assert [len(d) for d in dealt] == [2, 2]
    real = sorted(i for d in dealt for chunk, filler in d if not filler for i in chunk)
    assert real == sorted(short) and any(f for d in dealt for _, f in d)
    # One process: no fillers, exactly the micro-batches asked for (or fewer rows).
    assert [f for _, f in rank_micro_batches(short, lengths, 2, 0, 1)] == [False, False]


def test_whitening_with_a_reduction_sees_the_whole_batch() -> None:
    """Two 'ranks' as two halves: adding the other half's statistics, as an all-reduce
    would, whitens each half exactly as the whole batch is whitened."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 8.0, 0.0], [2.0, 2.0, 9.0], [7.0, 1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    whole = ops.masked_whiten(x, mask)
    m_all = mask.to(x.dtype)
    mean = (x * m_all).sum() / m_all.sum()

    def all_reduce_with(other_x: torch.Tensor, other_m: torch.Tensor):
        m = other_m.to(other_x.dtype)

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 1:  # (count, sum)
                return t + torch.stack([m.sum(), (other_x * m).sum()])
            return t + ((other_x - mean) ** 2 * m).sum()  # summed squared deviations
        return reduce_sum

    first = ops.masked_whiten(x[:2], mask[:2], reduce_sum=all_reduce_with(x[2:], mask[2:]))
    second = ops.masked_whiten(x[2:], mask[2:], reduce_sum=all_reduce_with(x[:2], mask[:2]))
    torch.testing.assert_close(torch.cat([first, second]), whole)
    identity = ops.masked_whiten(x, mask, reduce_sum=lambda t: t)
    torch.testing.assert_close(identity, whole)


def test_impossible_options_are_refused() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        RuntimeOptions(strategy="zero3").check_runtime()
    with pytest.raises(UserError, match="--strategy fsdp shards the model"):
        Runtime(RuntimeOptions(strategy="fsdp"))
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        Runtime(RuntimeOptions(precision="fp16"), device="cpu")
    assert Runtime(RuntimeOptions(), device="cpu").precision == "fp32"  # auto on a CPU


def test_every_runtime_option_is_documented() -> None:
    docs = field_docs(RuntimeOptions)
    assert set(docs) == {"strategy", "precision", "gradient_checkpointing", "chunked_lm_head",
                         "dist_timeout"}
    assert all(len(text) > 30 for text in docs.values())
