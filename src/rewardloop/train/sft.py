"""Supervised fine-tuning: next-token cross-entropy on answers (``rewardloop train sft``).

One explicit loop (``train_sft``). Data are ``sft`` rows (prompt + completion, chat ``messages``
whose last turn is the answer, or plain ``text``), tokenised once by ``rewardloop.tokenize``.
The loss
is the token mean of -log p(token) over the *target* tokens of the whole optimizer step: the
completion tokens (EOS included) by default, every token with ``train_on_prompt``. Dividing by the
step's global target-token count (not a micro-batch mean) makes gradient accumulation exact.

Batches group examples of similar length (``LengthGroupedSampler``) and are padded to their own
longest row, so little compute goes to padding. With ``packing`` several examples share one row
of up to ``max_length`` tokens, with ``position_ids`` restarting at 0 for each; transformers
turns restarting positions (and no 2-D attention mask) into a block-diagonal causal mask, so a
token never attends to another example (``tests/unit/test_sft.py`` checks packed logits equal
unpacked ones). The first token of every example is never a target, so nothing is trained to
predict one example from the end of the previous one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardloop import losses
from rewardloop.data.formats import read_records
from rewardloop.data.records import SFTRecord
from rewardloop.errors import UserError
from rewardloop.lm_head import label_logps, with_end_label
from rewardloop.models import (
    LoraSettings,
    load_policy,
    load_tokenizer,
    match_tokenizer,
)
from rewardloop.tokenize import Encoded, encode_many, pad
from rewardloop.train.configs import SFTConfig
from rewardloop.train.data import (
    LengthGroupedSampler,
    rank_micro_batches,
    scheduler,
)
from rewardloop.train.run import (
    RunDir,
    adamw,
    save_checkpoint,
)
from rewardloop.train.runtime import Runtime, runtime_for
from rewardloop.train.step import MicroLoss, accumulate_and_step
from rewardloop.util.progress import progress_bar
from rewardloop.util.seed import seed_everything

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data: examples -> rows (one example, or several packed) -> padded batches
# ---------------------------------------------------------------------------------------------


def read_sft(path: Path, tokenizer: Any, cfg: SFTConfig) -> list[Encoded]:
    """Tokenised sft rows of ``path``; another data kind is a UserError naming it."""
    fmt, records = read_records(path)
    if fmt != "sft":
        raise UserError(f"{path}: looks like {fmt} rows, but train sft needs sft rows "
                        "(prompt + completion, messages ending with the assistant, or text); "
                        "for preferences use train rm or train dpo")
    examples = encode_many(tokenizer, [r.prompt_completion() for r in records
                                       if isinstance(r, SFTRecord)],
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    if not any(sum(target_mask(e, cfg.train_on_prompt)) for e in examples):
        raise UserError(f"{path}: no example has a token to train on (are the completions "
                        "cut away by --max-length?)")
    cut = sum(not e.has_eos for e in examples)
    if cut:  # a model trained on answers without their end does not learn to stop
        log.warning("%s: %d of %d answers were cut at max_length=%d (no EOS): the model does "
                    "not learn where they end; raise --max-length", path, cut, len(examples),
                    cfg.max_length)
    return examples


def target_mask(example: Encoded, train_on_prompt: bool) -> list[int]:
    """1 on the tokens the loss predicts: the completion (or every token), never the first.

    The first token has no context inside its example; in a packed row it would be predicted
    from the previous example, which must not be learnt.
    """
    mask = [1] * len(example) if train_on_prompt else list(example.completion_mask)
    if mask:
        mask[0] = 0
    return mask


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``max_length`` tokens (first-fit decreasing).

    Deterministic; every index appears once. Rows are filled longest example first, which leaves
    little room unused (the strategy TRL calls "bfd").
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_length - lengths[i])
    return rows


@dataclass(frozen=True)
class Row:
    """One row of a batch: the example indices it holds (one, or several when packed)."""

    examples: tuple[int, ...]
    length: int


def make_rows(examples: Sequence[Encoded], cfg: SFTConfig) -> list[Row]:
    lengths = [len(e) for e in examples]
    groups = pack(lengths, cfg.max_length) if cfg.packing else [[i] for i in range(len(lengths))]
    return [Row(tuple(g), sum(lengths[i] for i in g)) for g in groups]


def collate_rows(rows: Sequence[Row], examples: Sequence[Encoded], pad_id: int,
                 train_on_prompt: bool, packed: bool) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, targets (B, T), and attention_mask or position_ids.

    Unpacked rows get the usual 2-D attention mask. Packed rows get ``position_ids`` restarting
    at 0 per example and no attention mask, which transformers turns into a block-diagonal
    causal mask; padding at the end of a row is a segment of its own that no real token sees.
    """
    ids, targets, positions = [], [], []
    for row in rows:
        parts = [examples[i] for i in row.examples]
        ids.append([t for e in parts for t in e.input_ids])
        targets.append([m for e in parts for m in target_mask(e, train_on_prompt)])
        positions.append([p for e in parts for p in range(len(e))])
    batch = {"input_ids": pad(ids, pad_id), "targets": pad(targets, 0)}
    if packed:
        width = batch["input_ids"].shape[1]
        batch["position_ids"] = pad([p + list(range(width - len(p))) for p in positions], 0)
    else:
        batch["attention_mask"] = pad([[1] * len(x) for x in ids], 0)
    return batch


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


def token_nll(model: nn.Module, batch: dict[str, torch.Tensor], global_tokens: float
              ) -> torch.Tensor:
    """Summed -log p of the batch's target tokens / ``global_tokens``: a scalar.

    Logits at position t predict token t+1, so targets are shifted by one.
    """
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "targets"}
    inputs["use_cache"] = False
    labels = with_end_label(batch["input_ids"][:, 1:])
    token_logps = label_logps(model, inputs, labels).logps[:, :-1]  # (B, T-1)
    loss, _ = losses.nll_loss(token_logps, batch["targets"][:, 1:], global_tokens=global_tokens)
    return loss


def step_targets(batch_rows: Sequence[int], rows: Sequence[Row], examples: Sequence[Encoded],
                 train_on_prompt: bool) -> int:
    """Target tokens of one optimizer step's rows (all ranks' rows: the global count)."""
    return sum(sum(target_mask(examples[i], train_on_prompt))
               for r in batch_rows for i in rows[r].examples)


def micro_loss(model: nn.Module, rows: Sequence[Row], examples: Sequence[Encoded],
               cfg: SFTConfig, pad_id: int, device: torch.device, n_targets: int) -> MicroLoss:
    """The loss of one micro-batch of ``rows``: its summed target NLL / the step's
    ``n_targets`` (so the accumulated gradient is the one-big-batch token mean)."""
    def loss_of(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = collate_rows([rows[i] for i in indices], examples, pad_id, cfg.train_on_prompt,
                             cfg.packing)
        return token_nll(model, {k: v.to(device) for k, v in batch.items()}, n_targets), {}

    return loss_of


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Encoded], cfg: SFTConfig, pad_id: int,
             rt: Runtime) -> dict[str, float]:
    """Token-mean NLL of the eval targets (``eval_loss``) and ``eval_perplexity`` = exp of it.

    Every rank scores its share of the batches (``Runtime.map_chunks``).
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total = sum(sum(target_mask(e, cfg.train_on_prompt)) for e in examples)
    starts = list(range(0, len(order), cfg.eval_batch_size))

    def chunk_nll(k: int) -> float:
        chunk = order[starts[k]:starts[k] + cfg.eval_batch_size]
        rows = [Row((i,), len(examples[i])) for i in chunk]
        batch = collate_rows(rows, examples, pad_id, cfg.train_on_prompt, packed=False)
        with rt.autocast():
            return float(token_nll(model, {n: v.to(rt.device) for n, v in batch.items()},
                                   total))

    nll = sum(rt.map_chunks(len(starts), chunk_nll))
    model.train(was_training)
    return {"eval_loss": nll, "eval_perplexity": math.exp(min(nll, 700.0))}


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def load_tokenizer_for(cfg: SFTConfig) -> Any:
    """The model's right-padding tokenizer (pad == EOS refused unless add_pad_token)."""
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code,
                          add_pad_token=cfg.add_pad_token, padding_side="right",
                          chat_template=cfg.chat_template)


def load_model(cfg: SFTConfig, tokenizer: Any, rt: Runtime) -> nn.Module:
    """The policy in fp32 master weights, with fresh LoRA adapters when asked, its embeddings
    matched to ``tokenizer``."""
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None
    model = load_policy(cfg.model, dtype=rt.weights_dtype(cfg.dtype), device=str(rt.device),
                        trust_remote_code=cfg.trust_remote_code, lora=lora)
    match_tokenizer(model, tokenizer)
    return model


def train_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Run supervised fine-tuning; returns the summary written to ``summary.json``."""
    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt)


def _train(cfg: SFTConfig, rt: Runtime) -> dict[str, Any]:  # noqa: C901 (the loop)
    # Data first: a refused file must not leave a half-made run directory behind.
    rt.check_divisible(cfg.batch_size // cfg.grad_accum, "--batch-size / --grad-accum")
    rt.check_merge_lora(cfg.merge_lora)
    tokenizer = load_tokenizer_for(cfg)
    pad_id = tokenizer.pad_token_id
    examples = read_sft(cfg.data, tokenizer, cfg)
    eval_examples = read_sft(cfg.eval_data, tokenizer, cfg) if cfg.eval_data else []
    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, runtime=rt,
                 report_to=cfg.report_to, start=False)
    seed_everything(cfg.seed)
    model = load_model(cfg, tokenizer, rt)
    rows = make_rows(examples, cfg)
    row_lengths = [r.length for r in rows]
    sampler = LengthGroupedSampler(row_lengths, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.batches_per_epoch
    log.info("sft: %d examples in %d rows, %d steps", len(examples), len(rows), total_steps)

    model.train()
    model = rt.prepare(model)  # FSDP2 replaces the parameters: collect them after
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    sched = scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule)
    ckpt = run.restore(models={"policy": model}, optimizers={"policy": optimizer},
                       schedulers={"policy": sched}, runtime=rt)
    step = 0
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
    run.start()  # everything loaded and the checkpoint accepted: only now is --out changed
    figures: dict[str, float] = {}
    evaluated: int | None = None  # the step last evaluated
    with progress_bar(total_steps, "sft", start=step) as show:
        while step < total_steps:
            batch_rows = sampler.next_batch()
            n_targets = max(step_targets(batch_rows, rows, examples, cfg.train_on_prompt), 1)
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it after)
            out = accumulate_and_step(
                rt, model, optimizer, params,
                rank_micro_batches(batch_rows, row_lengths, cfg.grad_accum, rt.rank,
                                   rt.world_size),
                micro_loss(model, rows, examples, cfg, pad_id, rt.device, n_targets),
                max_grad_norm=cfg.max_grad_norm, step=step + 1, run=run, scheduler=sched)
            step += 1
            run.meter.step(samples=sum(len(rows[i].examples) for i in batch_rows),
                           tokens=sum(row_lengths[i] for i in batch_rows))
            if step % cfg.log_every == 0 or step == total_steps:
                run.log_metrics(step, {"loss": out.loss, "grad_norm": out.grad_norm,
                                       "lr": lr, "target_tokens": n_targets,
                                       "epoch": sampler.epoch})
            if eval_examples and cfg.eval_every and step % cfg.eval_every == 0:
                figures = evaluate(model, eval_examples, cfg, pad_id, rt)
                run.log_metrics(step, figures)
                evaluated = step
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(run, step, models={"policy": model},
                                optimizers={"policy": optimizer}, schedulers={"policy": sched},
                                sampler_state=sampler.state_dict(), runtime=rt)
            show(step, f"loss {out.loss:.3f}")
    if eval_examples and evaluated != step:  # the last step's figures, once
        figures = evaluate(model, eval_examples, cfg, pad_id, rt)
        run.log_metrics(step, figures)
    rt.save_model(model, tokenizer, run.model_dir, merge_lora=cfg.merge_lora)
    return run.write_summary({**figures, "train_examples": len(examples),
                              "packed_rows": len(rows) if cfg.packing else None})
