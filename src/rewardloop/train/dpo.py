"""Direct preference optimisation from a preference file: DPO, cDPO, IPO, robust DPO, KTO,
and the reference-free SimPO and ORPO.

One explicit loop (``train_dpo``). What differs between the losses is chosen ONCE, by name, in
``OBJECTIVES``: which data kind a loss reads (pairs, or unpaired thumbs up/down for KTO), how a
micro-batch is scored, and which pure loss of ``rewardloop.losses`` turns log-probs into the
loss. The loop never branches on the loss.

Every example is two sequences, scored together in one (2B, T) forward pass:

- pairwise losses: ``(prompt + chosen, prompt + rejected)``;
- KTO: ``(prompt + completion, prompt + mismatched completion)``; the mismatched one (another
  row's answer, fixed per example by the seed) only feeds KTO's KL reference point z0
  (Ethayarajh et al. 2024, §4.1). Fixing the partner per example lets the reference log-probs be
  cached like DPO's, and z0 is measured over the whole optimizer step, so it does not change with
  gradient accumulation.

Reference log-probs log π_ref(y|x) are computed once, before training, in batched no-grad
passes, cached (N, 2) and saved in the run directory (a resumed run reads them back). The
reference is ``--ref-model``, else the initial policy, else (with LoRA) the base model with the
adapter disabled, so no second copy of the model is kept. ``precompute_ref=False`` scores the
reference on the fly every step instead (same numbers; used to test the cache). SimPO and ORPO
compare with no reference: none is loaded or scored (their ``ref`` is zeros).

Losses are normalised by the number of pairs (and, for the RPO NLL term, chosen tokens) in the
whole optimizer step, so gradient accumulation does not change the update.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardloop import losses
from rewardloop.data.formats import read_training_records
from rewardloop.data.records import Record
from rewardloop.errors import DataError, UserError
from rewardloop.metrics import annotator_groups, primary_group
from rewardloop.models import (
    HFModel,
    LoraSettings,
    disable_adapter,
    disable_dropout,
    load_policy,
    load_tokenizer,
    match_tokenizer,
)
from rewardloop.train.checkpoint import restore_weights
from rewardloop.train.comparisons import StoredAnnotators, annotator_info, annotator_weight
from rewardloop.train.configs import DPOConfig
from rewardloop.train.data import LengthGroupedSampler, rank_micro_batches, scheduler
from rewardloop.train.dpo_objectives import OBJECTIVES, Example, Objective, score_all
from rewardloop.train.early_stop import BestPoint, evaluation_due
from rewardloop.train.group_balance import (
    GroupDRO,
    balanced_group_names,
    group_summary,
    warn_lost_groups,
)
from rewardloop.train.run import (
    RunDir,
    adamw,
    save_checkpoint,
)
from rewardloop.train.runtime import Runtime, runtime_for
from rewardloop.train.split import split_records
from rewardloop.train.step import accumulate
from rewardloop.util.files import atomic_file
from rewardloop.util.progress import progress_bar
from rewardloop.util.seed import seed_everything

log = logging.getLogger(__name__)

REF_CACHE = "ref_logps.pt"


# ---------------------------------------------------------------------------------------------
# Data and reference log-probs
# ---------------------------------------------------------------------------------------------


def read_rows(path: Path, cfg: DPOConfig, objective: Objective) -> list[Record]:
    """Read ``path`` and refuse data of the wrong kind for the loss (pairs vs unpaired)."""
    fmt, records = read_training_records(path, cfg.data_format)
    if fmt not in objective.formats:
        other = "--loss kto" if objective.kind == "pairwise" else "--loss dpo (or ipo, ...)"
        raise DataError(f"holds {fmt} rows, but --loss {cfg.loss} trains on {objective.kind} "
                        f"rows ({', '.join(objective.formats)}); convert the data or use "
                        f"{other}", path=str(path))
    return records


def load_examples(path: Path, cfg: DPOConfig, objective: Objective, tokenizer: Any
                  ) -> list[Example]:
    """The examples of ``path`` (refused when of the wrong kind for the loss)."""
    return build_examples(path, read_rows(path, cfg, objective), cfg, objective, tokenizer)


def load_splits(cfg: DPOConfig, objective: Objective, tokenizer: Any,
                groups: Mapping[str, Sequence[str]]) -> dict[str, list[Example]]:
    """``{"train": ..., "eval": ...}``: --eval-data, or --eval-fraction of --data split by
    prompt and stratified by annotator group (``groups``: annotator -> groups), the split
    ``train rm`` makes, so every group has held-out pairs; no "eval" without either."""
    records = read_rows(cfg.data, cfg, objective)
    if cfg.eval_data is not None:
        return {"train": build_examples(cfg.data, records, cfg, objective, tokenizer),
                "eval": load_examples(cfg.eval_data, cfg, objective, tokenizer)}
    if cfg.eval_fraction > 0:
        train, held = split_records(records, groups, cfg.eval_fraction, cfg.seed)
        return {"train": build_examples(cfg.data, train, cfg, objective, tokenizer),
                "eval": build_examples(cfg.data, held, cfg, objective, tokenizer)}
    return {"train": build_examples(cfg.data, records, cfg, objective, tokenizer)}


def build_examples(path: Path, records: Sequence[Record], cfg: DPOConfig, objective: Objective,
                   tokenizer: Any) -> list[Example]:
    """The loss's examples of ``records`` (read from ``path``); none at all is refused."""
    examples = objective.build(records, tokenizer, cfg)
    if not examples:
        raise DataError("has no usable examples (every pair is a tie)", path=str(path))
    cut = sum(not (e.first.has_eos and e.second.has_eos) for e in examples)
    if cut:
        log.warning("%s: %d of %d examples were cut at max_length=%d (no EOS)", path, cut,
                    len(examples), cfg.max_length)
    return examples


Scorer = Callable[[Sequence[Example]], torch.Tensor]


def _reference_scorer(cfg: DPOConfig, policy: HFModel, pad_id: int, rt: Runtime) -> Scorer:
    """How to score examples under π_ref: (N, 2) no-grad log-probs.

    ``--ref-model`` is loaded as a frozen model. Otherwise, with LoRA, the policy with its
    adapter disabled IS the base model. Otherwise the reference is the initial policy: itself
    when scoring once before training, or a frozen copy when scoring on the fly.
    """
    def with_model(model: nn.Module) -> Scorer:
        def scorer(examples: Sequence[Example]) -> torch.Tensor:
            with rt.autocast():
                return score_all(model, examples, pad_id, cfg.mean_logps,
                                 cfg.ref_batch_size)
        return scorer

    if cfg.ref_model is not None:
        ref: HFModel = load_policy(cfg.ref_model, dtype=rt.frozen_dtype(cfg.dtype),
                          device=str(rt.device), trust_remote_code=cfg.trust_remote_code,
                          trainable=False)
        if ref.get_input_embeddings().num_embeddings != policy.get_input_embeddings(
                ).num_embeddings:
            raise UserError(f"--ref-model {cfg.ref_model} has a different vocabulary size than "
                            f"the policy {cfg.model}; both must share the tokenizer")
        frozen = disable_dropout(ref.eval().requires_grad_(False))
        return with_model(rt.prepare(frozen, trainable=False))
    if cfg.lora_r is not None:
        def base_scorer(examples: Sequence[Example]) -> torch.Tensor:
            with disable_adapter(policy):
                return with_model(policy)(examples)
        return base_scorer
    if cfg.precompute_ref:
        return with_model(policy)
    import copy

    # Frozen: kept in the compute precision, not in the policy's fp32 master weights.
    frozen = copy.deepcopy(policy).eval().requires_grad_(False).to(rt.compute_dtype)
    return with_model(rt.prepare(frozen, trainable=False))


def _fingerprint(cfg: DPOConfig, splits: Mapping[str, Sequence[Example]]) -> str:
    """What the cached reference log-probs depend on: the options, and which examples each
    split holds in which order (a resume whose --exclude-flagged left out other annotators,
    or whose --data changed in place, must not line up the cache with other pairs)."""
    keys = ("model", "ref_model", "lora_r", "data", "eval_data", "eval_fraction", "data_format",
            "loss",
            "max_length", "max_prompt_length", "mean_logps", "seed", "dtype")
    digests = {}
    for name, examples in splits.items():
        h = hashlib.sha256()
        for e in examples:  # lengths, last tokens and annotator: cheap, and enough to tell
            h.update(repr((len(e.first), len(e.second), e.first.input_ids[-8:],
                           e.second.input_ids[-8:], e.annotator)).encode())
        digests[name] = h.hexdigest()
    return json.dumps({**{k: str(getattr(cfg, k)) for k in keys}, "examples": digests},
                      sort_keys=True)


def reference_logps(cfg: DPOConfig, policy: nn.Module, pad_id: int,
                    splits: dict[str, list[Example]], run_dir: Path, rt: Runtime,
                    objective: Objective, drawn: Sequence[int] | None = None
                    ) -> tuple[Callable[[str, Sequence[int]], torch.Tensor],
                               dict[str, Any] | None]:
    """``ref(split, indices) -> (b, 2)`` reference log-probs, cached unless precompute_ref=False,
    and the cache still to be written to ``run_dir/ref_logps.pt`` (``write_reference_cache``,
    once the run has started; None when there is nothing new to write).

    ``drawn``: the training rows the run will draw (``LengthGroupedSampler.rows_drawn``; None:
    all), the only ones scored: a short run (``--max-steps`` under an epoch) of a large file
    does not wait for the reference to score pairs it never trains on. A resumed run reads the
    cache back when it holds every row it needs. Call before any optimizer step and before a
    checkpoint is restored (the reference is the initial policy). A loss without a reference
    (``objective.reference`` False) gets zeros.
    """
    if not objective.reference:
        return (lambda split, idx: torch.zeros(len(idx), 2)), None
    whole = _reference_scorer(cfg, policy, pad_id, rt)

    def scorer(examples: Sequence[Example], only: Sequence[int] | None = None) -> torch.Tensor:
        return shard_scores(whole, examples, cfg.ref_batch_size, rt, only)

    if not cfg.precompute_ref:
        return (lambda split, idx: scorer([splits[split][i] for i in idx])), None
    path, fingerprint = run_dir / REF_CACHE, _fingerprint(cfg, splits)
    needed = {name: (list(drawn) if name == "train" and drawn is not None
                     else range(len(examples))) for name, examples in splits.items()}
    if cfg.resume and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") == fingerprint and all(
                saved.get(k) is not None and len(saved[k]) == len(v)
                and not saved[k][list(needed[k])].isnan().any() for k, v in splits.items()):
            log.info("read cached reference log-probs from %s", path)
            return _lookup(saved), None
    cache = {}
    for name, examples in splits.items():
        rows = needed[name]
        if len(rows) < len(examples):
            log.info("scoring the reference on the %d of %d %s pairs the run's %d steps draw "
                     "(with the pairs that share their scoring batches)", len(rows),
                     len(examples), name, cfg.max_steps)
        cache[name] = scorer(examples, rows if len(rows) < len(examples) else None)
    return _lookup(cache), {"fingerprint": fingerprint, **cache}


def _lookup(cache: Mapping[str, torch.Tensor]) -> Callable[[str, Sequence[int]], torch.Tensor]:
    """``ref(split, indices)`` reading ``cache``; a row it does not hold (NaN: never drawn when
    it was made) is an error, not a number."""
    def ref(split: str, idx: Sequence[int]) -> torch.Tensor:
        got = cache[split][list(idx)]
        if got.isnan().any():
            raise RuntimeError(f"no cached reference log-probs for some {split} rows: the "
                               "cache was made for a shorter run")
        return got
    return ref


def shard_scores(scorer: Scorer, examples: Sequence[Example], batch_size: int, rt: Runtime,
                 only: Sequence[int] | None = None) -> torch.Tensor:
    """``scorer``'s (N, 2) log-probs of ``examples`` on every rank, each rank scoring its share
    of the batches (``Runtime.map_chunks``): the batches ``score_all`` makes (``batch_size``
    examples of similar length), so the figures equal one process's. ``only``: score just the
    batches that hold one of these rows (NaN elsewhere); each row scored gets the very number
    scoring everything gives it (the same batch, the same padding)."""
    order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
    starts = list(range(0, len(order), batch_size))
    if only is not None:
        wanted = set(only)
        starts = [k for k in starts if wanted.intersection(order[k:k + batch_size])]
    chunks = rt.map_chunks(len(starts), lambda k: scorer(
        [examples[i] for i in order[starts[k]:starts[k] + batch_size]]).float().cpu())
    out = torch.zeros(len(examples), 2) if only is None else torch.full((len(examples), 2),
                                                                        math.nan)
    if chunks:
        rows = [i for k in starts for i in order[k:k + batch_size]]
        out[rows] = torch.cat(chunks)
    return out


def write_reference_cache(run_dir: Path, cache: dict[str, Any] | None, rt: Runtime) -> None:
    """Save the cache ``reference_logps`` computed (rank 0), for a resume to read back."""
    if cache is not None and rt.is_main:
        with atomic_file(run_dir / REF_CACHE, binary=True) as fh:
            torch.save(cache, fh)


# ---------------------------------------------------------------------------------------------
# One optimizer step, evaluation, the loop
# ---------------------------------------------------------------------------------------------


def _labels(examples: Sequence[Example], device: torch.device) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], dtype=torch.bool, device=device)


def _completion_tokens(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([sum(e.first.completion_mask) for e in examples], dtype=torch.float32)


def _nll(first_logps: torch.Tensor, examples: Sequence[Example], average: bool,
         global_tokens: float, coefs: torch.Tensor | None = None) -> torch.Tensor:
    """RPO's token-mean NLL of the chosen answers over the whole step, from sequence log-probs.

    A summed sequence log-prob is the sum of its token log-probs, so Σ_rows -sum / tokens_in_step
    is exactly the token-mean NLL; mean log-probs are turned back into sums first. With
    ``coefs`` (the pairs' weights, ``step_coefficients``) each pair's tokens count c_i times,
    and ``global_tokens`` is the step's weighted count Σ c_i n_i.
    """
    n = _completion_tokens(examples).to(first_logps.device)
    sums = first_logps * n if average else first_logps  # (b,)
    if coefs is not None:
        sums = sums * coefs
    loss, _ = losses.nll_loss(sums.unsqueeze(-1), torch.ones_like(sums).unsqueeze(-1),
                              global_tokens=global_tokens)
    return loss


@dataclass
class StepResult:
    """What one optimizer step measured (all detached)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    local_loss: float = 0.0
    """This rank's share of ``loss`` (the finite check names the rank it came from)."""
    group_losses: dict[str, float] = field(default_factory=dict)
    """Mean loss of each annotator group in the step (when groups are given)."""


def weighted_loss(objective: Objective, logps: torch.Tensor, ref: torch.Tensor,
                  labels: torch.Tensor, z0: torch.Tensor, cfg: DPOConfig, count: float,
                  coefs: torch.Tensor) -> torch.Tensor:
    """Σ_i c_i loss_i / ``count`` over a micro-batch, coefs (b,): the losses take one global
    count, so rows are grouped by coefficient and a group of c divides by count / c."""
    loss = logps.new_zeros(())
    for c in torch.unique(coefs).tolist():
        if c > 0:
            sel = coefs == c
            part, _ = objective.loss(logps[sel], ref[sel], labels[sel], z0, cfg, count / c)
            loss = loss + part
    return loss


def step_coefficients(dro: GroupDRO | None, group_ids: Sequence[str] | None,
                      weights: Sequence[float] | None) -> torch.Tensor | None:
    """(B,) c_i, Σ_i c_i = B, so that the step's loss Σ_i c_i loss_i / B is the
    ``weights``-weighted mean of the pairs' losses; with ``dro`` (and ``group_ids``) the
    q-weighted mean of the groups' weighted mean losses (``GroupDRO.item_weights``: c_i =
    B w_i q_g / (W_g Σ_{g in step} q_g)). None when there is neither: every pair weighs 1."""
    if dro is None and weights is None:
        return None
    n = len(group_ids) if group_ids is not None else len(weights or ())
    w = list(weights) if weights is not None else [1.0] * n
    if dro is not None and group_ids is not None:
        w = dro.item_weights(group_ids, w)
    t = torch.tensor(w, dtype=torch.float64)
    total = float(t.sum())
    return (t * len(t) / total).float() if total > 0 else torch.zeros(len(t))


def _group_losses(objective: Objective, logps: torch.Tensor, ref: torch.Tensor,
                  labels: torch.Tensor, z0: torch.Tensor, cfg: DPOConfig,
                  group_ids: Sequence[str]) -> dict[str, float]:
    out = {}
    for g in sorted(set(group_ids)):
        sel = torch.tensor([x == g for x in group_ids], device=logps.device)
        loss, _ = objective.loss(logps[sel], ref[sel], labels[sel], z0, cfg, None)
        out[g] = float(loss)
    return out


def train_step(rt: Runtime, policy: nn.Module, objective: Objective,
               examples: Sequence[Example], ref: torch.Tensor, cfg: DPOConfig, pad_id: int,
               group_ids: Sequence[str] | None = None, dro: GroupDRO | None = None,
               weights: Sequence[float] | None = None) -> StepResult:
    """Accumulate the gradient of one optimizer step over this rank's micro-batches (no
    optimizer call); the loss and metrics returned are the whole step's, on every rank.

    ``ref`` (B, 2) reference log-probs of ``examples``. Each micro-batch loss is divided by the
    step's pair count (and chosen-token count), so the summed gradient equals the full batch's.
    With ``dro`` the groups (``group_ids``, one per example) are weighed by its q; with
    ``weights`` (one per example: its annotator's reliability) each pair by its weight.
    """
    device = ref.device
    labels = _labels(examples, device)
    with rt.autocast():
        z0 = objective.reference_point(policy, examples, ref, pad_id, cfg,
                                       cfg.micro_batch_size)
    nll_coef = cfg.nll_coef + objective.sft_weight
    seen: dict[int, torch.Tensor] = {}
    coefs = step_coefficients(dro, group_ids, weights)
    coefs = coefs.to(device) if coefs is not None else None
    tokens = _completion_tokens(examples)
    chosen_tokens = float((tokens * coefs.cpu()).sum() if coefs is not None else tokens.sum())

    def loss_of(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        mb_examples = [examples[i] for i in indices]
        logps = objective.forward(policy, mb_examples, pad_id, cfg.mean_logps)  # (b, k)
        if coefs is None:
            loss, _ = objective.loss(logps, ref[indices], labels[indices], z0, cfg,
                                     len(examples))
        else:
            loss = weighted_loss(objective, logps, ref[indices], labels[indices], z0, cfg,
                                 len(examples), coefs[indices])
        metrics = {}
        if nll_coef:
            nll = _nll(logps[:, 0], mb_examples, cfg.mean_logps, max(chosen_tokens, 1.0),
                       coefs[indices] if coefs is not None else None)
            loss = loss + nll_coef * nll
            metrics["nll"] = float(nll.detach())
        seen.update(zip(indices, logps.detach().float().cpu(), strict=True))
        return loss, metrics

    micro = rank_micro_batches(range(len(examples)), [e.n_tokens for e in examples],
                               cfg.grad_accum, rt.rank, rt.world_size)
    total, sums = accumulate(rt, policy, micro, loss_of)
    reduced = rt.sum_floats(total, sums.get("nll", 0.0))
    # Metrics of the whole step at once (KTO's per-side means are not means of micro-batches).
    for part in rt.gather_objects(seen):
        seen.update(part)
    logps = torch.stack([seen[i] for i in range(len(examples))]).to(device)
    _, metrics = objective.loss(logps, ref, labels, z0, cfg, None)
    if nll_coef:
        metrics["nll"] = torch.tensor(reduced[1])
    groups = (_group_losses(objective, logps, ref, labels, z0, cfg, group_ids)
              if group_ids is not None else {})
    return StepResult(torch.tensor(reduced[0]), metrics, local_loss=total, group_losses=groups)


def evaluate(policy: nn.Module, objective: Objective, examples: Sequence[Example],
             ref: torch.Tensor, cfg: DPOConfig, pad_id: int, rt: Runtime) -> dict[str, float]:
    """Eval loss, implicit-reward accuracy and the loss's metrics over all ``examples``; each
    rank scores its share of the batches (``Runtime.map_chunks``)."""
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
        starts = list(range(0, len(order), cfg.ref_batch_size))

        def chunk(k: int) -> torch.Tensor:
            batch = [examples[i] for i in order[starts[k]:starts[k] + cfg.ref_batch_size]]
            return objective.forward(policy, batch, pad_id, cfg.mean_logps).float().cpu()

        chunks = torch.cat(rt.map_chunks(len(starts), chunk)).to(ref.device)
        logps = torch.empty_like(chunks)  # (N, k), back in data order
        logps[order] = chunks
        z0 = objective.reference_point(policy, examples, ref, pad_id, cfg, cfg.ref_batch_size)
        labels = _labels(examples, ref.device)
        loss, metrics = objective.loss(logps, ref, labels, z0, cfg, None)
        accuracy = objective.accuracy(logps, ref, labels, z0)
    policy.train(was_training)
    out = {"eval_loss": float(loss), "eval_accuracy": float(accuracy)}
    out.update({f"eval_{k}": float(v) for k, v in metrics.items()})
    return out


def load_model(cfg: DPOConfig, tokenizer: Any, rt: Runtime) -> nn.Module:
    """The policy in fp32 master weights (with fresh LoRA adapters when lora_r is set),
    dropout off, sized to the tokenizer."""
    lora = None if cfg.lora_r is None else LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha)
    policy = load_policy(cfg.model, dtype=rt.weights_dtype(cfg.dtype), device=str(rt.device),
                         trust_remote_code=cfg.trust_remote_code, lora=lora)
    match_tokenizer(policy, tokenizer)
    return disable_dropout(policy)


def dpo_groups(cfg: DPOConfig, train: Sequence[Example], groups: Mapping[str, Sequence[str]]
               ) -> tuple[list[str] | None, GroupDRO | None]:
    """(each training pair's group or None, the group weights) for ``groups`` (annotator ->
    groups, from --annotator-groups and --db): equal keeps q uniform, minmax moves it
    (``train.group_balance.GroupDRO``). No groups at all when neither source was given."""
    if cfg.annotator_groups is None and cfg.db is None:
        return None, None
    ids = [primary_group(e.annotator, groups) for e in train]
    where = " and ".join(([str(cfg.annotator_groups)] if cfg.annotator_groups else [])
                         + (["the store's users (`rewardloop users add --group`)"]
                            if cfg.db else []))
    names = balanced_group_names(ids, cfg.group_balance, "pairs", "every row needs an "
                                 f"annotator with a group in {where}")
    if cfg.group_balance == "none":
        return (ids, None) if names else (None, None)
    return ids, GroupDRO(names, cfg.group_step_size)


def eval_groups(policy: nn.Module, examples: Sequence[Example], ref: torch.Tensor,
                cfg: DPOConfig, pad_id: int, groups: dict[str, list[str]]
                ) -> tuple[list[bool], list[str], list[int]]:
    """Per held-out pair and group of its annotator (one entry per group: a pair judged by
    someone in two groups counts for both): does the implicit reward prefer the chosen answer,
    the group, and the pair's index."""
    logps = score_all(policy, examples, pad_id, cfg.mean_logps, cfg.ref_batch_size)
    ratios = logps - ref.float().cpu()
    right = (ratios[:, 0] > ratios[:, 1]).tolist()
    rows = [(right[k], g, k) for k, e in enumerate(examples)
            for g in annotator_groups(e.annotator, groups)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def keep_trusted(splits: dict[str, list[Example]], flagged: Set[str],
                 groups: Mapping[str, Sequence[str]]) -> dict[str, list[Example]]:
    """``splits`` without the pairs of ``flagged`` annotators, held-out ones included (a model
    is not scored against labels the user chose not to trust); a UserError when a split is
    left empty, a warning naming the groups that lost half or more of their pairs."""
    if not flagged:
        return splits
    kept = {name: [e for e in rows if e.annotator not in flagged]
            for name, rows in splits.items()}
    for name, rows in kept.items():
        if not rows:
            raise UserError(f"every {'training' if name == 'train' else 'held-out'} pair was "
                            f"judged by a flagged annotator; nothing to "
                            f"{'train' if name == 'train' else 'evaluate'} on")
    dropped = len(splits["train"]) - len(kept["train"])
    if dropped:
        log.warning("left out %d training pairs by %d flagged annotators", dropped,
                    len(flagged))
        warn_lost_groups([primary_group(e.annotator, groups) for e in splits["train"]],
                         [primary_group(e.annotator, groups) for e in kept["train"]],
                         [1.0] * len(kept["train"]), "--exclude-flagged")
    return kept


def pair_weights(train: Sequence[Example], weights: Mapping[str, float] | None,
                 groups: Mapping[str, Sequence[str]]) -> list[float] | None:
    """Each training pair's weight, its annotator's (``comparisons.annotator_weight``), or
    None without ``weights``; warns about groups the weights silence."""
    if weights is None:
        return None
    out = [annotator_weight(e.annotator, weights) for e in train]
    if sum(out) <= 0:
        raise UserError("every pair has weight 0; nothing to train on")
    ids = [primary_group(e.annotator, groups) for e in train]
    warn_lost_groups(ids, ids, out, "the annotator weights")
    return out


def train_dpo(cfg: DPOConfig, stored: StoredAnnotators | None = None) -> dict[str, Any]:
    """Train with ``cfg``; returns the summary (also written to ``cfg.out/summary.json``).
    ``stored``: what the store knows about annotators (``feedback.quality.annotators_from_db``),
    needed when ``cfg.db`` is set; the trainer does not open the store itself."""
    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt, stored)


def _train(cfg: DPOConfig, rt: Runtime,  # noqa: C901 (the loop)
           stored: StoredAnnotators | None) -> dict[str, Any]:
    objective = OBJECTIVES[cfg.loss]
    rt.check_divisible(cfg.batch_size // cfg.grad_accum, "--batch-size / --grad-accum")
    rt.check_merge_lora(cfg.merge_lora)
    # Pad must differ from EOS (or be added): the EOS would be masked as padding otherwise.
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code,
                               add_pad_token=cfg.add_pad_token, padding_side="right",
                               chat_template=cfg.chat_template)
    pad_id = tokenizer.pad_token_id
    weights, flagged, groups = annotator_info(cfg, stored)
    read = load_splits(cfg, objective, tokenizer, groups)
    splits = keep_trusted(read, flagged, groups)
    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, runtime=rt,
                 report_to=cfg.report_to, start=False)
    seed_everything(cfg.seed)
    policy = load_model(cfg, tokenizer, rt)
    train = splits["train"]
    # Similar-length pairs share a batch: padding (wasted compute) drops to a few percent.
    sampler = LengthGroupedSampler([e.n_tokens for e in train], cfg.batch_size, seed=cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.batches_per_epoch
    ref, ref_cache = reference_logps(cfg, policy, pad_id, splits, run.out, rt,  # before updates
                                     objective, sampler.rows_drawn(total_steps))
    group_ids, dro = dpo_groups(cfg, train, groups)
    train_weights = pair_weights(train, weights, groups)

    policy = rt.prepare(policy)  # FSDP2 replaces the parameters: collect them after
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    sched = scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule)
    step = 0
    ckpt = run.restore(models={"policy": policy}, optimizers={"policy": optimizer},
                       schedulers={"policy": sched}, runtime=rt)
    best = BestPoint(cfg.early_stopping_patience)
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
        best.load_state_dict(ckpt.extra.get("best", best.state_dict()))
        if dro is not None:
            dro.restore(ckpt.sampler_state)
    run.start()  # everything loaded and the checkpoint accepted: only now is --out changed
    write_reference_cache(run.out, ref_cache, rt)
    eval_ref = ref("eval", range(len(splits["eval"]))).to(rt.device) if "eval" in splits \
        else None

    def held_out_figures(eval_ref: torch.Tensor) -> dict[str, Any]:
        with rt.autocast():
            return evaluate(policy, objective, splits["eval"], eval_ref, cfg, pad_id, rt)

    policy.train()
    held_out: dict[str, Any] = {}
    with progress_bar(total_steps, f"train {cfg.loss}", start=step) as show:
        while step < total_steps:
            idx = sampler.next_batch()
            batch = [train[i] for i in idx]
            result = train_step(rt, policy, objective, batch, ref("train", idx).to(rt.device),
                                cfg, pad_id, [group_ids[i] for i in idx] if group_ids else None,
                                dro, [train_weights[i] for i in idx] if train_weights else None)
            if dro is not None and cfg.group_balance == "minmax":
                dro.update(result.group_losses)
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it after)
            grad_norm = rt.optimizer_step(optimizer, params, cfg.max_grad_norm, step=step + 1,
                                          loss=result.local_loss, run=run, scheduler=sched)
            step += 1
            run.meter.step(samples=len(batch), tokens=sum(e.n_tokens for e in batch))
            if step % cfg.log_every == 0 or step == total_steps:
                metrics = {"loss": float(result.loss), "grad_norm": grad_norm,
                           "lr": lr,
                           "epoch": sampler.epoch + sampler.position / sampler.batches_per_epoch,
                           **{k: float(v) for k, v in result.metrics.items()},
                           **{f"group_loss/{g}": v for g, v in result.group_losses.items()},
                           **({f"group_weight/{g}": dro.weight_of(g) for g in dro.groups}
                              if dro is not None else {})}
                run.log_metrics(step, metrics)
            show(step, f"loss {float(result.loss):.4f}")
            improved = False
            if eval_ref is not None and evaluation_due(step, total_steps, cfg.eval_every):
                held_out = held_out_figures(eval_ref)
                if cfg.eval_every > 0:  # a curve to read the best point from
                    run.log_metrics(step, held_out)
                    improved = best.update(step, held_out["eval_loss"], held_out)
            if improved or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(run, step, models={"policy": policy},
                                optimizers={"policy": optimizer},
                                schedulers={"policy": sched},
                                sampler_state={**sampler.state_dict(), **(
                                    {"group_dro": dro.state_dict()} if dro is not None else {})},
                                extra={"best": best.state_dict()}, keep=best.keep,
                                runtime=rt)
            if best.should_stop:
                log.info("%s: no lower eval loss in %d evaluations; stopping at step %d "
                         "(best: step %s)", cfg.loss, best.evals_since_best, step,
                         best.best_step)
                break

    figures: dict[str, Any] = {"loss_name": cfg.loss, "pairs": len(train), "reference": (
        "none" if not objective.reference else "cached" if cfg.precompute_ref else "on-the-fly"),
        **({"dropped_flagged": len(read["train"]) - len(train)} if cfg.exclude_flagged else {})}
    if eval_ref is not None:
        figures.update(held_out if held_out else held_out_figures(eval_ref))
        figures["eval_source"] = "eval_data" if cfg.eval_data else "eval_fraction"
    if best.best_step is not None and best.best_step != step:
        restore_weights(run.checkpoints_dir / f"step-{best.best_step}",
                        models={"policy": policy})
    if group_ids is not None:  # of the saved model
        correct, held, units = ([], [], []) if eval_ref is None else eval_groups(
            policy, splits["eval"], eval_ref, cfg, pad_id, groups)
        figures["groups"] = group_summary(cfg.group_balance, group_ids,
                                          [e.annotator for e in train],
                                          train_weights or [1.0] * len(train),
                                          dro, correct, held, units)
    rt.save_model(policy, tokenizer, run.model_dir, merge_lora=cfg.merge_lora)
    return run.write_summary({**figures, **best.summary()})
