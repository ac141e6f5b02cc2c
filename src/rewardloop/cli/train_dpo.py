"""``rewardloop train dpo``: DPO, cDPO, IPO, robust DPO and KTO straight from preference files."""

from __future__ import annotations

from pathlib import Path

import typer

from rewardloop.cli._best_point import (
    EARLY_STOPPING_PATIENCE,
    EVAL_EVERY,
    EVAL_FRACTION,
    best_point_flags,
)
from rewardloop.cli._common import CHAT_TEMPLATE, CONFIG, REPORT_TO, SEED, trackers
from rewardloop.cli._launch import (
    DIST_TIMEOUT,
    GRADIENT_CHECKPOINTING,
    NPROC,
    PRECISION,
    STRATEGY,
    runtime_flags,
)
from rewardloop.cli._train_group import train_app

ORDER = 45


def register(app: typer.Typer) -> None:
    train_app.command("dpo")(dpo)


def dpo(
    model: str = typer.Option(
        ..., "--model", "--policy",
        help="Policy to start from (usually an SFT model): a local model directory or a hub id. "
        "Also the reference unless --ref-model is given."),
    data: Path = typer.Option(
        ..., "--data",
        help="Training preferences (JSONL, Parquet, Arrow or a dataset folder, DIR:SPLIT "
        "for a split): pairwise rows (trl, hh, ultrafeedback) for "
        "dpo/cdpo/ipo/robust; unpaired rows (prompt, completion, label) for kto."),
    out: Path = typer.Option(
        ..., "--out", help="Run directory to write (model/, metrics.jsonl, summary.json)."),
    loss: str | None = typer.Option(
        None, "--loss",
        help="dpo (sigmoid), cdpo (conservative, needs --label-smoothing), ipo, robust "
        "(unbiased under label noise), kto (unpaired data). Default dpo."),
    beta: float | None = typer.Option(
        None, "--beta", help="Strength of the pull toward the reference (IPO's tau). "
        "Default 0.1."),
    label_smoothing: float | None = typer.Option(
        None, "--label-smoothing",
        help="Assumed rate of flipped labels in [0, 0.5) for cdpo/robust (dpo with it is cdpo). "
        "Default 0."),
    length_normalize: bool | None = typer.Option(
        None, "--length-normalize/--no-length-normalize",
        help="Score answers by mean log-prob per token instead of the sum (as IPO's authors)."),
    nll_coef: float | None = typer.Option(
        None, "--nll-coef",
        help="RPO: add this times the token-mean NLL of the chosen answers. Default 0."),
    desirable_weight: float | None = typer.Option(
        None, "--desirable-weight", help="KTO weight of desirable rows. Default 1."),
    undesirable_weight: float | None = typer.Option(
        None, "--undesirable-weight", help="KTO weight of undesirable rows. Default 1."),
    ref_model: str | None = typer.Option(
        None, "--ref-model",
        help="Reference model directory. Default: the initial policy (with --lora-r: the base "
        "model, adapter disabled)."),
    ref_on_the_fly: bool | None = typer.Option(
        None, "--ref-on-the-fly/--ref-cached",
        help="Score the reference every step instead of once before training (cached: default, "
        "faster, no reference model kept in memory)."),
    data_format: str | None = typer.Option(
        None, "--format", help="Format of --data/--eval-data: trl, hh, ultrafeedback or kto. "
        "Default: detected from the rows."),
    eval_data: Path | None = typer.Option(
        None, "--eval-data",
        help="Held-out preferences of the same kind: eval loss and implicit-reward accuracy "
        "in summary.json."),
    eval_fraction: float | None = EVAL_FRACTION,
    eval_every: int | None = EVAL_EVERY,
    early_stopping_patience: int | None = EARLY_STOPPING_PATIENCE,
    epochs: int | None = typer.Option(
        None, "--epochs", help="Passes over the data (ignored with --max-steps). Default 1."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Optimizer steps to take (overrides --epochs)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size",
        help="Pairs (KTO: rows) per optimizer step, all micro-batches together. Default 8."),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum",
        help="Micro-batches per step (must divide --batch-size); same result, less memory."),
    lr: float | None = typer.Option(None, "--lr", help="Peak AdamW learning rate. Default 1e-6."),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", help="Linear warm-up steps. Default 0."),
    schedule: str | None = typer.Option(
        None, "--schedule", help="After warm-up: linear (decay to 0) or constant."),
    max_length: int | None = typer.Option(
        None, "--max-length",
        help="Longest prompt + answer in tokens; longer answers are cut. Default 512."),
    max_prompt_length: int | None = typer.Option(
        None, "--max-prompt-length", help="Longest prompt in tokens (cut from the left)."),
    lora_r: int | None = typer.Option(
        None, "--lora-r", help="Train LoRA adapters of this rank instead of all weights."),
    lora_alpha: int | None = typer.Option(
        None, "--lora-alpha", help="LoRA scale alpha. Default 32."),
    merge_lora: bool = typer.Option(
        False, "--merge-lora", help="Save a merged plain model instead of the adapter."),
    save_every: int | None = typer.Option(
        None, "--save-every", help="Checkpoint every N steps (0: none). Default 0."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="auto, float32, bfloat16 or float16. Default auto."),
    device: str | None = typer.Option(
        None, "--device", help="auto, cpu, cuda or cuda:N. Default auto."),
    add_pad_token: bool = typer.Option(
        False, "--add-pad-token",
        help="Add a new pad token when the tokenizer has none or pads with EOS."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest complete checkpoint in --out."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Delete an existing run in --out first."),
    seed: int | None = SEED,
    chat_template: Path | None = CHAT_TEMPLATE,
    report_to: list[str] | None = REPORT_TO,
    strategy: str | None = STRATEGY,
    precision: str | None = PRECISION,
    gradient_checkpointing: bool = GRADIENT_CHECKPOINTING,
    dist_timeout: int | None = DIST_TIMEOUT,
    nproc: int | None = NPROC,
    config: Path | None = CONFIG,
) -> None:
    """Optimise a policy directly on preferences (no reward model): DPO and its variants."""
    from rewardloop.cli._common import existing_data
    from rewardloop.config import load_config
    from rewardloop.train.dpo import DPOConfig, train_dpo

    existing_data(data)
    if eval_data is not None:
        existing_data(eval_data)
    cfg = load_config(
        DPOConfig, config, model=model, data=data, out=out, loss=loss, beta=beta,
        label_smoothing=label_smoothing, length_normalize=length_normalize, nll_coef=nll_coef,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        ref_model=ref_model,
        precompute_ref=None if ref_on_the_fly is None else not ref_on_the_fly,
        data_format=data_format, eval_data=eval_data, seed=seed, epochs=epochs,
        max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, schedule=schedule, max_length=max_length,
        max_prompt_length=max_prompt_length, lora_r=lora_r, lora_alpha=lora_alpha,
        merge_lora=merge_lora or None, save_every=save_every, dtype=dtype, device=device,
        add_pad_token=add_pad_token or None, resume=resume or None,
        overwrite=overwrite or None, chat_template=chat_template,
        report_to=trackers(report_to),
        **runtime_flags(strategy, precision, gradient_checkpointing, dist_timeout, nproc),
        **best_point_flags(eval_fraction, eval_every, early_stopping_patience),
    )
    summary = train_dpo(cfg)
    line = f"trained {summary['steps']} steps ({cfg.loss}) in {summary['wall_s']:.1f}s"
    if "eval_accuracy" in summary:
        line += f"; eval_loss {summary['eval_loss']:.4f}, eval_accuracy " \
                f"{summary['eval_accuracy']:.3f}"
    if "best_step" in summary:
        line += f"; best step {summary['best_step']} (eval_loss " \
                f"{summary['best_eval_loss']:.4f}, saved as the model)"
    typer.echo(f"{line}; model in {cfg.out / 'model'}")
