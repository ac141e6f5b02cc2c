"""``rewardloop score --ray`` and ``generate --ray``: the rows of a file dealt over actors.

The work is cut into numbered chunks (``score``: answers; ``generate``: batches of prompts,
each sampled from its own seed), sent to the actors round-robin, and put back in input
order, so the output is the one-process output row for row. Each finished chunk is saved at
once in ``.<out name>.parts/`` next to the output: a job that is interrupted (an actor or the
driver died) is resumed by running the same command again, which skips the saved chunks. The
folder is removed once every chunk is in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray

from rewardloop.cluster.connect import connect
from rewardloop.cluster.remote import Actor, call
from rewardloop.data.records import CandidatesRecord, Text
from rewardloop.errors import UserError
from rewardloop.score import Scores
from rewardloop.util.files import atomic_write_text

CHUNK_BATCHES = 8
"""Answers of one ``score`` chunk, in reward-model batches (big enough to keep an actor busy,
small enough that an interruption loses little)."""


class ScoreActor:
    """A reward model scoring chunks of (prompt, answer) pairs."""

    def __init__(self, rm: str, device: str, batch_size: int, normalize: bool) -> None:
        from rewardloop.score import RewardScorer

        self.scorer = RewardScorer(rm, device, batch_size, normalize=normalize)

    def run(self, pairs: Sequence[tuple[Text, Text]]) -> dict[str, Any]:
        scores = self.scorer.score_with_std([p for p, _ in pairs], [a for _, a in pairs])
        return {"mean": scores.mean, "std": scores.std}


class SampleActor:
    """A policy sampling candidate answers, one batch of prompts at a time."""

    def __init__(self, policy: str, options: dict[str, Any]) -> None:
        from rewardloop.rollout import CandidateSampler

        self.sampler = CandidateSampler(policy, **options)

    def run(self, work: tuple[Sequence[Text], int, Any, int]) -> list[dict[str, Any]]:
        prompts, n, settings, index = work
        return [asdict(r) for r in self.sampler.sample(prompts, n, settings, index)]


class Parts:
    """The saved chunks of one job: ``job.json`` says which job they belong to (another
    job's parts are refused, not mixed in), ``NNNNNN.json`` each finished chunk."""

    def __init__(self, out: Path, job: dict[str, Any]) -> None:
        self.dir = out.parent / f".{out.name}.parts"
        marker = self.dir / "job.json"
        if marker.is_file() and json.loads(marker.read_text()) != job:
            raise UserError(f"{self.dir} holds the saved chunks of another job (other input or "
                            "options); delete it to start again")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(job))

    def load(self) -> dict[int, Any]:
        return {int(f.stem): json.loads(f.read_text()) for f in self.dir.glob("[0-9]*.json")}

    def save(self, index: int, value: Any) -> None:
        atomic_write_text(self.dir / f"{index:06d}.json", json.dumps(value))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def run_chunks(actors: list[Actor], chunks: list[Any], parts: Parts, timeout_s: float
               ) -> list[Any]:
    """The actors' results of every chunk, in chunk order; chunks saved earlier are not sent
    again, and each result is saved as soon as it arrives."""
    results = parts.load()
    pending: dict[Any, tuple[int, Actor]] = {}
    for k, chunk in enumerate(chunks):
        if k not in results:
            actor = actors[len(pending) % len(actors)]
            pending[actor.handle.run.remote(chunk)] = (k, actor)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
        if not done:
            raise UserError(f"no actor finished a chunk within {timeout_s:g} s; the "
                            f"{len(results)} finished chunks are saved: rerun to resume")
        k, actor = pending.pop(done[0])
        results[k] = call(actor.label, done[0], timeout_s)
        parts.save(k, results[k])
    return [results[k] for k in range(len(chunks))]


def _actors(cls: type, count: int, gpus: float, cpus: float, label: str, timeout_s: float,
            *args: Any) -> list[Actor]:
    remote: Any = ray.remote(cls).options(num_cpus=cpus, num_gpus=gpus)
    return [Actor(f"{label} {i}", remote.remote(*args)) for i in range(count)]


def _with_actors(address: str, cpus: float, make: Callable[[], list[Actor]],
                 body: Callable[[list[Actor]], Any]) -> Any:
    """``body(actors)`` on the Ray at ``address`` (a local one with at least ``cpus`` CPUs),
    the actors stopped afterwards."""
    started = connect(address, cpus=cpus)
    actors: list[Actor] = []
    try:
        actors = make()
        return body(actors)
    finally:
        for actor in actors:
            ray.kill(actor.handle)
        if started:
            ray.shutdown()


def score_pairs_on_ray(rm: str | Path, out: Path, *, address: str, actors: int, gpus: float,
                       cpus: float, batch_size: int, normalize: bool, device: str,
                       timeout_s: float) -> Callable[[list[tuple[Text, Text]]], Scores]:
    """A ``score_pairs`` for ``score.score_file``: the pairs in chunks over ``actors``
    reward-model actors."""
    def score(pairs: list[tuple[Text, Text]]) -> Scores:
        size = batch_size * CHUNK_BATCHES
        chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
        job = {"kind": "score", "rm": str(Path(rm).resolve()), "pairs": len(pairs),
               "chunk": size, "normalize": normalize,
               "first": json.dumps(pairs[:1]), "last": json.dumps(pairs[-1:])}
        parts = Parts(out, job)

        def make() -> list[Actor]:
            return _actors(ScoreActor, actors, gpus, cpus, "score actor", timeout_s,
                           str(rm), device, batch_size, normalize)

        results = _with_actors(address, actors * cpus, make,
                               lambda a: run_chunks(a, chunks, parts, timeout_s))
        mean = [v for r in results for v in r["mean"]]
        std = [v for r in results for v in r["std"]] if results and results[0]["std"] else None
        parts.remove()
        return Scores(mean, std)

    return score


def sample_on_ray(policy: str, prompts: Sequence[Text], n: int, settings: Any, out: Path, *,
                  address: str, actors: int, gpus: float, cpus: float, batch_size: int,
                  options: dict[str, Any], timeout_s: float) -> list[CandidatesRecord]:
    """``rollout.sample_candidates`` with the batches over ``actors`` generation actors
    (``options``: CandidateSampler's)."""
    chunks = [(list(prompts[i:i + batch_size]), n, settings, k)
              for k, i in enumerate(range(0, len(prompts), batch_size))]
    job = {"kind": "generate", "policy": str(policy), "prompts": len(prompts), "n": n,
           "batch": batch_size, "settings": repr(settings), "options": repr(options),
           "first": json.dumps(list(prompts[:1])), "last": json.dumps(list(prompts[-1:]))}
    parts = Parts(out, job)

    def make() -> list[Actor]:
        return _actors(SampleActor, actors, gpus, cpus, "generation actor", timeout_s,
                       policy, options)

    results = _with_actors(address, actors * cpus, make,
                           lambda a: run_chunks(a, chunks, parts, timeout_s))
    parts.remove()
    return [CandidatesRecord(**row) for chunk in results for row in chunk]
