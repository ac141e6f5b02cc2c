"""The options of ``rewardloop eval`` (no torch, no store: the CLI reads them at start-up to
make its flags)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rewardloop.engines.options import EngineOptions


@dataclass(frozen=True, kw_only=True)
class EvalConfig(EngineOptions):
    """Options of ``rewardloop eval``."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "policy": ("--policy", "--model"), "judges": "--judge", "n": ("-n", "--n")}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    policy: str
    """The policy to evaluate: a model directory (e.g. a run's model/) or a hub id."""
    baseline: str
    """The policy to compare against (e.g. the SFT model); must share the tokenizer for KL."""
    prompts: Path
    """Prompts file (JSONL, ``prompt`` or ``messages`` per line)."""
    out: Path
    """Directory to write eval.json and samples.jsonl to."""
    judges: tuple[str, ...] = ()
    """Judges: a reward-model run dir (or its model/),
    ``package.module:function`` (TRL's reward signature), or ``human`` (arena tasks in --db for
    ``rewardloop serve``). The first gives the headline win rate."""
    n: int | None = None
    """Use only the first n prompts; None = all."""
    max_new_tokens: int = 64
    """Longest answer in tokens."""
    temperature: float = 1.0
    """Sampling temperature of both policies (and of the KL's log-probs)."""
    max_prompt_length: int = 512
    """Prompts longer than this (tokens) keep their last tokens."""
    batch_size: int = 32
    """Prompts per generation / scoring batch."""
    seed: int = 0
    """Seed of sampling (the same for both policies)."""
    tie_eps: float = 0.0
    """Judge scores closer than this count as a tie."""
    n_boot: int = 1000
    """Bootstrap resamples for the win-rate interval."""
    db: str | None = None
    """Store URL for the ``human`` judge's arena tasks (default: $REWARDLOOP_DB or
    sqlite:///rewardloop.db)."""
    arena_batch: str = "eval-arena"
    """Batch name of the arena tasks (``human`` judge)."""
    arena_overlap: int = 1
    """Annotators per arena task."""
    policy_name: str = "policy"
    """Name of the policy in the arena and the report."""
    baseline_name: str = "baseline"
    """Name of the baseline in the arena and the report."""
    device: str = "auto"
    """auto, cpu or cuda."""
    chat_template: Path | None = None
    """Jinja chat-template file for both policies' tokenizers (for chat prompts when they have
    none)."""

    def __post_init__(self) -> None:
        EngineOptions.of(self)  # validates the generator options
        if not self.judges:
            raise ValueError("give at least one judge (--judge): a reward-model dir, "
                             "package.module:function, or human")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be at least 1")
        for name in ("max_new_tokens", "max_prompt_length", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.tie_eps < 0:
            raise ValueError(f"tie_eps must be >= 0, got {self.tie_eps}")
        if self.arena_overlap < 1:
            raise ValueError("arena_overlap must be at least 1")
        if self.policy_name == self.baseline_name:
            raise ValueError("policy_name and baseline_name must differ")
