"""``rewardloop train rm``: a reward model from pairwise or ranking preferences."""

from __future__ import annotations

from pathlib import Path

import typer

from rewardloop.cli._best_point import (
    EARLY_STOPPING_PATIENCE,
    EVAL_EVERY,
    EVAL_FRACTION,
    best_point_flags,
)
from rewardloop.cli._common import (
    CHAT_TEMPLATE,
    CONFIG,
    DB,
    OUT,
    REPORT_TO,
    SEED,
    trackers,
)
from rewardloop.cli._launch import (
    DIST_TIMEOUT,
    GRADIENT_CHECKPOINTING,
    NPROC,
    PRECISION,
    STRATEGY,
    runtime_flags,
)
from rewardloop.cli._train_group import train_app
from rewardloop.cli.train_sft import (
    ADD_PAD,
    DEVICE,
    DTYPE,
    EPOCHS,
    EVAL_BATCH,
    EVAL_DATA,
    GRAD_ACCUM,
    LOG_EVERY,
    LORA_ALPHA,
    LORA_R,
    MAX_GRAD_NORM,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    MAX_STEPS,
    MERGE_LORA,
    MODEL,
    OVERWRITE,
    REMOTE_CODE,
    RESUME,
    SAVE_STEPS,
    SCHEDULE,
    WARMUP,
    WEIGHT_DECAY,
    flag,
    show_summary,
)

ORDER = 42


def register(app: typer.Typer) -> None:
    train_app.command("rm")(rm)


def rm(
    model: str = MODEL,
    data: Path = typer.Option(..., "--data", help="Training preferences (JSONL, Parquet, "
                              "Arrow or a dataset folder, DIR:SPLIT for a split): pairwise rows "
                              "(prompt, chosen, rejected; hh and ultrafeedback are converted) "
                              "or ranking rows."),
    out: Path = OUT,
    eval_data: Path | None = EVAL_DATA,
    eval_fraction: float | None = EVAL_FRACTION,
    eval_every: int | None = EVAL_EVERY,
    early_stopping_patience: int | None = EARLY_STOPPING_PATIENCE,
    data_format: str | None = typer.Option(None, "--format", help="trl, hh, ultrafeedback or "
                                           "ranking. Default: detected from the rows."),
    use_margin: bool = typer.Option(False, "--use-margin", help="Bradley-Terry with the rows' "
                                    "margin field: chosen must win by at least that."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help="Target "
                                                 "probability of chosen winning is 1 - this. "
                                                 "Default 0."),
    center_rewards_coef: float | None = typer.Option(None, "--center-rewards-coef", help="Weight "
                                                     "of the loss keeping rewards centred on 0 "
                                                     "(0.01 is typical). Default 0."),
    ensemble: int | None = typer.Option(None, "--ensemble", help="K reward heads on one shared "
                                        "trunk: mean reward and its std (uncertainty). "
                                        "Default 1."),
    weighting: str | None = typer.Option(None, "--weighting", help="none, or reliability: "
                                         "weigh each comparison by its annotator's reliability "
                                         "(from --db or --annotator-weights)."),
    exclude_flagged: bool = typer.Option(False, "--exclude-flagged", help="Drop judgments of "
                                         "annotators flagged by the quality checks (needs --db)."),
    db: str | None = DB,
    annotator_weights: Path | None = typer.Option(None, "--annotator-weights", help="JSON "
                                                  "{annotator: weight} for --weighting "
                                                  "reliability, instead of the store."),
    annotator_groups: Path | None = typer.Option(None, "--annotator-groups", help="JSON "
                                                 "{annotator: [group, ...]} for per-group eval "
                                                 "accuracy (added to the store's groups)."),
    seed: int | None = SEED,
    epochs: int | None = EPOCHS,
    max_steps: int | None = MAX_STEPS,
    batch_size: int | None = typer.Option(None, "--batch-size", help="Comparisons (pairs or "
                                          "rankings) per optimizer step. Default 16."),
    grad_accum: int | None = GRAD_ACCUM,
    lr: float | None = typer.Option(None, "--lr", help="Peak AdamW learning rate. Default 1e-4."),
    weight_decay: float | None = WEIGHT_DECAY,
    warmup_steps: int | None = WARMUP,
    schedule: str | None = SCHEDULE,
    max_grad_norm: float | None = MAX_GRAD_NORM,
    max_length: int | None = MAX_LENGTH,
    max_prompt_length: int | None = MAX_PROMPT_LENGTH,
    eval_batch_size: int | None = EVAL_BATCH,
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
    """Train a reward model (Bradley-Terry on pairs, Plackett-Luce on rankings)."""
    from rewardloop.cli._common import existing_data, existing_file
    from rewardloop.config import load_config
    from rewardloop.feedback.quality import annotators_from_db
    from rewardloop.train.reward import RewardConfig, train_rm

    cfg = load_config(
        RewardConfig, config, model=model, data=data, out=out, eval_data=eval_data,
        data_format=data_format, use_margin=flag(use_margin), label_smoothing=label_smoothing,
        center_rewards_coef=center_rewards_coef, ensemble=ensemble, weighting=weighting,
        exclude_flagged=flag(exclude_flagged), db=db, annotator_weights=annotator_weights,
        annotator_groups=annotator_groups, seed=seed, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, schedule=schedule, max_grad_norm=max_grad_norm,
        max_length=max_length, max_prompt_length=max_prompt_length,
        eval_batch_size=eval_batch_size, lora_r=lora_r, lora_alpha=lora_alpha,
        merge_lora=flag(merge_lora), dtype=dtype, device=device, save_every=save_every,
        log_every=log_every, resume=flag(resume), overwrite=flag(overwrite),
        add_pad_token=flag(add_pad_token), trust_remote_code=flag(trust_remote_code),
        chat_template=chat_template, report_to=trackers(report_to),
        **runtime_flags(strategy, precision, gradient_checkpointing, dist_timeout, nproc),
        **best_point_flags(eval_fraction, eval_every, early_stopping_patience),
    )
    for path in (cfg.data, cfg.eval_data):
        if path is not None:
            existing_data(path)
    for path in (cfg.annotator_weights, cfg.annotator_groups):
        if path is not None:
            existing_file(path)
    stored = (annotators_from_db(cfg.db, weights=cfg.weighting == "reliability",
                                 flagged=cfg.exclude_flagged) if cfg.db is not None else None)
    summary = train_rm(cfg, stored)
    show_summary(summary, cfg.out, ("steps", "samples_per_s", "eval_accuracy", "eval_loss",
                                    "eval_ece", "length_correlation", "best_step",
                                    "best_eval_accuracy", "best_eval_loss", "label_ceiling"))
