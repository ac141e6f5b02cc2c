"""Which comparisons to ask people for next, under a label budget.

A label is one judgment; a task given to ``overlap`` annotators costs ``overlap`` labels. From
candidate comparisons (a prompt and k answers, so k(k-1)/2 pairs each) a *plan* is built:

1. **overlap items** first: a share of the tasks goes to several annotators, so agreement and
   reliability can be measured (``feedback.quality``). They are drawn at random, not by
   uncertainty: pairs a model finds hard are also the ones people disagree on, and agreement
   measured on them alone would understate it.
2. **gold items** with a known answer, spread evenly through the whole queue at ``gold_rate``,
   so every annotator meets them all the time (``gold_fail`` flags need ~10 each). They go to
   ``overlap`` annotators too: a gold item checks everyone who sees it.
3. the rest by the **strategy**: ``random``, or ``uncertainty``: the pairs a reward-model
   ensemble disagrees on most (Houlsby et al. 2011, "BALD"; Gleave & Irving 2022 for reward
   models), measured per pair from the K heads' score differences ``d_k = r_a^k - r_b^k``:
   ``bald`` = H(mean_k sigma(d_k)) - mean_k H(sigma(d_k)) (mutual information between the label
   and the head), or ``std`` = std_k d_k.

The planning functions are pure; :func:`create_planned_tasks` writes a plan through
``feedback.tasks``; task priorities make the server hand tasks out in plan order. What needs a
model comes in from the caller: ``uncertainty_scores`` takes a ``HeadFn`` (``score.heads_of``),
and candidates are sampled by ``rollout.sample_candidates``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rewardloop.data.formats import read_as
from rewardloop.data.records import CandidatesRecord, RankingRecord, Text, response_text
from rewardloop.feedback import tasks as T

log = logging.getLogger(__name__)

STRATEGIES = ("random", "uncertainty")
ROLES = ("overlap", "gold", "select")
Pair = tuple[int, int, int]  # (row, answer index a, answer index b), a < b
HeadFn = Callable[[Sequence[Text], Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class SelectionConfig:
    """How a label budget is spent."""

    strategy: str = "random"
    """``random`` or ``uncertainty`` (needs per-head scores of a reward-model ensemble)."""
    budget: int | None = None
    """Labels (judgments) to spend; None: one label per candidate pair."""
    overlap_share: float = 0.1
    """Share of the non-gold tasks given to ``overlap`` annotators, in [0, 1]."""
    overlap: int = 3
    """Annotators per overlap item and per gold item (>= 1)."""
    gold_rate: float = 0.05
    """Share of all tasks that are gold items, in [0, 1); 0 or no gold rows: none."""
    measure: str = "bald"
    """Ensemble disagreement of a pair: ``bald`` or ``std`` (see the module docstring)."""
    seed: int = 0
    """Seed for the random draws (overlap items, random selection, gold order)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget must be a positive number of labels, got {self.budget}")
        if not 0.0 <= self.overlap_share <= 1.0:
            raise ValueError(f"overlap_share must be in [0, 1], got {self.overlap_share}")
        if self.overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {self.overlap}")
        if not 0.0 <= self.gold_rate < 1.0:
            raise ValueError(f"gold_rate must be in [0, 1), got {self.gold_rate}")
        if self.measure not in DISAGREEMENT:
            raise ValueError(f"measure must be one of {sorted(DISAGREEMENT)}, got "
                             f"{self.measure!r}")


@dataclass(frozen=True)
class PlannedTask:
    """One pairwise task to create. ``row`` indexes the candidates (gold: the gold rows)."""

    role: str
    row: int
    a: int
    b: int
    overlap: int
    score: float | None = None
    """The pair's disagreement under ``uncertainty`` selection."""
    gold_ranking: list[list[int]] | None = None
    """Known answer of a gold item, in answer indices of its row, best first."""
    audience: str | None = None
    """The annotator group the task is for (``feedback.audience.aim``); None: anyone."""


@dataclass(frozen=True)
class Counts:
    overlap: int
    gold: int
    select: int

    @property
    def tasks(self) -> int:
        return self.overlap + self.gold + self.select


@dataclass
class Plan:
    tasks: list[PlannedTask] = field(default_factory=list)

    def labels(self) -> int:
        return sum(t.overlap for t in self.tasks)

    def count(self, role: str) -> int:
        return sum(t.role == role for t in self.tasks)

    def describe(self) -> str:
        """One line: tasks by role, and labels."""
        return (f"{len(self.tasks)} tasks ({self.count('overlap')} overlap, "
                f"{self.count('gold')} gold, {self.count('select')} selected), "
                f"{self.labels()} labels")


# -- pure planning ---------------------------------------------------------------------------


def candidate_pairs(rows: Sequence[CandidatesRecord]) -> list[Pair]:
    """Every unordered pair of distinct answers of every row, in row order; a row that holds
    the same answer twice gives each comparison once (at its first answers)."""
    out: list[Pair] = []
    for r, row in enumerate(rows):
        first: dict[str, int] = {}  # each distinct answer's first index
        for i, text in enumerate(row.responses):
            first.setdefault(text if isinstance(text, str) else json.dumps(text), i)
        kept = sorted(first.values())
        out.extend((r, a, b) for n, a in enumerate(kept) for b in kept[n + 1:])
    return out


def gold_pairs(rows: Sequence[RankingRecord]) -> list[tuple[Pair, list[list[int]]]]:
    """Pairs of gold rows with a strict known preference, and that answer (ties skipped: an
    annotator could not be scored right or wrong on them)."""
    out = []
    for r, row in enumerate(rows):
        rank = {i: g for g, group in enumerate(row.ranking) for i in group}
        for a in range(len(row.responses)):
            for b in range(a + 1, len(row.responses)):
                if rank[a] != rank[b]:
                    out.append(((r, a, b), [[a], [b]] if rank[a] < rank[b] else [[b], [a]]))
    return out


def plan_counts(budget: int, n_pairs: int, n_gold: int, overlap_share: float, overlap: int,
                gold_rate: float) -> Counts:
    """The most tasks whose labels fit ``budget``: with T tasks, G = min(round(rate T), n_gold)
    gold, O = round(share (T - G)) overlap and the rest single; overlap and gold tasks cost
    ``overlap`` labels each. Cost grows with T, so the first T that does not fit ends it."""
    best = Counts(0, 0, 0)
    for total in range(1, n_pairs + n_gold + 1):
        gold = min(round(gold_rate * total), n_gold)
        rest = total - gold
        if rest > n_pairs:
            break
        over = round(overlap_share * rest)
        if (over + gold) * overlap + rest - over > budget:
            break
        best = Counts(over, gold, rest - over)
    return best


def interleave(main: Sequence[Any], extra: Sequence[Any]) -> list[Any]:
    """``extra`` spread evenly through ``main``: with T items in all, extra item j sits at
    position floor((j + 1/2) T / len(extra))."""
    total = len(main) + len(extra)
    at = {int((j + 0.5) * total / len(extra)): j for j in range(len(extra))} if extra else {}
    rest = iter(main)
    return [extra[at[i]] if i in at else next(rest) for i in range(total)]


def bald(diffs: np.ndarray) -> np.ndarray:
    """(P, K) head score differences -> (P,) mutual information (nats) of the label and the
    head: H(mean_k p_k) - mean_k H(p_k), p_k = sigma(d_k). 0 when all heads agree."""
    def entropy(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return -(p * np.log(p) + (1 - p) * np.log(1 - p))

    p = 1.0 / (1.0 + np.exp(-np.asarray(diffs, dtype=np.float64)))
    return entropy(p.mean(axis=1)) - entropy(p).mean(axis=1)


DISAGREEMENT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "bald": bald,
    "std": lambda diffs: np.asarray(diffs, dtype=np.float64).std(axis=1),
}


def pair_disagreement(heads: np.ndarray, index: Sequence[Sequence[int]], pairs: Sequence[Pair],
                      measure: str = "bald") -> np.ndarray:
    """Disagreement of each pair: ``heads`` (N, K) are the K head scores of N answers and
    ``index[row][i]`` the answer number of a row's i-th response."""
    if heads.ndim != 2 or heads.shape[1] < 2:
        raise ValueError("uncertainty needs the scores of 2+ ensemble heads per answer")
    a = np.array([index[r][i] for r, i, _ in pairs], dtype=int)
    b = np.array([index[r][j] for r, _, j in pairs], dtype=int)
    return DISAGREEMENT[measure](heads[a] - heads[b])


def plan(cfg: SelectionConfig, pairs: Sequence[Pair],
         gold: Sequence[tuple[Pair, list[list[int]]]] = (),
         scores: np.ndarray | None = None) -> Plan:
    """The tasks to create, in hand-out order (see the module docstring).

    ``scores`` (one per pair, higher = ask first) is required by ``uncertainty``.
    """
    if cfg.strategy == "uncertainty" and (scores is None or len(scores) != len(pairs)):
        raise ValueError("uncertainty selection needs one disagreement score per pair")
    rng = np.random.default_rng(cfg.seed)
    budget = cfg.budget if cfg.budget is not None else len(pairs)
    gold_used = gold if cfg.gold_rate > 0 else ()
    n = plan_counts(budget, len(pairs), len(gold_used), cfg.overlap_share, cfg.overlap,
                    cfg.gold_rate)
    order = rng.permutation(len(pairs))
    overlap_idx = [int(i) for i in order[:n.overlap]]
    rest = [int(i) for i in order[n.overlap:]]
    if cfg.strategy == "uncertainty":
        assert scores is not None  # checked above
        rest = by_score(rest, scores)
    picked = rest[:n.select]

    def task(role: str, i: int, over: int) -> PlannedTask:
        r, a, b = pairs[i]
        score = float(scores[i]) if scores is not None else None
        return PlannedTask(role, r, a, b, over, score)

    main = [task("overlap", i, cfg.overlap) for i in overlap_idx]
    main += [task("select", i, 1) for i in picked]
    gold_order = rng.permutation(len(gold_used))[:n.gold]
    extra = [PlannedTask("gold", gold_used[g][0][0], gold_used[g][0][1], gold_used[g][0][2],
                         cfg.overlap, gold_ranking=gold_used[g][1]) for g in gold_order]
    return Plan(interleave(main, extra))


def by_score(indices: Sequence[int], scores: np.ndarray) -> list[int]:
    """``indices`` highest score first. The sort is stable, so tied pairs keep their (seeded,
    random) order; pairs with no finite score (a head that overflowed) come last, with a
    warning, rather than scrambling the order (NaN compares false with everything)."""
    values = np.asarray(scores, dtype=np.float64)
    bad = [i for i in indices if not np.isfinite(values[i])]
    if bad:
        log.warning("%d of %d pairs have no finite disagreement score (NaN or infinite head "
                    "scores: check the reward model, e.g. for half-precision overflow); they "
                    "are asked last", len(bad), len(indices))
    good = [i for i in indices if np.isfinite(values[i])]
    return sorted(good, key=lambda i: -float(values[i])) + bad


# -- scoring with an ensemble reward model ----------------------------------------------------


def uncertainty_scores(rows: Sequence[CandidatesRecord], pairs: Sequence[Pair], heads: HeadFn,
                       measure: str = "bald") -> np.ndarray:
    """Disagreement of each candidate pair, scoring each answer once with ``heads``."""
    prompts: list[Text] = []
    answers: list[str] = []
    index: list[list[int]] = []
    for row in rows:
        index.append(list(range(len(answers), len(answers) + len(row.responses))))
        prompts.extend([row.prompt] * len(row.responses))
        answers.extend(row.responses)
    if not pairs:
        return np.zeros(0)
    return pair_disagreement(np.asarray(heads(prompts, answers)), index, pairs, measure)


# -- where candidates come from -----------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Who wrote the candidate answers and how; stored on each response."""

    model: str | None = None
    model_version: str | None = None
    gen_settings: dict[str, Any] = field(default_factory=dict)


def policy_origin(policy: str | Path, gen_settings: dict[str, Any]) -> Origin:
    """Name and version of a policy: a local directory's name (its run's name for a ``model/``
    folder) and the first 12 hex digits of the SHA-256 of its weight files; a hub id as given."""
    path = Path(policy)
    if not path.is_dir():
        return Origin(str(policy), None, gen_settings)
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            for chunk in iter(functools.partial(fh.read, 1 << 20), b""):
                digest.update(chunk)
    return Origin(name, digest.hexdigest()[:12], gen_settings)


# -- writing a plan to the store ---------------------------------------------------------------


def create_planned_tasks(session: Any, planned: Plan, rows: Sequence[CandidatesRecord],
                         gold_rows: Sequence[RankingRecord] = (), *, batch: Any = None,
                         origin: Origin | None = None, skipped: list[int] | None = None
                         ) -> list[Any]:
    """Create the plan's pairwise tasks through ``feedback.tasks`` in the caller's transaction
    (run inside ``Store.write()``); priorities decrease along the plan so the queue follows it.

    A candidate row's ``models[i]`` names the writer of answer i, else ``origin.model``; its
    ``id`` becomes a new prompt's external id. A comparison ``batch`` already holds (same
    answers, gold or not, audience: a second run of the same plan) is not made again; its
    task's id goes to ``skipped`` when given.
    """
    origin = origin or Origin()
    created = []
    held: dict[int, dict[Any, int]] = {}  # the batch's comparisons, by prompt id
    for position, item in enumerate(planned.tasks):
        row: CandidatesRecord | RankingRecord = (
            gold_rows[item.row] if item.role == "gold" else rows[item.row])
        prompt = (T.get_or_create_prompt(session, messages=list(row.prompt), external_id=row.id)
                  if isinstance(row.prompt, list)
                  else T.get_or_create_prompt(session, text=row.prompt, external_id=row.id))
        responses = [_response(session, prompt, row, i, origin) for i in (item.a, item.b)]
        by_index = {item.a: responses[0].id, item.b: responses[1].id}
        gold = ([[by_index[i] for i in g] for g in item.gold_ranking]
                if item.gold_ranking is not None else None)
        if any(r.id is None for r in responses):
            session.flush()
        if prompt.id not in held:
            held[prompt.id] = T.held_comparisons(session, batch, prompt.id)
        key = T.comparison_key("pairwise", [r.id for r in responses], gold is not None,
                               item.audience)
        if key in held[prompt.id]:
            if skipped is not None:
                skipped.append(held[prompt.id][key])
            continue
        task = T.create_task(session, prompt, responses, kind="pairwise", overlap=item.overlap,
                             batch=batch, gold_ranking=gold,
                             priority=float(len(planned.tasks) - position),
                             audience=item.audience)
        held[prompt.id][key] = task.id
        created.append(task)
    log.info("created %d tasks (%d labels)", len(created), planned.labels())
    return created


def _response(session: Any, prompt: Any, row: CandidatesRecord | RankingRecord, i: int,
              origin: Origin) -> Any:
    """Answer ``i`` of ``row`` as a stored response: a gold row's as written, a candidate's with
    its writer (``row.models[i]``, else ``origin``) and the sampling settings."""
    text = row.responses[i]
    messages = list(text) if isinstance(text, list) else None
    if isinstance(row, RankingRecord):
        return T.get_or_create_response(session, prompt, _plain(text), messages=messages)
    named = row.models[i] if row.models is not None else None
    return T.get_or_create_response(
        session, prompt, _plain(text), messages=messages, model=named or origin.model,
        model_version=origin.model_version, gen_settings=dict(origin.gen_settings))


def _plain(text: Text) -> str:
    return text if isinstance(text, str) else response_text(text)


def read_gold(path: str | Path) -> list[RankingRecord]:
    """Gold rows (``ranking`` format: prompt, responses, ranking) from a JSONL file."""
    return read_as(path, "ranking", RankingRecord)
