"""``rewardloop generate``: sample K answers per prompt, write candidates, and (with --db) create
the comparison tasks a label budget buys, chosen at random or by reward-model uncertainty, and
with --for-groups aimed at the annotator groups that fall behind (``feedback.audience``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import typer

from rewardloop.cli._common import existing_data, input_file, resolve_db
from rewardloop.cli._flags import config_command
from rewardloop.cli._ray import batch_module
from rewardloop.engines.options import EngineOptions
from rewardloop.options import RayJobOptions
from rewardloop.util.files import check_output_file

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from rewardloop.data.records import CandidatesRecord, RankingRecord
    from rewardloop.feedback.select import Origin, Plan, SelectionConfig

ORDER = 11


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(EngineOptions, RayJobOptions):
    """Options of ``rewardloop generate``."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "policy": ("--policy", "--model"), "n": "-n"}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""
    policy: str
    """Policy to sample from: a model directory (or a train run directory's model/) or a hub
    id."""
    prompts: Path
    """Prompts (JSONL, Parquet, Arrow or a dataset folder): ``prompt`` (text or chat) or
    ``messages`` per row."""
    n: int = 4
    """Answers sampled per prompt (>= 2: tasks compare answers)."""
    out: Path | None = None
    """Candidates JSONL to write (prompt, responses, models = policy name@version)."""
    db: str | None = None
    """Store URL (sqlite:///FILE or postgresql+psycopg://...) to create the tasks in;
    --select, --budget, --gold and --batch apply only then."""
    select: str | None = None
    """With --db, which pairs become tasks: random or uncertainty (ensemble disagreement);
    None = random."""
    rm: Path | None = None
    """Ensemble reward model (``train rm --ensemble K``) for uncertainty selection."""
    for_groups: str | None = None
    """With --db, aim the selected tasks at the annotator groups that fall behind in the store
    (they are handed only to that group's annotators): fewest (judgments, with open aimed
    tasks) or uncertain (judgments weighed by the group's own agreement, 2a - 1); overlap and
    gold tasks stay for everyone. None = every task for everyone. See docs/groups.md."""
    measure: str = "bald"
    """Disagreement of the ensemble on a pair: bald (mutual information) or std (of the
    reward gap)."""
    budget: int | None = None
    """Labels (judgments) to spend; an overlap or gold task costs --overlap labels. None:
    one per candidate pair."""
    batch: str | None = None
    """Batch name for the tasks; None = generate-<prompts file stem>."""
    overlap_share: float = 0.1
    """Share of the non-gold tasks given to --overlap annotators."""
    overlap: int = 3
    """Annotators per overlap item and per gold item."""
    gold: Path | None = None
    """Gold rows JSONL (prompt, responses, ranking best first) to interleave as known-answer
    items."""
    gold_rate: float = 0.05
    """Share of all tasks that are gold items (when --gold is given)."""
    max_new_tokens: int = 64
    """Longest answer in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_prompt_length: int = 512
    """Longest prompt in tokens (cut from the left)."""
    batch_size: int = 8
    """Prompts sampled together."""
    seed: int = 0
    """Seed for sampling and selection."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    chat_template: Path | None = None
    """Jinja chat-template file for the policy's tokenizer (chat prompts need one)."""

    def __post_init__(self) -> None:
        from rewardloop.feedback.audience import AIMS
        from rewardloop.rollout import SamplingSettings

        EngineOptions.of(self)  # validates the generator options
        self.check_ray_job()
        if self.ray and self.out is None:
            raise ValueError("--ray needs --out FILE (its finished batches are saved beside it, "
                             "so that an interrupted job resumes)")
        if self.n < 2:
            raise ValueError(f"-n must be at least 2 (tasks compare answers), got {self.n}")
        if self.out is None and self.db is None:
            raise ValueError("nothing to write: give --out FILE and/or --db URL")
        if self.db is None:
            given = [f for f, v in (("--select", self.select), ("--rm", self.rm),
                                    ("--budget", self.budget), ("--gold", self.gold),
                                    ("--batch", self.batch), ("--for-groups", self.for_groups))
                     if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} create tasks and need --db URL")
        if self.select == "uncertainty" and self.rm is None:
            raise ValueError("--select uncertainty needs --rm DIR (an ensemble reward model)")
        if self.rm is not None and self.select != "uncertainty":
            raise ValueError("--rm is used only by --select uncertainty")
        if self.for_groups is not None and self.for_groups not in AIMS:
            raise ValueError(f"--for-groups must be one of {list(AIMS)}, got "
                             f"{self.for_groups!r}")
        if self.batch_size < 1 or self.max_prompt_length < 1:
            raise ValueError("batch_size and max_prompt_length must be at least 1")
        self.selection()
        SamplingSettings(self.max_new_tokens, self.temperature, self.top_p)

    def selection(self) -> SelectionConfig:
        from rewardloop.feedback.select import SelectionConfig

        return SelectionConfig(strategy=self.select or "random", budget=self.budget,
                               overlap_share=self.overlap_share, overlap=self.overlap,
                               gold_rate=self.gold_rate, measure=self.measure, seed=self.seed)


def run_generate(cfg: GenerateConfig) -> list[str]:
    """Sample, write, select, create; returns the lines to print."""
    from rewardloop.data.formats import PromptRecord, read_records, write_records
    from rewardloop.feedback import select as S
    from rewardloop.score import heads_of

    if cfg.out is not None:  # refused before minutes of sampling, not after
        check_output_file(cfg.out, flag="--out", inputs=(
            cfg.prompts, cfg.gold, cfg.chat_template, cfg.rm, cfg.policy))
    gold_rows = S.read_gold(input_file(cfg.gold)) if cfg.gold is not None else []
    prompts = [r.prompt for r in read_records(existing_data(cfg.prompts), "prompts")[1]
               if isinstance(r, PromptRecord)]
    if cfg.db is not None:  # a wrong --db refused before minutes of sampling, not after
        _check_store(cfg)
    origin = S.policy_origin(cfg.policy, {
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "top_p": cfg.top_p, "seed": cfg.seed})
    label = f"{origin.model}@{origin.model_version}" if origin.model_version else origin.model
    rows = _sample(cfg, prompts, label)
    lines = [f"sampled {sum(len(r.responses) for r in rows)} distinct answers to "
             f"{len(rows)} prompts from {label}"]
    if cfg.out is not None:
        write_records(cfg.out, "candidates", rows)
        lines.append(f"wrote {cfg.out}")
    if cfg.db is None:
        return lines
    pairs = S.candidate_pairs(rows)
    sel = cfg.selection()
    scores = None
    if sel.strategy == "uncertainty":
        assert cfg.rm is not None  # checked by the config
        heads = heads_of(cfg.rm, device=cfg.device)
        scores = S.uncertainty_scores(rows, pairs, heads, sel.measure)
    planned = S.plan(sel, pairs, S.gold_pairs(gold_rows), scores)
    # The responses get name, version and settings from the origin, not the file's label.
    skipped: list[int] = []
    planned, name, aimed = _create(cfg, planned, [replace(r, models=None) for r in rows],
                                   gold_rows, origin, skipped)
    line = f"{planned.describe()} in batch {name} ({sel.strategy} selection)"
    lines.append(f"created {line}" if not skipped else (
        f"planned {line}; the batch already held {len(skipped)} of these comparisons (an "
        f"earlier run), so {len(planned.tasks) - len(skipped)} tasks were created"))
    return lines if aimed is None else [*lines, aimed]


def _sample(cfg: GenerateConfig, prompts: list[Any], label: str | None
            ) -> list[CandidatesRecord]:
    """``cfg.n`` answers to each prompt, in this process or on Ray (``--ray``)."""
    from rewardloop.rollout import SamplingSettings, sample_candidates

    settings = SamplingSettings(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    if cfg.ray:
        assert cfg.out is not None  # checked by the config
        options = {"seed": cfg.seed, "device": cfg.device, "dtype": cfg.dtype,
                   "model_label": label, "engine": EngineOptions.of(cfg),
                   "chat_template": cfg.chat_template,
                   "max_prompt_length": cfg.max_prompt_length}
        return batch_module().sample_on_ray(
            cfg.policy, prompts, cfg.n, settings, cfg.out, address=cfg.ray, actors=cfg.actors,
            gpus=cfg.actor_gpus, cpus=cfg.actor_cpus, batch_size=cfg.batch_size,
            options=options, timeout_s=cfg.actor_timeout)
    return sample_candidates(cfg.policy, prompts, cfg.n, settings, seed=cfg.seed,
                             batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length,
                             device=cfg.device, dtype=cfg.dtype, model_label=label,
                             engine=EngineOptions.of(cfg), chat_template=cfg.chat_template)


def _check_store(cfg: GenerateConfig) -> None:
    """Open the --db store (URL, path, server, schema) and, with --for-groups, aim an empty
    plan in it: what would fail after sampling fails now."""
    from rewardloop.data.store import Store
    from rewardloop.feedback import select as S

    assert cfg.db is not None  # checked by the caller
    store = Store(resolve_db(cfg.db))
    try:
        if cfg.for_groups is not None:
            with store.read() as session:
                _aim(cfg, S.Plan(), session)
    finally:
        store.dispose()


def _aim(cfg: GenerateConfig, planned: Plan, session: Session) -> tuple[Plan, str]:
    """--for-groups: ``planned`` aimed at the groups behind in ``session``'s store, and the line
    saying how."""
    from rewardloop.feedback import audience as A

    assert cfg.for_groups is not None  # checked by the caller
    needs = A.needs_from_store(session, cfg.for_groups)
    aimed = A.aim(needs, planned)
    return aimed, A.describe(needs, aimed, cfg.for_groups)


def _create(cfg: GenerateConfig, planned: Plan, rows: list[CandidatesRecord],
            gold_rows: list[RankingRecord], origin: Origin, skipped: list[int]
            ) -> tuple[Plan, str, str | None]:
    """Create the plan's tasks in the store (aimed first with --for-groups, in the same
    transaction); returns the plan as created, the batch name and the aiming line. The ids of
    tasks the batch already held for planned comparisons go to ``skipped``."""
    from rewardloop.data.store import Store
    from rewardloop.feedback import select as S
    from rewardloop.feedback import tasks as T

    assert cfg.db is not None  # checked by the caller
    store = Store(resolve_db(cfg.db))
    aimed = None
    try:
        with store.write() as session:
            if cfg.for_groups is not None:
                planned, aimed = _aim(cfg, planned, session)
            batch = T.get_or_create_batch(session, cfg.batch or f"generate-{cfg.prompts.stem}")
            S.create_planned_tasks(session, planned, rows, gold_rows, batch=batch,
                                   origin=origin, skipped=skipped)
            name = batch.name
    finally:
        store.dispose()
    return planned, name, aimed


def _print_generate(cfg: GenerateConfig) -> None:
    for line in run_generate(cfg):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("generate")(config_command(
        GenerateConfig, _print_generate,
        doc="Sample answers from a policy into a candidates file and, with --db, create the "
        "tasks worth a label budget: overlap items, gold items, then random or most-uncertain "
        "pairs, optionally aimed at the annotator groups that fall behind (--for-groups)."))
