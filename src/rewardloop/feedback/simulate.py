"""Simulated annotators: noisy, biased, grouped or spamming stand-ins for people.

Each simulated annotator turns gold scores (from a user's gold function) into a ranking the way a
person might: a Bradley–Terry choice ``P(a > b) = sigma((g_a - g_b) / temperature + biases)``
for pairs and Plackett–Luce sampling with the same utilities for k > 2 answers, plus an extra logit
for the first-shown answer (position bias), a logit per 100 characters of length (length bias),
ties when the gold gap is small, AlpacaFarm-style label flips, and spammers (``random`` or
``constant`` = always the first shown). They judge through ``feedback.tasks`` (lease, view,
submit), exactly like people on the server.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sqlalchemy import select

from rewardloop.config import check_fields
from rewardloop.data.schema import Annotator, Batch
from rewardloop.errors import UserError
from rewardloop.feedback import queue
from rewardloop.util.imports import import_function

log = logging.getLogger(__name__)

SPAM_KINDS = ("random", "constant")
GoldScore = float | Mapping[str, float]
GoldFn = Callable[..., Sequence[Any]]
# A float gold score is the component of this name, so pools can weigh it like any other.
SCORE = "score"


@dataclass(frozen=True)
class SimulatedAnnotator:
    """How one simulated person turns gold scores into a ranking."""

    name: str
    """Annotator name in the store (unique)."""
    group: str | None = None
    """Group stored on the annotator (``Annotator.groups``), for the group view of `quality`."""
    temperature: float = 1.0
    """Bradley–Terry noise tau: utilities are gold / tau; small = near-perfect, large = random."""
    position_bias: float = 0.0
    """Extra logit for the answer shown first (positive = prefers the left/top answer)."""
    length_bias: float = 0.0
    """Logit per 100 characters of answer length (positive = prefers longer answers)."""
    tie_threshold: float = 0.0
    """Adjacent answers whose weighted gold differs by less than this may be called a tie ..."""
    tie_prob: float = 0.5
    """... with this probability."""
    flip: float = 0.0
    """Probability of reversing the whole ranking (label-flip noise, AlpacaFarm uses ~0.25)."""
    weights: Mapping[str, float] | None = None
    """Weight of each gold component; unlisted components weigh 0. None: all components 1."""
    spam: str | None = None
    """``random`` (uniform random ranking) or ``constant`` (always the order shown)."""
    time_median_s: float = 37.0
    """Median seconds per judgment (lognormal); ~37 s is the MTurk figure of AlpacaEval."""
    time_sigma: float = 0.5
    """Log-scale spread of the judgment time."""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str) or len(self.name) > 120:
            raise ValueError("name must be a non-empty string of at most 120 characters")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for key in ("tie_prob", "flip"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.tie_threshold < 0 or self.time_median_s <= 0 or self.time_sigma < 0:
            raise ValueError("tie_threshold and time_sigma must be >= 0, time_median_s > 0")
        if self.spam is not None and self.spam not in SPAM_KINDS:
            raise ValueError(f"spam must be one of {list(SPAM_KINDS)} or null, got {self.spam!r}")

    def utilities(self, gold_scores: Sequence[GoldScore]) -> np.ndarray:
        """Weighted gold utility of each answer, shape (k,)."""
        out = np.empty(len(gold_scores))
        for i, score in enumerate(gold_scores):
            parts = {SCORE: float(score)} if not isinstance(score, Mapping) else score
            if self.weights is None:
                out[i] = sum(float(v) for v in parts.values())
                continue
            missing = sorted(set(self.weights) - set(parts))
            if missing:
                raise UserError(f"annotator {self.name}: weights name gold components {missing} "
                                f"the gold function does not return (it returns {sorted(parts)})")
            out[i] = sum(w * float(parts[c]) for c, w in self.weights.items())
        return out

    def judge(self, prompt: Any, responses: Sequence[str], gold_scores: Sequence[GoldScore],
              rng: np.random.Generator) -> list[list[int]]:
        """Rank ``responses`` (in the order shown) as this annotator would.

        Returns groups of indices into ``responses``, best first; a group of 2+ is a tie.
        ``prompt`` is what was asked (the decision models here need only the answers).
        """
        k = len(responses)
        if k < 2 or len(gold_scores) != k:
            raise ValueError("judge needs 2+ responses and one gold score per response")
        if self.spam == "random":
            return [[int(i)] for i in rng.permutation(k)]
        if self.spam == "constant":
            return [[i] for i in range(k)]
        gold = self.utilities(gold_scores)
        logits = gold / self.temperature + self.length_bias * np.array(
            [len(r) for r in responses]) / 100.0
        logits[0] += self.position_bias
        # Plackett–Luce sample by the Gumbel-max trick: sorting logits + Gumbel noise draws a
        # full ranking with P = prod_i exp(s_i) / sum_{j remaining} exp(s_j); for k = 2 this is
        # exactly the Bradley–Terry choice sigma(s_a - s_b).
        order = list(np.argsort(-(logits + rng.gumbel(size=k)), kind="stable"))
        if self.flip and rng.random() < self.flip:
            order.reverse()
        groups: list[list[int]] = [[int(order[0])]]
        for cur in order[1:]:
            # A tie holds answers within tie_threshold of EVERY other member: compared with the
            # previous answer only, ties would chain across any gap (0, .2, .4, .6 at .25).
            close = all(abs(gold[m] - gold[cur]) < self.tie_threshold for m in groups[-1])
            if close and rng.random() < self.tie_prob:
                groups[-1].append(int(cur))
            else:
                groups.append([int(cur)])
        return groups

    def sample_time_ms(self, rng: np.random.Generator) -> int:
        """Milliseconds spent on one judgment: lognormal around ``time_median_s``."""
        return int(round(1000.0 * self.time_median_s * math.exp(self.time_sigma * rng.normal())))


# -- pools -------------------------------------------------------------------------------------

_FIELDS = {f.name for f in dataclasses.fields(SimulatedAnnotator)}


def _expand_entry(entry: Any, where: str, group_weights: Mapping[str, Any]
                  ) -> list[SimulatedAnnotator]:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping of annotator settings, got {entry!r}")
    unknown = sorted(set(entry) - _FIELDS - {"count"})
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {sorted(_FIELDS | {'count'})}")
    count = entry.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f"{where}: count must be an integer >= 1, got {count!r}")
    settings = {k: v for k, v in entry.items() if k != "count"}
    name = settings.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: every annotator needs a name")
    settings = check_fields(SimulatedAnnotator, settings, where)
    if settings.get("weights") is None and settings.get("group") in group_weights:
        settings["weights"] = group_weights[settings["group"]]
    out = []
    for i in range(1, count + 1):
        if "{i}" in name:
            settings["name"] = name.replace("{i}", str(i))
        else:
            settings["name"] = f"{name}-{i}" if count > 1 else name
        try:
            out.append(SimulatedAnnotator(**settings))
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}") from None
    return out


def _group_weights(raw: Any, path: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
            isinstance(v, dict) and set(v) <= {"weights"} for v in raw.values()):
        raise UserError(f"{path}: 'groups' must map each group name to {{weights: {{...}}}}")
    return {g: check_fields(SimulatedAnnotator, {"weights": v.get("weights")},
                            f"{path}: groups.{g}")["weights"] for g, v in raw.items()}


def parse_pool(data: Any, path: Path | str = "<pool>") -> list[SimulatedAnnotator]:
    """Annotators of a pool given as parsed YAML (see docs/quality.md for the format)."""
    path = Path(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotators"), list):
        raise UserError(f"{path}: a pool is a mapping with a list under 'annotators'")
    unknown = sorted(set(data) - {"annotators", "groups"})
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {unknown}; known: annotators, groups")
    groups = _group_weights(data.get("groups"), path)
    pool: list[SimulatedAnnotator] = []
    for index, entry in enumerate(data["annotators"]):
        pool.extend(_expand_entry(entry, f"{path}: annotators[{index}]", groups))
    if not pool:
        raise UserError(f"{path}: the pool has no annotators")
    names = [a.name for a in pool]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{path}: annotator names must be unique; repeated: {dupes}")
    return pool


def load_pool(path: Path | str) -> list[SimulatedAnnotator]:
    """Read a pool YAML file; every mistake is a UserError naming the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such pool file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    return parse_pool(data, path)


def opposed_groups_pool(weights: Mapping[str, float], component: str, *, majority: int = 6,
                        minority: int = 2, temperature: float = 0.5) -> list[SimulatedAnnotator]:
    """A ``majority`` group and a ``minority`` group that weigh the gold components alike except
    ``component``, which the minority weighs with the opposite sign: the pool on which pooled
    training serves the majority only (the proof of ``--group-balance``)."""
    if component not in weights:
        raise ValueError(f"component {component!r} is not among the weights {sorted(weights)}")
    flipped = {**weights, component: -weights[component]}
    return ([SimulatedAnnotator(f"major-{i}", group="majority", temperature=temperature,
                                weights=dict(weights)) for i in range(1, majority + 1)]
            + [SimulatedAnnotator(f"minor-{i}", group="minority", temperature=temperature,
                                  weights=flipped) for i in range(1, minority + 1)])


def judge_offline(pool: Sequence[SimulatedAnnotator], candidates: Sequence[Mapping[str, Any]],
                  gold: GoldFn, seed: int = 0) -> list[dict[str, Any]]:
    """Pairwise rows (prompt, chosen, rejected, annotator) from candidates rows with two
    responses, each judged by the next annotator of ``pool`` in turn (so every annotator sees
    the same mix of prompts), without a store: for experiments and tests of training methods.
    Ties and identical answers give no row."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, row in enumerate(candidates):
        prompt, (a, b) = row["prompt"], row["responses"]
        if a == b:
            continue
        sim = pool[index % len(pool)]
        shown = [a, b] if rng.random() < 0.5 else [b, a]
        ranking = sim.judge(prompt, shown, score_gold(gold, [prompt, prompt], shown), rng)
        if len(ranking) < 2:
            continue
        rows.append({"prompt": prompt, "chosen": shown[ranking[0][0]],
                     "rejected": shown[ranking[1][0]], "annotator": sim.name})
    return rows


# -- gold functions ----------------------------------------------------------------------------


def load_gold(spec: str) -> GoldFn:
    """Import a gold function given as ``package.module:function`` (the working directory is
    searched too: ``util.imports``)."""
    return import_function(spec, "--gold")


def _check_score(value: Any, index: int, spec: str) -> GoldScore:
    def number(x: Any) -> bool:
        return isinstance(x, int | float | np.number) and not isinstance(x, bool) \
            and math.isfinite(float(x))

    if number(value):
        return float(value)
    if isinstance(value, Mapping) and value and all(
            isinstance(k, str) and number(v) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    raise UserError(f"gold function {spec}: item {index} is {value!r}; expected a finite number "
                    "or a non-empty dict of named finite numbers")


def score_gold(fn: GoldFn, prompts: list[Any], completions: list[str],
               spec: str = "gold") -> list[GoldScore]:
    """Call a TRL-style reward function and check it returns one score per completion."""
    try:
        result = fn(prompts=prompts, completions=completions)
    except Exception as exc:  # user code: any failure becomes one clear line, as for --reward
        raise UserError(f"gold function {spec} raised {type(exc).__name__}: "
                        f"{exc}".replace("\n", " ")) from exc
    if isinstance(result, np.ndarray):
        result = result.tolist()
    if not isinstance(result, Sequence) or isinstance(result, str | bytes):
        raise UserError(f"gold function {spec} returned {type(result).__name__}; "
                        "expected a list with one score per completion")
    if len(result) != len(completions):
        raise UserError(f"gold function {spec} returned {len(result)} scores for "
                        f"{len(completions)} completions")
    return [_check_score(v, i, spec) for i, v in enumerate(result)]


# -- running a pool against the store ------------------------------------------------------------


@dataclass
class SimulationSummary:
    """What a simulation did: judgments made per annotator name and in total."""

    judgments: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.judgments.values())


def ensure_annotators(store: Any, pool: Sequence[SimulatedAnnotator]) -> dict[str, int]:
    """The store ids of the pool's annotators, get-or-created by name as ``kind="simulated"``
    with ``groups=[group]`` (``simulate`` does it first; the loop too, before it aims tasks at
    their groups)."""
    ids: dict[str, int] = {}
    with store.write() as s:
        for sim in pool:
            row = s.scalar(select(Annotator).where(Annotator.name == sim.name))
            groups = [sim.group] if sim.group else []
            if row is None:
                row = Annotator(name=sim.name, kind="simulated", groups=groups)
                s.add(row)
                s.flush()
            elif row.kind != "simulated":
                raise UserError(f"annotator {sim.name!r} already exists and is not simulated; "
                                "rename it in the pool")
            else:
                row.groups = groups
            ids[sim.name] = row.id
    return ids


def _batch_id(store: Any, batch: str | None) -> int | None:
    if batch is None:
        return None
    with store.read() as s:
        found = s.scalar(select(Batch.id).where(Batch.name == batch))
    if found is None:
        raise UserError(f"--batch: no batch named {batch!r} in the store")
    return found


class _Judge:
    """One simulated annotator working through its tasks, lease then submit, like a person."""

    def __init__(self, sim: SimulatedAnnotator, annotator_id: int, index: int, seed: int) -> None:
        self.sim, self.annotator_id, self.seed = sim, annotator_id, seed
        self.rng = np.random.default_rng([seed, index])
        self.lease_rng = random.Random(f"{seed}:{index}:{sim.name}")  # noqa: S311 - simulation

    def step(self, store: Any, batch_id: int | None, gold: _GoldCache) -> bool:
        """Judge one task; False when nothing is left for this annotator."""
        with store.write() as s:
            annotator = s.get(Annotator, self.annotator_id)
            batch = s.get(Batch, batch_id) if batch_id is not None else None
            lease = queue.next_task(s, annotator, batch=batch, rng=self.lease_rng)
            if lease is None:
                return False
            view = queue.task_view(s, lease)
        shown = [r["id"] for r in view["responses"]]
        scores = gold.scores(view)
        groups = self.sim.judge(view["prompt"], [r["text"] for r in view["responses"]],
                                [scores[rid] for rid in shown], self.rng)
        ranking = [[shown[i] for i in g] for g in groups]
        with store.write() as s:
            annotator = s.get(Annotator, self.annotator_id)
            queue.submit_judgment(
                s, annotator, view["task_id"], ranking,
                idempotency_key=f"sim:{self.seed}:{self.annotator_id}:{view['task_id']}",
                time_ms=self.sim.sample_time_ms(self.rng), shown_order=shown,
                source="simulated")
        return True


class _GoldCache:
    """Gold scores per response id, computed once per response (the gold may be a slow model)."""

    def __init__(self, fn: GoldFn, spec: str) -> None:
        self.fn, self.spec = fn, spec
        self.cache: dict[int, GoldScore] = {}

    def scores(self, view: Mapping[str, Any]) -> dict[int, GoldScore]:
        todo = [r for r in view["responses"] if r["id"] not in self.cache]
        if todo:
            got = score_gold(self.fn, [view["prompt"]] * len(todo), [r["text"] for r in todo],
                             self.spec)
            self.cache.update({r["id"]: g for r, g in zip(todo, got, strict=True)})
        return {r["id"]: self.cache[r["id"]] for r in view["responses"]}


def simulate(store: Any, pool: Sequence[SimulatedAnnotator], gold: GoldFn | str, *,
             batch: str | None = None, seed: int = 0,
             max_judgments: int | None = None) -> SimulationSummary:
    """Let every annotator of ``pool`` judge open tasks (in ``batch``, else all) until none is
    left for anyone or ``max_judgments`` are made; annotators take turns, one task each.

    Annotators are get-or-created by name as ``kind="simulated"`` with ``groups=[group]``.
    Deterministic for a given store state and ``seed``.
    """
    spec = gold if isinstance(gold, str) else getattr(gold, "__name__", "gold")
    fn = load_gold(gold) if isinstance(gold, str) else gold
    if max_judgments is not None and max_judgments < 0:
        raise UserError("--max-judgments must be >= 0")
    batch_id = _batch_id(store, batch)
    ids = ensure_annotators(store, pool)
    judges = [_Judge(sim, ids[sim.name], i, seed) for i, sim in enumerate(pool)]
    cache = _GoldCache(fn, spec)
    summary = SimulationSummary({sim.name: 0 for sim in pool})
    active = list(judges)
    while active:
        for judge in list(active):
            if max_judgments is not None and summary.total >= max_judgments:
                return summary
            if judge.step(store, batch_id, cache):
                summary.judgments[judge.sim.name] += 1
            else:
                active.remove(judge)
    log.info("simulated %d judgments from %d annotators", summary.total, len(pool))
    return summary
