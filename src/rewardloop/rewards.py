"""Reward sources for online RL: reward models, Python functions and weighted sums of them.

A reward is given as ``SPEC[@WEIGHT]`` (``--reward``, repeatable):

- ``SPEC`` a reward-model run directory (from ``rewardloop train rm``) or its ``model/``
  directory: the completion is scored by the model and normalised with the ``reward_stats.json``
  saved with it ((r - mean) / std), so rewards of different models are on one scale;
- ``SPEC`` = ``RM@group=w,group=w``: a ``train rm --group-heads`` model whose group heads are
  mixed with these weights (normalised to sum 1; unlisted groups weigh 0): a policy tuned to
  a stated mix of the groups' tastes. Without a mix such a model's reward is their equal mix;
- ``SPEC`` = ``package.module:function``: a function with TRL's reward signature
  ``fn(prompts, completions, **kwargs) -> list[float]``. kwargs hold ``completion_ids`` (lists of
  token ids), ``has_eos`` (list of bool: False when the answer was cut and never ended),
  ``prompt_ids`` and every key of the prompts' ``meta`` objects (like TRL's extra dataset
  columns). Chat prompts give chat completions (``[{"role": "assistant", "content": ...}]``),
  as in TRL.

The total is ``clip(Σ weight_i · r_i, ±reward_clip) - missing_eos_penalty · [no EOS]``: the
penalty comes after the clip so a clipped reward cannot swallow it. A function that raises or
returns the wrong number of values is a ``UserError`` naming it; a non-finite value is a
``TrainingError`` naming it and the completion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rewardloop.data.records import Text, is_chat
from rewardloop.errors import TrainingError, UserError
from rewardloop.score import RewardScorer, group_heads, resolve_rm_dir
from rewardloop.util.imports import import_function

RewardFn = Callable[..., Sequence[Any]]
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_MIX = re.compile(r"^[^=,@]+=[^=,@]+(,[^=,@]+=[^=,@]+)*$")


@dataclass(frozen=True)
class RewardSpec:
    """One ``--reward`` value: what scores (``spec``) and its weight in the sum."""

    spec: str
    weight: float = 1.0
    mix: tuple[tuple[str, float], ...] = ()
    """(group, weight) of each head of a --group-heads reward model; () = the equal mix."""


def parse_mix(text: str, where: str) -> tuple[tuple[str, float], ...]:
    """``"warm=0.7,concise=0.3"`` -> (("warm", 0.7), ("concise", 0.3)), weights normalised to
    sum 1; negative, non-finite or all-zero weights and repeated groups are refused."""
    pairs = []
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise UserError(f"--reward {where!r}: {part!r} is not GROUP=WEIGHT") from None
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"--reward {where!r}: group weights must be finite and >= 0")
        pairs.append((name.strip(), weight))
    names = [n for n, _ in pairs]
    if len(set(names)) < len(names) or not all(names):
        raise UserError(f"--reward {where!r}: name each group once")
    total = sum(w for _, w in pairs)
    if total <= 0:
        raise UserError(f"--reward {where!r}: at least one group weight must be > 0")
    return tuple((n, w / total) for n, w in pairs)


def parse_reward_spec(text: str) -> RewardSpec:
    """``"pkg.mod:fn@0.5"`` -> RewardSpec("pkg.mod:fn", 0.5); ``"RM@warm=1,concise=1@2"`` ->
    RewardSpec("RM", 2.0, (("warm", 0.5), ("concise", 0.5))). A path may contain ``@``; only a
    final ``@NUMBER`` is read as the weight, and an ``@GROUP=W,...`` before it as the mix."""
    text = text.strip()
    if not text:
        raise UserError("--reward is empty; give a reward-model dir or package.module:function")
    spec, weight = text, 1.0
    head, sep, tail = text.rpartition("@")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = 1.0
        else:
            if not math.isfinite(weight):
                raise UserError(f"--reward {text!r}: the weight must be a finite number")
            if not head:
                raise UserError(f"--reward {text!r}: nothing before '@{tail}'")
            spec = head
    base, sep, tail = spec.rpartition("@")
    if sep and base and _MIX.match(tail):
        return RewardSpec(base, weight, parse_mix(tail, text))
    if sep and base and ":" in base and "/" not in tail and ":" not in tail:
        # pkg.mod:fn@abc: a function spec names no file, so what follows @ was meant as a weight
        raise UserError(f"--reward {text!r}: the weight {tail!r} after '@' is not a number")
    return RewardSpec(spec, weight)


def _load_function(spec: str, flag: str = "--reward") -> tuple[str, RewardFn]:
    return spec.partition(":")[2], import_function(spec, flag)


class ModelReward:
    """A reward model (a ``train rm`` run or its ``model/``), scored by ``score.RewardScorer``
    and normalised to mean 0 / std 1 with its ``reward_stats.json``.

    An ensemble's reward is the mean over its heads minus ``uncertainty_penalty`` times their
    standard deviation (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
    Overoptimization", uncertainty-weighted optimisation); the last call's std is kept in
    ``last_std`` for the metrics."""

    def __init__(self, spec: str, *, device: str = "auto", batch_size: int = 16,
                 max_length: int | None = None, mix: Sequence[tuple[str, float]] = (),
                 uncertainty_penalty: float = 0.0, flag: str = "--reward") -> None:
        from rewardloop.models import is_classifier

        model_dir = resolve_rm_dir(Path(spec).expanduser())
        if (model_dir / "config.json").is_file() and not is_classifier(str(model_dir)):
            raise UserError(f"{flag} {spec}: {model_dir} is not a reward model (a language "
                            "model?); train one with `rewardloop train rm`")
        self.name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
        self.head_weights: torch.Tensor | None = None
        if mix:
            heads = group_heads(model_dir)
            if not heads:
                raise UserError(f"{flag} {spec}@...: {model_dir} has no group heads (train it "
                                "with train rm --group-heads)")
            unknown = sorted({g for g, _ in mix} - set(heads))
            if unknown:
                raise UserError(f"{flag} {spec}: no head for groups {unknown}; its heads are "
                                f"{heads}")
            weights = dict(mix)
            self.head_weights = torch.tensor([weights.get(g, 0.0) for g in heads])
        self.scorer = RewardScorer(model_dir, device=device, batch_size=batch_size,
                                   normalize=True, max_length=max_length)
        if uncertainty_penalty and self.scorer.heads < 2:
            raise UserError(f"--reward-uncertainty-penalty needs a reward-model ensemble, but "
                            f"{model_dir} has one head; train it with `train rm --ensemble 4`")
        self.uncertainty_penalty = uncertainty_penalty
        self.last_std: list[float] | None = None
        self.last_by_group: dict[str, list[float]] = {}
        """A --group-heads model's last rewards per group (its normalised heads), logged as
        ``reward/<name>/group/<group>``: whose reward a policy earns more of, whatever the mix."""

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text], **_: Any
                 ) -> list[float]:
        names = self.scorer.group_heads
        if self.head_weights is not None:
            heads = self.scorer.score_heads(prompts, completions)  # (N, groups), normalised
            self.last_by_group = {g: heads[:, i].tolist() for i, g in enumerate(names)}
            return (heads @ self.head_weights).tolist()
        scores = self.scorer.score_with_std(prompts, completions)
        self.last_std = scores.std
        self.last_by_group = {g: scores.heads[:, i].tolist() for i, g in enumerate(names)}
        return penalised(scores.mean, scores.std, self.uncertainty_penalty)


def penalised(mean: Sequence[float], std: Sequence[float] | None, penalty: float
              ) -> list[float]:
    """mean - penalty x std, element-wise (the mean itself without an ensemble's std)."""
    if std is None or not penalty:
        return list(mean)
    return [m - penalty * s for m, s in zip(mean, std, strict=True)]


class FunctionReward:
    """A Python reward function with TRL's signature, checked on every call."""

    def __init__(self, spec: str, flag: str = "--reward") -> None:
        """``flag``: the option that named ``spec`` (for messages)."""
        self.spec = spec
        self.name, self.fn = _load_function(spec, flag)

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text], **kwargs: Any
                 ) -> list[float]:
        try:
            values = self.fn(prompts=list(prompts), completions=list(completions), **kwargs)
        except Exception as exc:  # user code: any failure becomes one clear line
            raise UserError(f"reward function {self.spec} raised {type(exc).__name__}: "
                            f"{exc}".replace("\n", " ")) from exc
        # A sequence in order, one value each: a dict or set would be read through its keys.
        ndim = getattr(values, "ndim", None)  # numpy arrays and tensors: 1-D only
        if not (isinstance(values, list | tuple) or ndim == 1):
            raise UserError(f"reward function {self.spec} must return a list of floats (one "
                            f"per completion), got {type(values).__name__}"
                            + ("" if ndim is None else f" of {ndim} dimensions"))
        if len(values) != len(completions):
            raise UserError(f"reward function {self.spec} returned {len(values)} values for "
                            f"{len(completions)} completions; return one float per completion")
        out = []
        for i, value in enumerate(values):
            try:
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"reward function {self.spec} returned {value!r} (a "
                                f"{type(value).__name__}) for completion {i}; return floats"
                                ) from None
        return out


RewardSource = ModelReward | FunctionReward


@dataclass(frozen=True)
class RewardOutput:
    """Rewards of one rollout batch of ``N`` completions."""

    total: torch.Tensor
    """(N,) float32: clipped weighted sum, minus the missing-EOS penalty."""
    per_source: dict[str, torch.Tensor]
    """Each source's raw (unweighted, normalised for models) rewards, (N,) each; an ensemble
    adds ``<name>/uncertainty``, the std across its heads, and a --group-heads model
    ``<name>/group/<group>``, each group's own (normalised) head."""

    def metrics(self) -> dict[str, float]:
        """``reward/<source>/mean|std`` per source plus ``reward/mean|std`` of the total."""
        out = {}
        for name, values in {**self.per_source, "total": self.total}.items():
            key = "reward" if name == "total" else f"reward/{name}"
            out[f"{key}/mean"] = float(values.mean())
            out[f"{key}/std"] = float(values.std()) if values.numel() > 1 else 0.0
        return out


class Rewards:
    """Weighted sum of reward sources with clipping and a missing-EOS penalty."""

    def __init__(self, specs: Sequence[RewardSpec], *, reward_clip: float | None = None,
                 missing_eos_penalty: float = 0.0, device: str = "auto",
                 batch_size: int = 16, max_length: int | None = None,
                 uncertainty_penalty: float = 0.0,
                 model_reward: Callable[[str], Any] | None = None,
                 flag: str = "--reward") -> None:
        """``uncertainty_penalty``: λ of every reward-model ensemble's mean - λ x std.
        ``flag`` is the option that named the sources (--reward, --judge, --gold), for messages.
        ``model_reward(spec)``, when given, supplies the source of a reward-model directory
        (e.g. one scored by a Ray actor); it returns None to load the model here."""
        if not specs:
            raise UserError(f"give at least one {flag} (a reward-model dir or "
                            "package.module:function)")
        self.sources: list[tuple[str, float, RewardSource]] = []
        for spec in specs:
            source: RewardSource
            if _FUNCTION_SPEC.match(spec.spec) and not Path(spec.spec).exists():
                if spec.mix:
                    raise UserError(f"{flag} {spec.spec}: a group mix needs a reward model "
                                    "trained with --group-heads, not a function")
                source = FunctionReward(spec.spec, flag)
            elif not Path(spec.spec).expanduser().exists():
                raise UserError(f"{flag} {spec.spec}: neither an existing reward-model "
                                "directory nor package.module:function")
            else:
                # A group mix (or an uncertainty penalty) is scored where it is named (reward
                # actors serve plain heads).
                remote = (model_reward(spec.spec) if model_reward is not None and not spec.mix
                          and not uncertainty_penalty else None)
                source = remote or ModelReward(spec.spec, device=device, batch_size=batch_size,
                                               max_length=max_length, mix=spec.mix,
                                               uncertainty_penalty=uncertainty_penalty,
                                               flag=flag)
            name = source.name
            taken = {n for n, _, _ in self.sources}
            suffix = 2
            while name in taken:
                name, suffix = f"{source.name}_{suffix}", suffix + 1
            self.sources.append((name, spec.weight, source))
        self.reward_clip = reward_clip
        self.missing_eos_penalty = missing_eos_penalty

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.sources]

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str], *,
                 has_eos: Sequence[bool], completion_ids: Sequence[Sequence[int]],
                 **extra: Any) -> RewardOutput:
        """Score ``N`` (prompt, completion text) pairs; ``extra`` goes to reward functions."""
        shown = [[{"role": "assistant", "content": c}] if is_chat(p) else c
                 for p, c in zip(prompts, completions, strict=True)]
        kwargs = {"completion_ids": [list(c) for c in completion_ids],
                  "has_eos": [bool(e) for e in has_eos], **extra}
        total = torch.zeros(len(completions), dtype=torch.float32)
        per_source = {}
        for name, weight, source in self.sources:
            values = torch.tensor(source(prompts, shown, **kwargs), dtype=torch.float32)
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                i = int(bad[0])
                raise TrainingError(
                    f"reward {name!r} gave {values[i].item()} for completion {i} "
                    f"({completions[i][:80]!r}); rewards must be finite")
            per_source[name] = values
            if isinstance(source, ModelReward):
                if source.last_std is not None:
                    per_source[f"{name}/uncertainty"] = torch.tensor(source.last_std)
                for group, by_group in source.last_by_group.items():
                    per_source[f"{name}/group/{group}"] = torch.tensor(by_group)
            total += weight * values
        if self.reward_clip is not None:
            total = total.clamp(-self.reward_clip, self.reward_clip)
        if self.missing_eos_penalty:
            ended = torch.as_tensor(list(has_eos), dtype=torch.bool)
            total = total - self.missing_eos_penalty * (~ended).float()
        return RewardOutput(total=total, per_source=per_source)
