"""What a training run writes in its ``--out`` directory, and so what ``--overwrite`` may
delete there: a run's own entries (:data:`RUN_ENTRIES`), never a directory that holds anything
else, never an input of the run. Used by ``train.run.RunDir``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from rewardloop.train.checkpoint import list_checkpoints
from rewardloop.util.files import TMP_PREFIX

RUN_ENTRIES = frozenset({
    "config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "model",
    "value_model",  # PPO's critic (train/ppo.py)
    "samples.jsonl",  # online RL's sampled completions (train/grpo.py)
    "ref_logps.pt",  # DPO's cached reference log-probs (train/dpo.py REF_CACHE)
    "tensorboard", "wandb",  # experiment trackers (rewardloop.tracking)
})
"""What a run writes at the top of its directory (besides ``.tmp-*`` leftovers of atomic
writes). A directory holding anything else is not a run, and --overwrite never deletes it."""

RECORDS = ("metrics.jsonl", "samples.jsonl", "summary.json", "model", "value_model")
"""What a run has made once it trained; without them (and without a complete checkpoint) it
holds nothing to lose, and a new run may take its place without --overwrite."""


def _is_run_entry(path: Path) -> bool:
    return path.name in RUN_ENTRIES or path.name.startswith(TMP_PREFIX)


def foreign_entries(out: Path) -> list[str]:
    """Entries of ``out`` that no run writes (``checkpoints/`` holds only ``step-N``)."""
    names = [p.name for p in out.iterdir() if not _is_run_entry(p)]
    if (out / "checkpoints").is_dir():
        names += [f"checkpoints/{p.name}" for p in (out / "checkpoints").iterdir()
                  if not re.fullmatch(r"(\.tmp-)?step-\d+", p.name)]
    return sorted(names)


def is_run(out: Path) -> bool:
    """Whether ``out`` holds a run: its ``config.yaml`` (written first) and ``checkpoints/``
    or a record of training (a finished run whose checkpoints were deleted to save space)."""
    return (out / "config.yaml").is_file() and (
        (out / "checkpoints").is_dir() or any((out / name).exists() for name in RECORDS))


def has_trained(out: Path) -> bool:
    return bool(list_checkpoints(out)) or any(
        (out / name).is_dir() or (out / name).is_file() and (out / name).stat().st_size > 0
        for name in RECORDS)


def paths_in(value: Any) -> list[str]:
    """The strings of a config value that may name files (a reward spec without ``@WEIGHT``)."""
    items = value if isinstance(value, list) else [value]
    return [s for x in items if isinstance(x, str) for s in {x, x.rsplit("@", 1)[0]}]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def clear_run(out: Path) -> None:
    """Delete the entries of the run in ``out`` that are a run's own: the summary first,
    ``config.yaml`` and ``checkpoints/`` (what marks a run) last and only emptied, so that a
    crash part-way leaves a run that --overwrite still recognises."""
    entries = sorted((p for p in out.iterdir() if _is_run_entry(p)),
                     key=lambda p: p.name != "summary.json")
    for path in entries:
        if path.name not in ("config.yaml", "checkpoints"):
            _remove(path)
    if (out / "checkpoints").is_dir():
        for path in (out / "checkpoints").iterdir():
            _remove(path)
