"""``rewardloop train sft``: supervised fine-tuning on prompt/completion, chat or text rows.

The options shared with ``train rm`` are defined here once (``train_rm`` imports them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import CHAT_TEMPLATE, CONFIG, OUT, REPORT_TO, SEED, trackers
from rewardloop.cli._launch import (
    DIST_TIMEOUT,
    GRADIENT_CHECKPOINTING,
    NPROC,
    PRECISION,
    STRATEGY,
    runtime_flags,
)
from rewardloop.cli._train_group import train_app

ORDER = 41

MODEL = typer.Option(..., "--model", help="Model to start from: a local model directory (e.g. "
                     "from `rewardloop tiny`) or a hub id.")
EVAL_DATA = typer.Option(None, "--eval-data", help="Held-out rows of the same kind, evaluated "
                         "at the end (figures in summary.json).")
EPOCHS = typer.Option(None, "--epochs", help="Passes over the data (ignored with --max-steps). "
                      "Default 1.")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps to take (overrides "
                         "--epochs).")
GRAD_ACCUM = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (must "
                          "divide --batch-size): same result, less memory. Default 1.")
WEIGHT_DECAY = typer.Option(None, "--weight-decay", help="AdamW weight decay. Default 0.")
WARMUP = typer.Option(None, "--warmup-steps", help="Linear warm-up steps. Default 0.")
SCHEDULE = typer.Option(None, "--schedule", help="After warm-up: linear or cosine (decay to 0), "
                        "or constant. Default linear.")
MAX_GRAD_NORM = typer.Option(None, "--max-grad-norm", help="Clip gradients to this global norm "
                             "(0: no clipping). Default 1.")
MAX_LENGTH = typer.Option(None, "--max-length", help="Longest prompt + answer in tokens; longer "
                          "answers are cut. Default 512.")
MAX_PROMPT_LENGTH = typer.Option(None, "--max-prompt-length", help="Longest prompt in tokens, "
                                 "cut from the left. Default: up to --max-length - 1.")
EVAL_BATCH = typer.Option(None, "--eval-batch-size", help="Items per evaluation batch. "
                          "Default 32.")
LORA_R = typer.Option(None, "--lora-r", help="Train LoRA adapters of this rank instead of all "
                      "weights.")
LORA_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA scale alpha (update x alpha / r). "
                          "Default 32.")
MERGE_LORA = typer.Option(False, "--merge-lora", help="Save a merged plain model instead of the "
                          "LoRA adapter.")
DTYPE = typer.Option(None, "--dtype", help="auto (bfloat16 on a capable GPU, else float32), "
                     "float32, bfloat16 or float16.")
DEVICE = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. Default auto.")
SAVE_STEPS = typer.Option(None, "--save-every", help="Write a checkpoint every N steps (0: only "
                          "the final model). Default 0.")
LOG_EVERY = typer.Option(None, "--log-every", help="Log metrics every N steps. Default 1.")
RESUME = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in "
                      "--out.")
OVERWRITE = typer.Option(False, "--overwrite", help="Delete an existing run in --out first.")
ADD_PAD = typer.Option(False, "--add-pad-token", help="Add a new pad token when the tokenizer "
                       "has none or pads with EOS (refused otherwise).")
REMOTE_CODE = typer.Option(False, "--trust-remote-code", help="Run the model repository's own "
                           "Python code (only for repositories you trust).")


def register(app: typer.Typer) -> None:
    train_app.command("sft")(sft)


def flag(value: bool) -> bool | None:
    """A boolean switch as a config override: None (keep YAML/default) unless it was given."""
    return True if value else None


def show_summary(summary: dict[str, Any], out: Path, keys: tuple[str, ...]) -> None:
    shown = ", ".join(f"{k} {summary[k]:.4g}" if isinstance(summary[k], float)
                      else f"{k} {summary[k]}" for k in keys if summary.get(k) is not None)
    typer.echo(f"wrote {out}/model ({shown})")


def sft(
    model: str = MODEL,
    data: Path = typer.Option(..., "--data", help="Training rows (sft format; JSONL, Parquet, "
                              "Arrow or a dataset folder, DIR:SPLIT for a split): prompt + "
                              "completion, messages (chat, last turn = the answer) or text."),
    out: Path = OUT,
    eval_data: Path | None = EVAL_DATA,
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="Also train on the "
                                         "prompt tokens (default: only the completion + EOS)."),
    packing: bool = typer.Option(False, "--packing", help="Pack several examples into each row "
                                 "of --max-length tokens, without attention between them; "
                                 "--batch-size then counts rows."),
    seed: int | None = SEED,
    epochs: int | None = EPOCHS,
    max_steps: int | None = MAX_STEPS,
    batch_size: int | None = typer.Option(None, "--batch-size", help="Examples (packed rows "
                                          "with --packing) per optimizer step. Default 16."),
    grad_accum: int | None = GRAD_ACCUM,
    lr: float | None = typer.Option(None, "--lr", help="Peak AdamW learning rate. Default 2e-5."),
    weight_decay: float | None = WEIGHT_DECAY,
    warmup_steps: int | None = WARMUP,
    schedule: str | None = SCHEDULE,
    max_grad_norm: float | None = MAX_GRAD_NORM,
    max_length: int | None = MAX_LENGTH,
    max_prompt_length: int | None = MAX_PROMPT_LENGTH,
    eval_batch_size: int | None = EVAL_BATCH,
    eval_every: int | None = typer.Option(None, "--eval-every", help="Also evaluate every N "
                                          "steps (0: only at the end). Default 0."),
    lora_r: int | None = LORA_R,
    lora_alpha: int | None = LORA_ALPHA,
    merge_lora: bool = MERGE_LORA,
    dtype: str | None = DTYPE,
    device: str | None = DEVICE,
    save_every: int | None = SAVE_STEPS,
    log_every: int | None = LOG_EVERY,
    resume: bool = RESUME,
    overwrite: bool = OVERWRITE,
    add_pad_token: bool = ADD_PAD,
    trust_remote_code: bool = REMOTE_CODE,
    chat_template: Path | None = CHAT_TEMPLATE,
    report_to: list[str] | None = REPORT_TO,
    strategy: str | None = STRATEGY,
    precision: str | None = PRECISION,
    gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
    dist_timeout: int | None = DIST_TIMEOUT,
    nproc: int | None = NPROC,
    config: Path | None = CONFIG,
) -> None:
    """Supervised fine-tuning: cross-entropy on the completion tokens (or all tokens)."""
    from rewardloop.cli._common import existing_data
    from rewardloop.config import load_config
    from rewardloop.train.sft import SFTConfig, train_sft

    cfg = load_config(
        SFTConfig, config, model=model, data=data, out=out, eval_data=eval_data,
        train_on_prompt=flag(train_on_prompt), packing=flag(packing), seed=seed, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
        max_grad_norm=max_grad_norm, max_length=max_length, max_prompt_length=max_prompt_length,
        eval_batch_size=eval_batch_size, eval_every=eval_every, lora_r=lora_r,
        lora_alpha=lora_alpha, merge_lora=flag(merge_lora), dtype=dtype, device=device,
        save_every=save_every, log_every=log_every, resume=flag(resume),
        overwrite=flag(overwrite), add_pad_token=flag(add_pad_token),
        trust_remote_code=flag(trust_remote_code), chat_template=chat_template,
        report_to=trackers(report_to),
        **runtime_flags(strategy, precision, gradient_checkpointing, dist_timeout, nproc),
    )
    for path in (cfg.data, cfg.eval_data):
        if path is not None:
            existing_data(path)
    summary = train_sft(cfg)
    show_summary(summary, cfg.out, ("steps", "samples_per_s", "eval_loss", "eval_perplexity"))
