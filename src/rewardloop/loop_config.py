"""The options of ``rewardloop loop`` and the layout of its work directory: ``round-N/<stage>/``,
the ``DONE.json`` marker that makes a stage resumable, and ``loop_status`` that reads them back.

Apart from ``loop.py`` (which runs the rounds) so that ``loop_stages.py`` can read the config
without importing the module that imports it, and so that ``rewardloop loop status`` starts
without importing the stages (the store, the evaluators).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rewardloop.config import check_fields
from rewardloop.engines.factory import EngineOptions
from rewardloop.errors import UserError
from rewardloop.options import check_finite
from rewardloop.tracking import check_report_to
from rewardloop.util.files import WORKDIR_MARKER, atomic_write_text

log = logging.getLogger(__name__)

STAGES = ("generate", "tasks", "feedback", "rm", "policy", "eval")
"""The stages of a round, in order (``loop.STAGE_TABLE`` maps each to its function)."""
ALGORITHMS = ("grpo", "rloo", "ppo", "dpo")
SELECTIONS = ("random",)
MARKER = "DONE.json"
CONFIG_FILE = "config.yaml"
"""The resolved config a loop writes into its work directory when it starts: `rewardloop loop
--config WORKDIR/config.yaml` resumes the run as it was started (flags included)."""
RM_BEST_POINT = {"eval_fraction": 0.15, "eval_every": 10, "early_stopping_patience": 5}
"""The reward model's held-out share (of the rows, by prompt) and best point; rm_options win."""


@dataclass(frozen=True)
class LoopConfig:
    """Options of ``rewardloop loop`` (a YAML file; see examples/loop.yaml and docs/loop.md)."""

    policy: str
    """The starting policy (e.g. an SFT run's model/); round N+1 starts from round N's."""
    prompts: Path
    """Prompt pool (JSONL): each round draws its prompts from it, and RL trains on it."""
    workdir: Path = Path("loop-run")
    """Directory of the run: round-N/<stage>/, summary.json, best.json."""
    rounds: int = 2
    """Number of rounds."""
    prompts_per_round: int = 32
    """Prompts drawn per round to collect feedback on."""
    responses_per_prompt: int = 2
    """Answers sampled per prompt; every pair of distinct answers becomes a task."""
    selection: str = "random"
    """How prompts are picked for feedback: random."""
    overlap: int = 1
    """Annotators per task."""
    for_groups: str | None = None
    """Aim each round's new tasks at the annotator groups that fall behind in the store (such a
    task is handed only to its group's annotators), as ``generate --for-groups``: fewest
    (judgments, with open aimed tasks) or uncertain (judgments weighed by the group's own
    agreement; needs overlap >= 2). Until the store holds a judgment nobody is behind, so a new
    loop's first round is for everyone. None = every task for everyone. See docs/groups.md."""
    db: str | None = None
    """Store URL; None = sqlite:///WORKDIR/loop.db."""
    batch_prefix: str = ""
    """Put before the loop's batch names (round-N, arena-round-N) in the store: loops that share
    one ``db`` need one each (e.g. "exp-a/"); a loop refuses a round-N batch holding another
    loop's tasks."""
    pool: Path | None = None
    """Simulated annotator pool YAML (docs/quality.md); None waits for people instead."""
    gold: str | None = None
    """Hidden gold judge package.module:function (floats): evaluation and RL monitoring."""
    pool_gold: str | None = None
    """What the pool judges by (floats or dicts of named components); None = gold."""
    min_judgments: int | None = None
    """Judgments to wait for per round; None = tasks x overlap."""
    wait_timeout_s: float = 3600.0
    """Longest wait for people's judgments in one round before stopping with a message."""
    poll_s: float = 10.0
    """Seconds between looks at the store while waiting."""
    exclude_flagged: bool = True
    """Leave out judgments of annotators the quality checks flag (spam, bias)."""
    algorithm: str = "grpo"
    """Policy optimisation: grpo, rloo, ppo (against the reward model) or dpo (online DPO on
    pairs of the round's answers labelled by the reward model)."""
    rm_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keys of the reward-model trainer's config (train rm), e.g. {max_steps: 50}."""
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    """Extra keys of the policy trainer's config (train grpo/ppo/dpo), e.g. {lr: 1e-5}."""
    generation: Mapping[str, Any] = field(default_factory=dict)
    """Generation engine of every stage that samples (candidates, RL, evaluation): keys of
    ``engines.EngineOptions``, e.g. {generator: vllm, vllm_gpu_memory_utilization: 0.4}."""
    eval_prompts: Path | None = None
    """Held-out prompts for evaluation; None = the prompt pool."""
    eval_n: int = 64
    """Prompts evaluated per round."""
    arena: bool = False
    """Also run a human arena each round (round's policy vs the starting one), judged by the
    simulated pool."""
    max_new_tokens: int = 48
    """Longest answer in tokens (generation, RL and evaluation)."""
    temperature: float = 1.0
    """Sampling temperature (generation, RL and evaluation)."""
    max_kl: float | None = None
    """Alarm when the KL per sequence to the reference exceeds this; None = off."""
    max_length_ratio: float | None = 2.0
    """Alarm when mean answer length exceeds this times the start's; None = off."""
    alarm_window: int = 5
    """Steps averaged on each side when comparing proxy and gold reward trends (each change
    must also exceed two standard errors of the step noise)."""
    seed: int = 0
    """Seed of prompt selection, sampling, simulation and training."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers every trainer of the loop also reports to: tensorboard, wandb,
    mlflow, trackio (one tracker run per trainer run)."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.rounds < 1 or self.prompts_per_round < 1 or self.overlap < 1:
            raise ValueError("rounds, prompts_per_round and overlap must be at least 1")
        if self.responses_per_prompt < 2:
            raise ValueError("responses_per_prompt must be at least 2 (tasks compare answers)")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}")
        self._check_for_groups()
        if self.pool is not None and not (self.pool_gold or self.gold):
            raise ValueError("a simulated pool needs gold (or pool_gold) to judge by")
        if self.arena and self.pool is None:
            raise ValueError("arena: true needs a simulated pool (people judge arenas through "
                             "`rewardloop eval --judge human`)")
        if self.min_judgments is not None and self.min_judgments < 1:
            raise ValueError("min_judgments must be at least 1")
        self._check_ranges()
        check_report_to(self.report_to)  # before a round runs, not at its first trainer
        try:
            self._check_trainers()
        except UserError as exc:  # a ValueError, as every check here
            raise ValueError(str(exc)) from None

    def _check_ranges(self) -> None:
        """The ranges of the waiting, sampling and alarm settings."""
        if self.wait_timeout_s <= 0 or self.poll_s <= 0 or self.eval_n < 1:
            raise ValueError("wait_timeout_s, poll_s and eval_n must be > 0")
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError("max_new_tokens must be >= 1 and temperature > 0")
        if (self.max_kl is not None and self.max_kl <= 0) or self.alarm_window < 1:
            raise ValueError("max_kl must be > 0 (or null: off) and alarm_window at least 1")
        if self.max_length_ratio is not None and self.max_length_ratio <= 1:
            raise ValueError("max_length_ratio must be > 1 (a multiple of the first step's "
                             "length; or null: off)")

    def _check_trainers(self) -> None:
        """Check ``generation``, ``rm_options`` and ``policy_options`` now, by building the
        round's trainer configs with stand-in paths: a mistake there must stop the loop before
        its first round, not at the rm stage after an hour of waiting for judgments. The
        checked options (numbers as numbers) replace the given ones."""
        for name in ("rm_options", "policy_options", "generation"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a mapping of config keys")
        # Not at import: the online trainers' checks load torch.
        from rewardloop.train.configs import RewardConfig

        for name, cls in (("generation", EngineOptions), ("rm_options", RewardConfig),
                          ("policy_options", self.policy_class())):
            object.__setattr__(self, name, check_fields(cls, getattr(self, name), name))
        self.engine()
        if self.algorithm == "dpo":
            self._check_online_dpo_options()
        stand_in = round_dir(self.workdir, 1)
        self.rm_config(model=self.policy, data=stand_in / "rm" / "data" / "pairs.jsonl",
                       out=stand_in / "rm")
        if self.algorithm == "dpo":
            self.policy_config(model=self.policy, data=stand_in / "dpo_pairs.jsonl",
                               out=stand_in / "policy")
        else:
            self.policy_config(policy=self.policy, rewards=(str(stand_in / "rm"),),
                               out=stand_in / "policy")

    def _check_online_dpo_options(self) -> None:
        """The loop's DPO pairs are the reward model's best and worst candidates: no annotator
        judged them, so the options about annotators belong to rm_options."""
        from rewardloop.options import AnnotatorOptions

        named = sorted(set(self.policy_options) & {f.name for f in dataclasses.fields(
            AnnotatorOptions)})
        if named:
            raise ValueError(f"policy_options {named}: the loop's DPO pairs are ranked by the "
                             "reward model, not judged by annotators; put annotator options in "
                             "rm_options")

    def policy_class(self) -> type:
        """The config class of the policy trainer of ``algorithm``."""
        from rewardloop.train.configs import DPOConfig, GRPOConfig, PPOConfig

        return {"dpo": DPOConfig, "ppo": PPOConfig}.get(self.algorithm, GRPOConfig)

    def rm_config(self, **fixed: Any) -> Any:
        """A round's reward-model trainer config: ``fixed`` (model, data, out, seed, ...), the
        loop's store and held-out share, then ``rm_options``, which win (UserError)."""
        from rewardloop.train.configs import RewardConfig

        loop = {"exclude_flagged": self.exclude_flagged, "db": self.db_url, "max_length": 512,
                "report_to": self.report_to, "seed": self.seed}
        return _built(RewardConfig, {**loop, **RM_BEST_POINT, **fixed, **self.rm_options},
                      "rm_options")

    def policy_config(self, **fixed: Any) -> Any:
        """A round's policy trainer config (``algorithm``): ``fixed`` (model or policy and
        rewards, data, out, seed, ...), the loop's sampling settings and ``generation``, then
        ``policy_options``, which win (UserError)."""
        loop: dict[str, Any] = {"report_to": self.report_to, "seed": self.seed}
        if self.algorithm != "dpo":
            loop |= {"prompts": self.prompts, "gold": self.gold,
                     "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                     **dataclasses.asdict(self.engine())}
        if self.algorithm in ("grpo", "rloo"):
            loop["advantage"] = self.algorithm
        return _built(self.policy_class(), {**loop, **fixed, **self.policy_options},
                      "policy_options")

    def _check_for_groups(self) -> None:
        if self.for_groups is None:
            return
        from rewardloop.feedback.audience import AIMS  # the store's modules: not at start-up

        if self.for_groups not in AIMS:
            raise ValueError(f"for_groups must be one of {list(AIMS)}, got {self.for_groups!r}")
        if self.for_groups == "uncertain" and self.overlap < 2:
            raise ValueError("for_groups: uncertain weighs judgments by each group's agreement "
                             "with itself, measured on tasks two annotators judged: it needs "
                             "overlap >= 2")

    def engine(self) -> EngineOptions:
        """The generation engine options (``generation``), validated (UserError)."""
        return _built(EngineOptions, self.generation, "generation")

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.workdir / 'loop.db'}"


def _built(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)``, its mistakes (unknown keys, wrong types, values out of range) a
    UserError naming ``where`` and the key."""
    checked = check_fields(cls, values, where)
    try:
        return cls(**checked)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None


"""Written into a work directory the loop (or the demo) created: only such a directory, a new
or an empty one is written into, so a ``--workdir`` typed at a project folder does not replace
the files there (its config.yaml, summary.json, report.html)."""


def claim_workdir(workdir: Path, kind: str) -> None:
    """Make ``workdir`` the work directory of a ``kind`` run ("loop", "demo"): create it, or
    continue in one that a loop or the demo made; a UserError for any other non-empty one.
    (Work directories of earlier versions, without the marker, are known by their
    ``round-1/`` and their config.yaml naming a policy.)"""
    marker = workdir / WORKDIR_MARKER
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file() \
            and not _made_by_a_loop(workdir):
        entries = sorted(p.name for p in workdir.iterdir())
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"--workdir {workdir} is not empty and is not a rewardloop work "
                        f"directory (it holds {shown}); choose a new or empty directory")
    workdir.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        atomic_write_text(marker, json.dumps({"kind": kind}) + "\n")


def _made_by_a_loop(workdir: Path) -> bool:
    import yaml  # only for directories of earlier versions

    try:
        config = yaml.safe_load((workdir / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return (workdir / "round-1").is_dir() and isinstance(config, dict) and "policy" in config


def resume_command(workdir: Path) -> str:
    """The command that resumes the loop in ``workdir`` (its resolved ``CONFIG_FILE``)."""
    return f"rewardloop loop --config {shlex.quote(str(Path(workdir) / CONFIG_FILE))}"


def round_dir(workdir: Path, n: int) -> Path:
    return Path(workdir) / f"round-{n}"


def read_marker(stage_dir: Path) -> dict[str, Any] | None:
    """The figures of a finished stage, or None when it has not finished."""
    path = stage_dir / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # cannot happen with atomic writes; treat as unfinished


def run_stage(stage_dir: Path, name: str, fn: Callable[[Path], Mapping[str, Any]]
              ) -> dict[str, Any]:
    """Run ``fn(stage_dir)`` unless the stage's marker exists; write the marker last."""
    done = read_marker(stage_dir)
    if done is not None:
        log.info("%s: done already, skipped", stage_dir)
        return dict(done.get("figures", {}))
    stage_dir.mkdir(parents=True, exist_ok=True)
    log.info("%s: running %s", stage_dir, name)
    figures = dict(fn(stage_dir))
    marker = {"stage": name, "finished_at": dt.datetime.now(dt.UTC).isoformat(),
              "figures": figures}
    atomic_write_text(stage_dir / MARKER, json.dumps(marker, indent=2) + "\n")
    return figures


def loop_status(workdir: Path) -> list[dict[str, Any]]:
    """Each round's stages: ``{"round": N, "stages": {stage: state}, "figures": {...}}`` where a
    state is done, partial (started, no marker) or pending."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: no such directory")
    rounds = sorted((int(p.name.split("-", 1)[1]), p) for p in workdir.glob("round-*")
                    if p.name.split("-", 1)[1].isdigit())
    out = []
    for n, path in rounds:
        states, figures = {}, {}
        for stage in STAGES:
            marker = read_marker(path / stage)
            if marker is not None:
                states[stage] = "done"
                figures[stage] = marker.get("figures", {})
            else:
                states[stage] = "partial" if (path / stage).exists() else "pending"
        out.append({"round": n, "stages": states, "figures": figures})
    return out
