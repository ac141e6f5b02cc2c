"""Model cards: the ``README.md`` of every saved model directory.

A model directory travels on its own (copied, pushed to the Hub), away from the run directory
that explains it, so it carries its own account: base model, data, method, key
hyper-parameters, final metrics and the command line that produced it. ``models.save_model``
writes the card when it saves (base model and command); the run's summary completes it
(``train.run.RunDir.write_summary``). The front matter is the Hugging Face model-card metadata.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD = "README.md"
# Config keys that name what a model was trained on (files, reward specs, reference models).
DATA_KEYS = ("data", "eval_data", "prompts", "rewards", "gold", "ref_model", "value_model",
             "db")
# Config keys worth reading first; a config shows those it has, in this order.
KEY_HYPERPARAMETERS = (
    "loss", "advantage", "beta", "lr", "value_lr", "batch_size", "mini_batch_size", "grad_accum",
    "epochs", "max_steps", "ppo_epochs", "num_generations", "kl_coef", "kl_estimator", "kl_in",
    "kl_target", "clip_eps", "entropy_coef", "temperature", "max_new_tokens", "max_length",
    "max_prompt_length", "warmup_steps", "schedule", "weight_decay", "max_grad_norm",
    "label_smoothing", "ensemble", "weighting", "loss_aggregation", "lora_r", "lora_alpha",
    "packing", "train_on_prompt", "dtype", "seed",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CardInfo:
    """What a card says; empty parts are left out of it."""

    base_model: str | None
    """The model training started from (a local path or a hub id)."""
    command: str
    """The command line that produced the model."""
    method: str | None = None
    """The training command: "sft", "rm", "dpo", "grpo" or "ppo"."""
    data: Mapping[str, Any] = field(default_factory=dict)
    """Config entries naming the training data (DATA_KEYS)."""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """Key hyper-parameters (KEY_HYPERPARAMETERS that the config has)."""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    """Final figures (the run's summary.json)."""


def command_line(argv: Sequence[str] | None = None) -> str:
    """This process's command line, quoted for a shell, with the entry point as `rewardloop`."""
    args = list(sys.argv if argv is None else argv)
    if args and (Path(args[0]).name == "rewardloop"
                 or Path(args[0]).parent.name == "rewardloop"):  # python -m rewardloop
        args[0] = "rewardloop"
    return shlex.join(args)


def info_from_run(config: Mapping[str, Any], config_type: str, metrics: Mapping[str, Any]
                  ) -> CardInfo:
    """A card from a run's resolved config (``config_type`` is its class name, e.g.
    ``DPOConfig``) and its summary."""
    method = config_type.removesuffix("Config").lower() or None
    method = {"reward": "rm"}.get(method or "", method)  # RewardConfig is `train rm`
    return CardInfo(
        base_model=config.get("model") or config.get("policy"),
        command=command_line(),
        method=method,
        data={k: config[k] for k in DATA_KEYS if config.get(k) not in (None, [], ())},
        hyperparameters={k: config[k] for k in KEY_HYPERPARAMETERS if config.get(k) is not None},
        metrics=metrics,
    )


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _table(rows: Mapping[str, Any], head: tuple[str, str]) -> list[str]:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| `{k}` | {_shown(v).replace('|', '/')} |" for k, v in rows.items()]
    return lines + [""]


def render(info: CardInfo, title: str) -> str:
    """The card as Markdown with Hugging Face metadata front matter."""
    front = ["---", "library_name: transformers", "tags:", "- rewardloop"]
    if info.method:
        front.append(f"- {info.method.split()[0]}")
    if info.base_model and _HUB_ID.match(info.base_model) and not Path(info.base_model).exists():
        front.append(f"base_model: {info.base_model}")
    lines = [*front, "---", "", f"# {title}", ""]
    lines.append(f"Trained with rewardloop{f' `train {info.method}`' if info.method else ''}.")
    lines.append("")
    if info.base_model:
        lines += [f"- **Base model:** `{info.base_model}`"]
    if info.method:
        lines += [f"- **Method:** {info.method}"]
    for key, value in info.data.items():
        lines += [f"- **{key.replace('_', ' ').capitalize()}:** `{_shown(value)}`"]
    lines.append("")
    if info.hyperparameters:
        lines += ["## Key hyper-parameters", "", *_table(info.hyperparameters,
                                                         ("parameter", "value"))]
    numbers = {k: v for k, v in info.metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    if numbers:
        lines += ["## Final metrics", "", *_table(numbers, ("metric", "value"))]
    lines += ["## Command", "", "```sh", info.command, "```", ""]
    return "\n".join(lines)


def write_model_card(model_dir: Path | str, info: CardInfo) -> Path:
    """Write ``model_dir/README.md`` (replacing peft's or an earlier card)."""
    path = Path(model_dir) / CARD
    title = Path(model_dir).resolve().parent.name + "/" + Path(model_dir).name
    path.write_text(render(info, title), encoding="utf-8")
    return path
