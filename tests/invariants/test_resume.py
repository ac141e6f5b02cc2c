"""Resume == uninterrupted, bit for bit, with the shared run plumbing (CPU).

A small explicit language-model loop (tiny Llama, 16 examples, batch 4 split into micro-batches,
AdamW + linear schedule, shuffled sampler, dropout on so the RNG state matters, a random crop
drawn from Python's RNG) runs 7 steps in one go, and again with a crash after a checkpoint and a
resume. The resumed part crosses the epoch boundary (4 batches per epoch), or starts exactly on
it — the case where peers silently trained on nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rewardloop.tiny import build_tiny, generate_corpus
from rewardloop.train.data import EpochSampler, count_tokens, microbatches
from rewardloop.train.run import RunDir, save_checkpoint
from rewardloop.util.seed import seed_everything

N_EXAMPLES, BATCH, MICRO, TOTAL_STEPS = 16, 4, 2, 7


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny(out, generate_corpus(200), vocab_size=300, hidden_size=32, num_layers=1,
                      num_heads=2, max_position=64)


def _loss_sum(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = ids[:, 1:]  # (B, T-1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask[:, 1:]).sum()


def train(tiny_dir: Path, out: Path, *, resume: bool, save_every: int, crash_after: int | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    run = RunDir(out, {"steps": TOTAL_STEPS, "save_every": save_every}, resume=resume)
    seed_everything(0 if not resume else 12345)  # a resumed run must not depend on this
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    texts = [t + tokenizer.eos_token for t in generate_corpus(N_EXAMPLES, seed=1)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attention_dropout=0.2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, 2, TOTAL_STEPS)
    sampler = EpochSampler(N_EXAMPLES, BATCH, seed=7)
    step = 0
    ckpt = run.restore(models={"policy": model}, optimizers={"policy": opt},
                       schedulers={"policy": sched})
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
    while step < TOTAL_STEPS:
        batch = sampler.next_batch()
        crop = random.randint(6, enc.input_ids.shape[1])  # Python RNG must be restored too
        parts = [(enc.input_ids[mb, :crop], enc.attention_mask[mb, :crop])
                 for mb in microbatches(batch, MICRO)]
        n_tokens = count_tokens([m[:, 1:] for _, m in parts])
        opt.zero_grad()
        total = torch.zeros(())
        for ids, mask in parts:
            loss = _loss_sum(model, ids, mask) / n_tokens
            loss.backward()
            total += loss.detach()
        opt.step()
        sched.step()
        step += 1
        run.meter.step(samples=len(batch), tokens=n_tokens)
        run.log_metrics(step, {"loss": total, "epoch": sampler.epoch, "lr": sched.get_last_lr()[0]})
        if step % save_every == 0:
            save_checkpoint(run, step, models={"policy": model}, optimizers={"policy": opt},
                            schedulers={"policy": sched}, sampler_state=sampler.state_dict())
        if crash_after is not None and step == crash_after:
            raise Crash
    run.write_summary({"final_loss": total})
    return model, opt, run


def _metrics(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.metrics_path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("save_every", "crash_after"),
    [(3, 5),  # resume at step 3: steps 4..7 cross the epoch boundary after step 4
     (4, 6)],  # resume exactly at the end of epoch 0
)
def test_resume_equals_uninterrupted(tiny_dir: Path, tmp_path: Path, save_every: int,
                                     crash_after: int) -> None:
    model_a, opt_a, run_a = train(tiny_dir, tmp_path / "a", resume=False, save_every=save_every,
                                  crash_after=None)
    with pytest.raises(Crash):
        train(tiny_dir, tmp_path / "b", resume=False, save_every=save_every,
              crash_after=crash_after)
    model_b, opt_b, run_b = train(tiny_dir, tmp_path / "b", resume=True, save_every=save_every,
                                  crash_after=None)

    for (name, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters(),
                                   strict=True):
        assert torch.equal(pa, pb), name
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[key][field], state_b[key][field]), (key, field)
    metrics_a, metrics_b = _metrics(run_a), _metrics(run_b)
    assert [m["step"] for m in metrics_b] == list(range(1, TOTAL_STEPS + 1))
    assert metrics_a == metrics_b  # losses, epochs and learning rates identical too
    assert [m["epoch"] for m in metrics_a] == [0, 0, 0, 0, 1, 1, 1]
    summary = json.loads((run_b.out / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS
    assert summary["final_loss"] == json.loads((run_a.out / "summary.json").read_text())[
        "final_loss"]


def test_weights_change_during_training(tiny_dir: Path, tmp_path: Path) -> None:
    """Guards the test above against a loop that trains nothing (equal because unchanged)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model, _, _ = train(tiny_dir, tmp_path / "a", resume=False, save_every=100, crash_after=None)
    for (name, p0), (_, p1) in zip(base.named_parameters(), model.named_parameters(),
                                   strict=True):
        assert not torch.equal(p0, p1), f"{name} did not change"
