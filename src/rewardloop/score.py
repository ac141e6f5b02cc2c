"""Scoring answers with a trained reward model: the library behind ``rewardloop score``, and a
reward source for RL (``RewardScorer`` has TRL's reward-function signature).

A reward model is a sequence classifier whose head (``score``) reads the hidden state of the
last real token of ``prompt + answer + EOS`` (``ops.last_token_index``; an off-by-one here is a
classic silent bug). An ensemble (``train rm --ensemble K``) has K heads on one shared trunk:
its reward is the mean of the heads and its uncertainty their standard deviation.

Next to the weights, ``reward_stats.json`` (written by ``train rm``) holds the mean and standard
deviation of the rewards on held-out data, the ensemble size and the tokenisation limits, so a
scorer can normalise rewards to mean 0 / std 1 and encode exactly as in training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rewardloop.data.formats import read_training_records
from rewardloop.data.records import Text, is_chat
from rewardloop.errors import UserError
from rewardloop.models import (
    ENSEMBLE_KEY,
    GROUP_HEADS_KEY,
    HFModel,
    is_peft,
    load_reward_model,
    load_tokenizer,
)
from rewardloop.ops import last_token_index, position_ids
from rewardloop.tokenize import collate, encode
from rewardloop.util.files import atomic_write_text, check_output_file
from rewardloop.util.progress import progress_bar

log = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"


def trunk_states(model: nn.Module, classifier: HFModel, **inputs: Any) -> torch.Tensor:
    """The trunk's last hidden state (N, T, H) of a sequence-classification model, taken by a
    hook during the model's OWN forward: DDP syncs gradients and FSDP2 gathers weights and
    reduces gradients only around the root forward, never around a submodule called alone.
    ``model`` is what to call (possibly DDP/FSDP-wrapped), ``classifier`` the HF model in it."""
    trunk = getattr(classifier, classifier.base_model_prefix)
    seen: list[torch.Tensor] = []
    handle = trunk.register_forward_hook(
        lambda _module, _args, output: seen.append(output.last_hidden_state))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


def rewards_of(model: HFModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards of a right- or left-padded batch: (N, T) ids and mask -> (N, K) heads.

    Takes the trunk's hidden state at ``ops.last_token_index(attention_mask)`` and applies the
    head there (LoRA layers and peft's trainable head copy act in place, so a peft model works
    the same). Models without a ``score`` head use their own pooling.
    """
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    classifier = inner.get_base_model() if is_peft(inner) else inner
    head = getattr(classifier, "score", None)
    if getattr(classifier, getattr(classifier, "base_model_prefix", ""), None) is None \
            or head is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits
    # Positions over real tokens, so a left-padded row scores as it would alone (models with
    # absolute positions, GPT-2's, would otherwise read it shifted).
    hidden = trunk_states(model, classifier, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"],
                          position_ids=position_ids(batch["attention_mask"]))  # (N, T, H)
    last = last_token_index(batch["attention_mask"])  # (N,)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return head(hidden[rows, last])  # (N, K)


def resolve_rm_dir(path: str | Path) -> Path:
    """A reward-model directory: ``path`` itself, or ``path/model`` for a ``train rm`` run dir."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"reward model {p} does not exist")
    if (p / "model").is_dir() and not (p / "config.json").is_file() \
            and not (p / "adapter_config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise UserError(f"{path} is neither a reward-model directory nor a train rm run "
                        "directory (no config.json or model/)")
    return p


def text_form(rows: Iterable[tuple[Text | None, Text | None]]) -> str | None:
    """How (prompt, answer) rows are rendered: "chat" when every row is a conversation (its
    prompt or answer a chat list: the chat template renders it), "text" when none is, "mixed"
    otherwise; None for no rows. A reward model saves the form it was trained on
    (``reward_stats.json``), so scoring the other form can be flagged."""
    forms = {"chat" if (p is not None and is_chat(p)) or (a is not None and is_chat(a))
             else "text" for p, a in rows}
    return None if not forms else forms.pop() if len(forms) == 1 else "mixed"


def read_stats(model_dir: Path) -> dict[str, Any] | None:
    """``reward_stats.json`` of a reward-model directory, or None when it has none."""
    file = Path(model_dir) / STATS_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}: not valid JSON ({exc})") from None


def ensemble_size(model_dir: Path) -> int:
    """Heads of the reward model in ``model_dir`` (1 for a plain reward model)."""
    stats = read_stats(model_dir) or {}
    config = Path(model_dir) / "config.json"
    from_config = json.loads(config.read_text()).get(ENSEMBLE_KEY) if config.is_file() else None
    return int(stats.get("ensemble") or from_config or 1)


def group_heads(model_dir: Path) -> list[str]:
    """The annotator group of each head of a ``train rm --group-heads`` model (else [])."""
    config = Path(model_dir) / "config.json"
    names = json.loads(config.read_text()).get(GROUP_HEADS_KEY) if config.is_file() else None
    return [str(n) for n in names or []]


def load_scoring_model(model_dir: Path, *, device: str = "auto", dtype: str = "auto",
                       trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """(reward model in eval mode, tokenizer) from a reward-model directory."""
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code,
                               padding_side="right")
    model = load_reward_model(model_dir, dtype=dtype, device=device, trainable=False,
                              trust_remote_code=trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id,
                              heads=ensemble_size(model_dir))
    model.eval()
    return model, tokenizer


@dataclass(frozen=True)
class Scores:
    """Rewards of N answers: ``mean`` (N,), and ``std`` (N,) across ensemble heads or None."""

    mean: list[float]
    std: list[float] | None
    heads: Any = None
    """(N, K) tensor: every head's reward, as ``mean`` averages them (None: not kept)."""


class RewardScorer:
    """Batched scoring of (prompt, answer) pairs with a reward model (run dir or model dir).

    ``normalize=True`` maps rewards to (r - mean) / std with ``reward_stats.json`` (RL wants
    rewards on a fixed scale). Answers are encoded as in training (prompt, answer, EOS) and cut
    to the training ``max_length`` unless one is given.
    """

    def __init__(self, path: str | Path, device: str = "auto", batch_size: int = 32, *,
                 normalize: bool = False, max_length: int | None = None,
                 dtype: str = "auto") -> None:
        if batch_size < 1:
            raise UserError("batch size must be at least 1")
        self.model_dir = resolve_rm_dir(path)
        self.model, self.tokenizer = load_scoring_model(self.model_dir, device=device,
                                                        dtype=dtype)
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size
        self.stats = read_stats(self.model_dir) or {}
        self.heads = ensemble_size(self.model_dir)
        self.group_heads = group_heads(self.model_dir)
        self.max_length = int(max_length or self.stats.get("max_length") or 1024)
        self.max_prompt_length = self.stats.get("max_prompt_length")
        self.normalize = normalize
        self._form_warned = False
        if normalize and not {"mean", "std"} <= set(self.stats):
            raise UserError(
                f"{self.model_dir} has no {STATS_FILE} (the mean/std of its scores that train "
                "rm writes), so its rewards cannot be normalised: train it further with "
                f"`train rm --model {self.model_dir}`, or use it unnormalised through a reward "
                "function (`rewardloop.score.RewardScorer(DIR)` has TRL's signature; "
                "docs/rl.md, Rewards)")

    def __call__(self, prompts: Sequence[Text], completions: Sequence[Text], **_: Any
                 ) -> list[float]:
        """TRL's reward-function signature: one float per (prompt, completion)."""
        return self.score(prompts, completions)

    def score(self, prompts: Sequence[Text], completions: Sequence[Text]) -> list[float]:
        """The reward of each (prompt, completion): the mean over heads of an ensemble."""
        return self.score_with_std(prompts, completions).mean

    def score_with_std(self, prompts: Sequence[Text], completions: Sequence[Text], *,
                       progress: Any = None) -> Scores:
        """Rewards (the mean over heads) and, for an ensemble, their std across heads, in the
        input order. A --group-heads model's heads are each normalised by its own stats first,
        with ``normalize`` or without (its raw heads have no common scale): its reward is the
        groups' equal mix, not a mean in which the group whose head spreads widest counts most.

        ``progress``: an optional callable ``progress(done)`` told how many answers are scored.
        """
        heads = self._raw_heads(prompts, completions, progress=progress)
        if self._own_head_stats():
            heads = self._by_own_stats(heads)
        elif self.normalize:  # the mean over heads is what the stats describe
            heads = (heads - float(self.stats["mean"])) / self._shared_std()
        std = heads.std(dim=1, unbiased=False).tolist() if self.heads > 1 else None
        return Scores(heads.mean(dim=1).tolist(), std, heads)

    def score_heads(self, prompts: Sequence[Text], completions: Sequence[Text], *,
                    progress: Any = None) -> Any:
        """(N, K) rewards of every head in the input order. With ``normalize``: an ensemble's
        heads all by the stats of their mean (their spread stays the model's uncertainty); a
        --group-heads model's each by its own (``head_mean``/``head_std``), so one group's
        reward has mean 0 / std 1 however much the groups disagree."""
        heads = self._raw_heads(prompts, completions, progress=progress)
        if not self.normalize:
            return heads
        if self._own_head_stats():
            return self._by_own_stats(heads)
        return (heads - float(self.stats["mean"])) / self._shared_std()

    def _own_head_stats(self) -> bool:
        """Whether each head is normalised by its own stats: a --group-heads model's are."""
        return bool(self.group_heads) and {"head_mean", "head_std"} <= set(self.stats)

    def _by_own_stats(self, heads: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.stats["head_mean"], dtype=heads.dtype)
        std = torch.tensor(self.stats["head_std"], dtype=heads.dtype).clamp(min=1e-8)
        return (heads - mean) / std

    def _check_form(self, prompts: Sequence[Text], completions: Sequence[Text]) -> None:
        """Warn once when asked to score text in another form than the model was trained on:
        the chat template's markup changes the scores and their normalisation."""
        trained = self.stats.get("text_form")
        given = text_form(zip(prompts, completions, strict=True))
        if self._form_warned or trained not in ("chat", "text") or given in (None, trained):
            return
        self._form_warned = True
        log.warning("%s was trained on %s rows but is scoring %s rows: its rewards (and their "
                    "normalisation) are for %s; give it rows in the form it was trained on",
                    self.model_dir, trained, given, trained)

    def _shared_std(self) -> float:
        return max(float(self.stats["std"]), 1e-8)

    def _raw_heads(self, prompts: Sequence[Text], completions: Sequence[Text], *,
                   progress: Any = None) -> torch.Tensor:
        """(N, K) unnormalised rewards of every head, in the input order."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        self._check_form(prompts, completions)
        encoded = [encode(self.tokenizer, p, c, max_length=self.max_length,
                          max_prompt_length=self.max_prompt_length)
                   for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # little padding
        heads = torch.empty(len(encoded), self.heads, dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = collate([encoded[i] for i in idx], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                heads[idx] = rewards_of(self.model, batch).float().cpu()
                if progress is not None:
                    progress(start + len(idx))
        return heads


# ---------------------------------------------------------------------------------------------
# Scoring a file (``rewardloop score``)
# ---------------------------------------------------------------------------------------------

PAIR_FORMATS = ("trl", "hh", "ultrafeedback")
LIST_FORMATS = ("candidates", "ranking")
SINGLE_FORMATS = ("sft", "kto")


def _answers(fmt: str, record: Any) -> list[tuple[Text, Text]]:
    """The (prompt, answer) pairs of one record, in the order their scores are written."""
    if fmt in PAIR_FORMATS:
        return [(record.prompt, record.chosen), (record.prompt, record.rejected)]
    if fmt in LIST_FORMATS:
        return [(record.prompt, r) for r in record.responses]
    if fmt == "kto":
        return [(record.prompt, record.completion)]
    if record.text is not None:
        raise UserError("sft rows with only 'text' have no prompt/answer split to score; give "
                        "prompt + completion (or messages) rows")
    return [record.prompt_completion()]


def _put(fmt: str, row: dict[str, Any], mean: list[float], std: list[float] | None,
         by_group: dict[str, list[float]] | None = None) -> None:
    """Add the scores of ``row``'s answers to it; ``by_group``: a --group-heads model's reward
    for each group (its own normalised head), per answer."""
    columns = {"": mean, "_std": std, "_by_group": by_group}
    for suffix, values in columns.items():
        if values is None:
            continue
        if fmt in PAIR_FORMATS:
            for i, side in enumerate(("chosen", "rejected")):
                row[f"score_{side}{suffix}"] = (
                    {g: v[i] for g, v in values.items()} if isinstance(values, dict)
                    else values[i])
        elif fmt in LIST_FORMATS:
            row[f"scores{suffix}"] = values
        else:
            row[f"score{suffix}"] = ({g: v[0] for g, v in values.items()}
                                     if isinstance(values, dict) else values[0])


def _rows_of(fmt: str, path: Path, records: Sequence[Any]) -> list[dict[str, Any]]:
    """The rows to write: the input objects (extra fields kept), or for ultrafeedback, whose
    rows expand into several pairs, one trl row per pair."""
    if fmt == "ultrafeedback":
        return [{k: v for k, v in (("prompt", r.prompt), ("chosen", r.chosen),
                                   ("rejected", r.rejected), ("margin", r.margin),
                                   ("annotator", r.annotator), ("id", r.id)) if v is not None}
                for r in records]
    from rewardloop.data.sources import open_source
    from rewardloop.data.sources import rows as source_rows

    rows = [obj for _, obj in source_rows(open_source(path))]
    if len(rows) != len(records):
        raise UserError(f"{path}: {len(rows)} rows gave {len(records)} records; cannot align")
    return rows


def score_file(rm: str | Path, data: str | Path, out: str | Path, *, batch_size: int = 32,
               normalize: bool = False, data_format: str | None = None,
               device: str = "auto",
               score_pairs: Callable[[list[tuple[Text, Text]]], Scores] | None = None) -> int:
    """Score every answer in ``data`` and write the rows with their scores to ``out``.

    Pairwise rows get ``score_chosen``/``score_rejected``, candidates and ranking rows
    ``scores``, prompt/completion (sft, kto) rows ``score``; an ensemble adds ``*_std``, a
    --group-heads model ``*_by_group`` (each group's own reward) too. The
    output is written atomically; an ``out`` that is a directory or one of the inputs is refused
    before anything is read. Returns the number of rows written. ``score_pairs`` scores
    the (prompt, answer) pairs in order elsewhere (``score --ray``) instead of loading the
    model here.
    """
    data, rm = Path(data), resolve_rm_dir(rm)
    out = check_output_file(out, flag="--out", inputs=(data, rm))
    fmt, records = read_training_records(data, data_format)
    if fmt not in PAIR_FORMATS + LIST_FORMATS + SINGLE_FORMATS:
        raise UserError(f"{data}: {fmt} rows hold no answers to score; give pairwise, "
                        "candidates, ranking or prompt/completion rows (generate answers for "
                        "prompts first)")
    answers = [_answers(fmt, r) for r in records]
    rows = _rows_of(fmt, data, records)
    flat = [pair for group in answers for pair in group]
    groups: list[str] = []
    if score_pairs is not None:
        scores = score_pairs(flat)
    else:
        scorer = RewardScorer(rm, device, batch_size, normalize=normalize)
        groups = scorer.group_heads
        with progress_bar(len(flat), "score") as show:
            scores = scorer.score_with_std([p for p, _ in flat], [a for _, a in flat],
                                           progress=show)
    start = 0
    for row, group in zip(rows, answers, strict=True):
        end = start + len(group)
        _put(fmt, row, scores.mean[start:end],
             scores.std[start:end] if scores.std is not None else None,
             {g: scores.heads[start:end, i].tolist() for i, g in enumerate(groups)}
             if groups and scores.heads is not None else None)
        start = end
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(out, text)
    return len(rows)


def heads_of(rm_dir: str | Path, *, device: str = "auto", batch_size: int = 32
             ) -> Callable[[Sequence[Text], Sequence[str]], np.ndarray]:
    """A function giving the (N, K) scores of every head of the ensemble reward model in
    ``rm_dir`` (``RewardScorer.score_heads``: directory checks, training ``max_length``,
    batching), as ``feedback.select.uncertainty_scores`` wants it."""
    scorer = RewardScorer(rm_dir, device=device, batch_size=batch_size)
    if scorer.heads < 2:
        raise UserError(f"{rm_dir} is a single reward model; uncertainty selection needs an "
                        "ensemble (train rm --ensemble K, K >= 2)")

    def score(prompts: Sequence[Text], completions: Sequence[str]) -> np.ndarray:
        return np.asarray(scorer.score_heads(prompts, completions).numpy(), dtype=np.float64)

    return score
