"""Reward models from preferences (``rewardloop train rm``): Bradley–Terry and Plackett–Luce.

One explicit loop (``train_rm``). Every training item is a *comparison*: K answers to one prompt
and their ranks (0 = best, equal ranks tie). A pair is K = 2 (ranks 0/1, or 0/0 for a tie); a
ranking row is K >= 2. The data kind picks the objective once, by name (``OBJECTIVES``):
pairwise files (trl, hh, ultrafeedback) train with Bradley–Terry (optional margin, label
smoothing, ties as half wins), ranking files with Plackett–Luce (ties stage-wise, see
``losses.plackett_luce_loss``). All answers of a micro-batch go through the model in ONE forward
pass (a pair batch holds every chosen row, then every rejected row), and the reward is read at
the last real token (``score.rewards_of``).

Losses are normalised by the summed weight of all comparisons in the optimizer step (the number
of comparisons unless annotators are weighted by reliability), so gradient accumulation does not
change the update (except ``--length-debias``: ODIN's correlation term is a Pearson correlation
over the answers of each micro-batch, so it changes with --grad-accum and the number of
processes; the run warns when micro-batches are small). ``ensemble`` K > 1 puts K heads on one
shared trunk (one forward pass, K rewards); each head is trained on the same loss from its own
random start, the reward is their mean and their standard deviation is the model's
uncertainty.

Comparisons are read and scored in ``train.comparisons``. After training the model is evaluated
(``train.reward_eval``: accuracy, loss, calibration, per-annotator and per-group accuracy,
correlation of reward with answer length) and ``reward_stats.json`` (mean/std of the
rewards, ensemble size, tokenisation limits) is saved next to the weights for ``score`` and RL.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardloop import losses
from rewardloop.ceiling import label_ceiling, record_votes
from rewardloop.data.formats import write_records
from rewardloop.data.records import PairRecord, RankingRecord
from rewardloop.errors import UserError
from rewardloop.metrics import (
    accuracy_by_group,
    annotator_groups,
    check_group_name,
    pair_credit,
    primary_group,
)
from rewardloop.models import (
    GROUP_HEADS_KEY,
    HFModel,
    LoraSettings,
    apply_lora,
    load_reward_model,
    load_tokenizer,
    match_tokenizer,
    mean_score_head,
    new_score_head,
    set_head_names,
)
from rewardloop.score import STATS_FILE, text_form
from rewardloop.train.checkpoint import restore_weights
from rewardloop.train.comparisons import (
    OBJECTIVES,
    Comparison,
    Objective,
    StoredAnnotators,
    annotator_info,
    apply_annotator_policy,
    comparisons_of,
    score_comparisons,
    train_and_eval_records,
)
from rewardloop.train.configs import RewardConfig
from rewardloop.train.data import (
    LengthGroupedSampler,
    rank_micro_batches,
    scheduler,
)
from rewardloop.train.early_stop import BestPoint, evaluation_due
from rewardloop.train.group_balance import (
    GroupDRO,
    balanced_group_names,
    equal_weights,
    group_metric_sums,
    group_summary,
    split_group_sums,
    warn_lost_groups,
)
from rewardloop.train.length_debias import (
    drop_length_head,
    odin_correlation_loss,
    orthogonality_loss,
)
from rewardloop.train.reward_eval import (
    evaluate,
    length_correlation,
    pair_deltas,
    reward_stats,
    score_all,
    split_length_head,
    standardized,
)
from rewardloop.train.run import (
    RunDir,
    adamw,
    save_checkpoint,
)
from rewardloop.train.runtime import Runtime, runtime_for
from rewardloop.train.step import MicroLoss, accumulate_and_step
from rewardloop.util.files import atomic_write_text
from rewardloop.util.progress import progress_bar
from rewardloop.util.seed import seed_everything

log = logging.getLogger(__name__)


def comparison_loss(objective: Objective, scores: torch.Tensor, ranks: torch.Tensor,
                    items: Sequence[Comparison], cfg: RewardConfig, step_weight: float,
                    step_count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_i w_i loss_i / ``step_weight`` averaged over heads, plus reward centering.

    scores (B, K, H), ranks (B, K); ``step_weight`` / ``step_count``: summed weight / number of
    the comparisons in the whole optimizer step. The losses take one global count, so
    comparisons are grouped by weight: a group of weight w divides its summed loss by
    step_weight / w, which gives Σ_i w_i loss_i / step_weight exactly.
    """
    device = scores.device
    odin = None
    if cfg.length_debias:  # rank by r_Q + r_L; ODIN's terms on the split (see length_debias)
        odin = length_terms(scores, ranks, items) * len(items) / step_count
        scores = scores[..., :-1] + scores[..., -1:]
    weights = torch.tensor([c.weight for c in items], device=device)
    margins = torch.tensor([c.margin for c in items], device=device, dtype=scores.dtype)
    heads = scores.shape[-1]
    loss = scores.new_zeros(())
    for w in torch.unique(weights).tolist():
        if w == 0:
            continue
        sel = weights == w
        for h in range(heads):
            part, _ = objective(scores[sel][..., h], ranks[sel], margins[sel], cfg,
                                step_weight / w)
            loss = loss + part / heads
    if cfg.center_rewards_coef > 0:
        # A batch mean over this micro-batch; x B_micro / B_step makes it a share of the step.
        centering = torch.stack([losses.reward_centering_loss(scores[..., h],
                                                              cfg.center_rewards_coef)
                                 for h in range(heads)]).mean()
        loss = loss + centering * len(items) / step_count
    if odin is not None:
        loss = loss + cfg.length_debias_coef * odin
    with torch.no_grad():  # metrics of the ensemble's reward, the mean over heads (B, K)
        _, metrics = objective(scores.mean(-1), ranks, margins, cfg, float(len(items)))
    return loss, metrics


def length_terms(scores: torch.Tensor, ranks: torch.Tensor, items: Sequence[Comparison]
                 ) -> torch.Tensor:
    """ODIN's correlation term over the answers of a micro-batch: scores (B, K, H + 1), the
    last head tracking length; absent answers (rank -1) are left out."""
    lengths = torch.tensor([[sum(e.completion_mask) for e in c.responses]
                            + [0] * (scores.shape[1] - len(c.responses)) for c in items],
                           device=scores.device)
    present = ranks >= 0
    return odin_correlation_loss(scores[..., :-1][present], scores[..., -1][present],
                                 lengths[present])


ODIN_MIN_COMPARISONS = 8
"""Comparisons per micro-batch below which ODIN's correlation term is noisy (a pair gives two
answers, whose correlation with length is +-1)."""


def warn_small_debias_batches(cfg: RewardConfig, world_size: int) -> bool:
    """Warn (and return True) when --length-debias correlates over micro-batches of fewer than
    ``ODIN_MIN_COMPARISONS`` comparisons."""
    per_micro = cfg.batch_size // max(cfg.grad_accum, 1) // max(world_size, 1)
    if not cfg.length_debias or per_micro >= ODIN_MIN_COMPARISONS:
        return False
    log.warning("--length-debias computes its length correlation over each micro-batch, here "
                "%d comparisons (--batch-size / --grad-accum / processes): a noisy term, and "
                "one that changes with --grad-accum and the number of processes. Give it at "
                "least %d a micro-batch.", per_micro, ODIN_MIN_COMPARISONS)
    return True


def score_head(model: nn.Module) -> nn.Linear:
    """The reward head (``score``) of a plain or DDP-wrapped reward model."""
    head = Runtime.unwrap(model).score
    if not isinstance(head, nn.Linear):
        raise UserError("--length-debias needs a reward model whose head (score) is one linear "
                        f"layer, not {type(head).__name__}")
    return head


def group_loss_sums(objective: Objective, scores: torch.Tensor, ranks: torch.Tensor,
                    items: Sequence[Comparison], cfg: RewardConfig, group_ids: Sequence[str],
                    groups: Sequence[str]) -> dict[str, float]:
    """No-grad loss sum and count per group of one micro-batch (ensemble-mean reward), as the
    metric sums ``train.group_balance`` reads; scores (B, K, H), ranks (B, K)."""
    with torch.no_grad():
        mean = scores.detach().mean(-1)
        margins = torch.tensor([c.margin for c in items], device=mean.device, dtype=mean.dtype)
        sums, counts = {}, {}
        for g in sorted(set(group_ids)):
            sel = torch.tensor([x == g for x in group_ids], device=mean.device)
            loss, _ = objective(mean[sel], ranks[sel], margins[sel], cfg, 1.0)
            sums[g], counts[g] = float(loss), int(sel.sum())
    return group_metric_sums(sums, counts, groups)


PAIRS_KEY = "_ordered_pairs"
"""The micro-batch metric sum holding the ordered pairs that accuracy is a share of."""
EVAL_SPLIT = "eval_split.jsonl"
"""The rows --eval-fraction held out, written beside summary.json (their judgments, as read)."""
MEAN_HEAD = -1
"""The head index of a --group-heads comparison of no group: it trains the heads' mean."""


def step_metrics(sums: Mapping[str, float], count: int) -> dict[str, float]:
    """A step's logged figures from its summed metrics (``micro_loss``) over ``count``
    comparisons: means per comparison, and accuracy per ordered pair (left out of a step whose
    comparisons are all ties)."""
    pairs = sums.get(PAIRS_KEY, 0.0)
    out = {k: v / count for k, v in sums.items() if k not in ("accuracy", PAIRS_KEY)}
    if "accuracy" in sums and pairs > 0:
        out["accuracy"] = sums["accuracy"] / pairs
    return out


def micro_loss(model: nn.Module, objective: Objective, items: Sequence[Comparison],
               batch: Sequence[int], cfg: RewardConfig, pad_id: int, device: torch.device,
               group_ids: Sequence[str] | None = None, groups: Sequence[str] = (),
               heads: Sequence[int] | None = None) -> MicroLoss:
    """The loss of one micro-batch of the step ``batch``: divided by the summed weight (and
    count) of the WHOLE step's comparisons, so the accumulated gradient is the one-big-batch
    gradient. Metrics come back as sums over the micro-batch's comparisons, plus the loss per
    annotator group when ``group_ids`` (one per item) are given. With ``heads`` (one head index
    per item: --group-heads) each comparison is scored and trained by its own head only."""
    step_weight = max(sum(items[i].weight for i in batch), 1e-12)

    def loss_of(indices: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        mb = [items[i] for i in indices]
        scores, ranks = score_comparisons(model, mb, pad_id, device)
        if heads is not None:  # (B, K, H) -> (B, K, 1): each comparison's own head
            with_mean = torch.cat([scores, scores.mean(-1, keepdim=True)], -1)  # MEAN_HEAD: H
            own = torch.tensor([heads[i] if heads[i] != MEAN_HEAD else scores.shape[-1]
                                for i in indices], device=scores.device)
            scores = with_mean.gather(-1, own.view(-1, 1, 1).expand(-1, scores.shape[1], 1))
        loss, metrics = comparison_loss(objective, scores, ranks, mb, cfg, step_weight,
                                        len(batch))
        # Accuracy is a share of the ordered pairs, which micro-batches hold in different
        # numbers (ties have none): summed as credit and pairs, divided once per step.
        pairs = float(losses.ordered_pairs(ranks))
        sums = {k: float(v) * len(mb) for k, v in metrics.items() if k != "accuracy"}
        sums["accuracy"] = float(metrics["accuracy"]) * pairs if pairs else 0.0
        sums[PAIRS_KEY] = pairs
        if group_ids is not None:
            sums.update(group_loss_sums(objective, scores, ranks, mb, cfg,
                                        [group_ids[i] for i in indices], groups))
        if cfg.length_debias:
            loss = loss + (cfg.length_debias_coef * orthogonality_loss(score_head(model))
                           * len(mb) / len(batch))
        return loss, sums

    return loss_of


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def load_tokenizer_for(cfg: RewardConfig) -> Any:
    """The model's right-padding tokenizer (pad == EOS refused unless add_pad_token)."""
    return load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code,
                          add_pad_token=cfg.add_pad_token, padding_side="right",
                          chat_template=cfg.chat_template)


def load_model(cfg: RewardConfig, tokenizer: Any, rt: Runtime,
               head_groups: Sequence[str] = ()) -> nn.Module:
    """The reward model in fp32 master weights, LoRA when asked: K fresh heads for an ensemble
    (or one per group of ``head_groups``, recorded in the config), and ODIN's length head last.

    A reward model as --model is a warm start: its heads are kept when they are the ones asked
    for (as many, the same groups); a K-head model warm-starts one scalar head from their mean
    (its mean reward); otherwise the heads are new and only the trunk is kept."""
    model: HFModel = load_reward_model(cfg.model, dtype=rt.weights_dtype(cfg.dtype),
                              device=str(rt.device), trust_remote_code=cfg.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id, heads=None)
    match_tokenizer(model, tokenizer)
    reward_heads = len(head_groups) or cfg.ensemble
    saved = model.config.num_labels
    same = saved == reward_heads and list(
        getattr(model.config, GROUP_HEADS_KEY, None) or []) == list(head_groups)
    if saved > 1 and not same and reward_heads == 1:
        mean_score_head(model)
        same = True
    heads = reward_heads + int(cfg.length_debias)  # the length head is the last output
    if heads != model.config.num_labels or not same:
        new_score_head(model, heads, keep=reward_heads if same else 0)
    set_head_names(model.config, reward_heads, head_groups)
    if cfg.lora_r:
        model = apply_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha))
    return model


def _write_stats(model_dir: Path, stats: Mapping[str, Any]) -> None:
    atomic_write_text(model_dir / STATS_FILE, json.dumps(dict(stats), indent=2) + "\n")


def balance_groups(items: list[Comparison], group_ids: Sequence[str], cfg: RewardConfig
                   ) -> tuple[list[Comparison], GroupDRO | None]:
    """``--group-balance``: equal reweighs the comparisons once; minmax returns the group DRO
    state that weighs every step (``train.group_balance``)."""
    names = balanced_group_names(group_ids, cfg.group_balance, "comparisons", "give groups "
                                 "with --annotator-groups or --db, and an annotator on every row")
    if cfg.group_balance == "none":
        return items, None
    if cfg.group_balance == "equal":
        weights = equal_weights(group_ids, [c.weight for c in items])
        return [replace(c, weight=w) for c, w in zip(items, weights, strict=True)], None
    return items, GroupDRO(names, cfg.group_step_size)


def step_items(items: list[Comparison], batch: Sequence[int], group_ids: Sequence[str],
               dro: GroupDRO | None) -> list[Comparison]:
    """The comparisons as this step weighs them: under group DRO, w_i q_g / W_g."""
    if dro is None:
        return items
    out = list(items)
    weights = dro.item_weights([group_ids[i] for i in batch], [items[i].weight for i in batch])
    for i, w in zip(batch, weights, strict=True):
        out[i] = replace(items[i], weight=w)
    return out


def group_figures(cfg: RewardConfig, items: Sequence[Comparison], group_ids: Sequence[str],
                  groups: Mapping[str, Sequence[str]], dro: GroupDRO | None,
                  eval_items: Sequence[Comparison], eval_scores: Sequence[torch.Tensor],
                  head_groups: Sequence[str] = ()) -> dict[str, Any]:
    """The summary's ``groups`` section (``train.group_balance.group_summary``): a group's
    accuracy is that of the model's reward (the heads' mean). Under --group-heads it is that of
    the group's own head (``scored_by``: "own head", or "heads' mean" for a group without
    one), and ``reward_accuracy`` is the reward's: what a policy trained without a mix sees."""
    correct: list[float] = []
    mixed: list[float] = []
    eval_groups: list[str] = []
    units: list[int] = []
    for k, (c, s) in enumerate(zip(eval_items, eval_scores, strict=True)):
        # The reward's credit, once per comparison; a group's own head is scored apart.
        of_mix = pair_credit(pair_deltas([c], s.mean(-1)[None])[0]).tolist()
        for g in annotator_groups(c.annotator, groups):
            own = (pair_credit(pair_deltas([c], s[None, :, head_groups.index(g)])[0]).tolist()
                   if g in head_groups else of_mix)
            correct += own
            mixed += of_mix
            eval_groups += [g] * len(own)
            units += [k] * len(own)
    section = group_summary(cfg.group_balance, group_ids, [c.annotator for c in items],
                            [c.weight for c in items], dro, correct, eval_groups, units)
    if not head_groups:
        return section
    of_reward = accuracy_by_group(mixed, eval_groups, judgment_of_pair=units) if mixed else {}
    for g, row in section["by_group"].items():
        row["scored_by"] = "own head" if g in head_groups else "heads' mean"
        row["reward_accuracy"] = of_reward.get(g, {}).get("accuracy")
    return {**section, "group_heads": list(head_groups)}


def head_groups_of(cfg: RewardConfig, group_ids: Sequence[str]) -> tuple[str, ...]:
    """--group-heads: the groups that get a head, in head order (needs 2+ groups).
    ``UNGROUPED`` gets none: its comparisons train the heads' mean (``RmData.heads``)."""
    if not cfg.group_heads:
        return ()
    names = balanced_group_names(group_ids, "heads", "comparisons", "give groups with "
                                 "--annotator-groups or --db", flag="--group-heads")
    for name in names:  # a head is named in a reward mix: RUN@group=w,group=w
        check_group_name(name)
    return names


def train_rm(cfg: RewardConfig, stored: StoredAnnotators | None = None) -> dict[str, Any]:
    """Train a reward model; returns the summary written to ``summary.json``. ``stored``: what
    the store knows about annotators, when ``cfg.db`` is set."""
    with runtime_for(cfg, cfg.device) as rt:
        return _train(cfg, rt, stored)


@dataclass
class RmData:
    """What a run reads before it starts: the comparisons it trains and evaluates on, and the
    annotator groups they come from."""
    records: list[Any]  # the training file's records (their text form goes to reward_stats)
    objective_name: str
    items: list[Comparison]  # weighed by the annotator policy and --group-balance equal
    eval_name: str
    eval_items: list[Comparison]
    ceiling: dict[str, Any]  # the held-out labels' own agreement (``ceiling.label_ceiling``)
    n_read: int  # comparisons before flagged annotators were dropped
    groups: Mapping[str, Sequence[str]]
    group_ids: list[str]  # each training comparison's primary group
    dro: GroupDRO | None
    tracked: list[str]  # the groups reported apart (none with a single group)
    head_groups: tuple[str, ...]
    split: tuple[str, list[Any]] | None = None  # (format, rows) held out by --eval-fraction

    @property
    def heads(self) -> list[int] | None:
        """Each training comparison's head under --group-heads; ``MEAN_HEAD`` (the heads'
        mean) for a comparison of no group."""
        if not self.head_groups:
            return None
        return [self.head_groups.index(g) if g in self.head_groups else MEAN_HEAD
                for g in self.group_ids]


def read_data(cfg: RewardConfig, stored: StoredAnnotators | None, tokenizer: Any) -> RmData:
    """Read, tokenise and weigh the comparisons; every refusal comes before --out is touched."""
    weights, flagged, groups = annotator_info(cfg, stored)
    (fmt, records), held_out = train_and_eval_records(cfg, groups, flagged)
    objective_name, items = comparisons_of(cfg.data, fmt, records, tokenizer, cfg)
    eval_name, eval_items = (comparisons_of(cfg.eval_data or cfg.data, *held_out, tokenizer, cfg)
                             if held_out else (objective_name, []))
    if objective_name == "plackett-luce" and (cfg.use_margin or cfg.label_smoothing):
        raise UserError("--use-margin and --label-smoothing apply to pairwise data; ranking "
                        "rows train with Plackett-Luce, which has neither")
    kept = apply_annotator_policy(items, weights, flagged)
    group_ids = [primary_group(c.annotator, groups) for c in kept]
    if flagged or weights is not None:
        warn_lost_groups([primary_group(c.annotator, groups) for c in items], group_ids,
                         [c.weight for c in kept], " and ".join(
                             (["--exclude-flagged"] if flagged else [])
                             + (["the annotator weights"] if weights is not None else [])))
    kept, dro = balance_groups(kept, group_ids, cfg)
    # Reported apart: the groups of the training and the held-out comparisons (a group the
    # training lost, to --exclude-flagged say, is still measured).
    seen = set(group_ids) | {g for c in eval_items for g in annotator_groups(c.annotator, groups)}
    tracked = sorted(seen) if len(seen) > 1 else []
    return RmData(records, objective_name, kept, eval_name, eval_items,
                  label_ceiling(record_votes(held_out[1])).to_json() if held_out else {},
                  len(items), groups, group_ids, dro, tracked, head_groups_of(cfg, group_ids),
                  held_out if held_out and cfg.eval_data is None else None)


def evaluate_model(model: nn.Module, data: RmData, cfg: RewardConfig, rt: Runtime, pad_id: int
                   ) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The held-out figures (``reward_eval.evaluate``) and the reward heads' scores."""
    with rt.autocast():
        raw = score_all(model, data.eval_items, pad_id, rt.device, cfg.eval_batch_size, rt)
    scores, with_length = split_length_head(raw, cfg)
    figures = evaluate(data.eval_name, data.eval_items,
                       standardized(scores) if data.head_groups else scores, cfg, data.groups)
    if with_length is not None:  # what the reward would be with the length head kept
        figures["length_correlation_with_length_head"] = length_correlation(
            data.eval_items, with_length)
    return figures, scores


STATS_SAMPLE = 2048  # training comparisons scored for reward_stats.json without an eval set


def stats_sample(items: list[Any], seed: int) -> list[Any]:
    """At most ``STATS_SAMPLE`` of ``items``, drawn with ``seed`` (the same on every process):
    the mean and std of the rewards need a few thousand answers, not a pass over 100k training
    pairs after a 2-step run (audit s14, scale 1)."""
    size = STATS_SAMPLE
    if len(items) <= size:
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), size))]


def finish(cfg: RewardConfig, rt: Runtime, run: RunDir, model: nn.Module, tokenizer: Any,
           data: RmData, stats_scores: list[torch.Tensor] | None, figures: dict[str, Any]
           ) -> dict[str, Any]:
    """Save model/ with its reward_stats.json (from the held-out answers, else the training
    ones; ``stats_scores`` when the final weights' held-out scores are at hand) and write the
    summary."""
    stats_items, source = (data.eval_items, "eval") if data.eval_items else (
        stats_sample(data.items, cfg.seed), "train")
    if stats_scores is None:
        with rt.autocast():
            stats_scores, _ = split_length_head(score_all(
                model, stats_items, tokenizer.pad_token_id, rt.device, cfg.eval_batch_size, rt),
                cfg)
    if cfg.length_debias:  # model/ keeps the reward heads only
        inner = rt.unwrap(model)
        inner.score = drop_length_head(score_head(inner))
        model_config: Any = inner.config
        model_config.num_labels = cfg.ensemble
    stats = {**reward_stats(stats_scores), "source": source, "max_length": cfg.max_length,
             "max_prompt_length": cfg.max_prompt_length, "text_form": text_form(
                 (r.prompt, r.chosen if isinstance(r, PairRecord) else r.responses[0])
                 for r in data.records if isinstance(r, PairRecord | RankingRecord))}
    rt.save_model(model, tokenizer, run.model_dir, merge_lora=cfg.merge_lora)
    if rt.is_main:
        _write_stats(run.model_dir, stats)
        if data.split is not None:  # to slice the held-out figures by anything the rows hold
            write_records(run.out / EVAL_SPLIT, *data.split)
    items = data.items
    eval_scores = stats_scores if data.eval_items else []
    if data.head_groups and eval_scores:
        eval_scores = standardized(eval_scores)
    return run.write_summary({
        **figures, **data.ceiling, "objective": data.objective_name,
        "ensemble": cfg.ensemble, "train_comparisons": len(items),
        "eval_source": ("eval_data" if cfg.eval_data else "eval_fraction" if data.eval_items
                        else None),
        **({"eval_split": EVAL_SPLIT} if data.split is not None else {}),
        "dropped_flagged": data.n_read - len(items),
        "reward_mean": stats["mean"], "reward_std": stats["std"],
        **({"groups": group_figures(cfg, items, data.group_ids, data.groups, data.dro,
                                    data.eval_items, eval_scores, data.head_groups)}
           if data.tracked else {})})


def _train(cfg: RewardConfig, rt: Runtime,  # noqa: C901 (the loop)
           stored: StoredAnnotators | None) -> dict[str, Any]:
    # Data first: a refused file must not leave a half-made run directory behind.
    rt.check_divisible(cfg.batch_size // cfg.grad_accum, "--batch-size / --grad-accum")
    rt.check_merge_lora(cfg.merge_lora)
    if cfg.length_debias and rt.strategy == "fsdp":
        raise UserError("--length-debias drops a head when saving, which FSDP's sharded head "
                        "does not allow; use --strategy ddp")
    warn_small_debias_batches(cfg, rt.world_size)
    tokenizer = load_tokenizer_for(cfg)
    pad_id = tokenizer.pad_token_id
    data = read_data(cfg, stored, tokenizer)
    items, eval_items, dro = data.items, data.eval_items, data.dro
    group_ids, heads = data.group_ids, data.heads
    run = RunDir(cfg.out, cfg, resume=cfg.resume, overwrite=cfg.overwrite, runtime=rt,
                 report_to=cfg.report_to, start=False)
    seed_everything(cfg.seed)
    model = load_model(cfg, tokenizer, rt, data.head_groups)
    objective = OBJECTIVES[data.objective_name]
    lengths = [c.n_tokens for c in items]
    sampler = LengthGroupedSampler(lengths, cfg.batch_size, cfg.seed)
    total_steps = cfg.max_steps or cfg.epochs * sampler.batches_per_epoch
    log.info("rm: %d comparisons (%s), %d steps", len(items), data.objective_name, total_steps)

    model.train()
    model = rt.prepare(model)  # FSDP2 replaces the parameters: collect them after
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay)
    sched = scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule)
    ckpt = run.restore(models={"reward": model}, optimizers={"reward": optimizer},
                       schedulers={"reward": sched}, runtime=rt)
    best = BestPoint(cfg.early_stopping_patience)
    step = 0
    if ckpt is not None:
        step = ckpt.step
        sampler.load_state_dict(ckpt.sampler_state)
        best.load_state_dict(ckpt.extra.get("best", best.state_dict()))
        if dro is not None:
            dro.restore(ckpt.sampler_state)
    run.start()  # everything loaded and the checkpoint accepted: only now is --out changed

    def held_out_figures() -> tuple[dict[str, Any], list[torch.Tensor]]:
        return evaluate_model(model, data, cfg, rt, pad_id)

    def checkpoint(at: int) -> None:
        save_checkpoint(run, at, models={"reward": model}, optimizers={"reward": optimizer},
                        schedulers={"reward": sched}, sampler_state={**sampler.state_dict(), **(
                            {"group_dro": dro.state_dict()} if dro is not None else {})},
                        extra={"best": best.state_dict()}, keep=best.keep, runtime=rt)

    figures: dict[str, Any] = {}
    stats_scores: list[torch.Tensor] | None = None
    with progress_bar(total_steps, "rm", start=step) as show:
        while step < total_steps:
            batch = sampler.next_batch()
            lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it after)
            out = accumulate_and_step(
                rt, model, optimizer, params,
                rank_micro_batches(batch, lengths, cfg.grad_accum, rt.rank, rt.world_size),
                micro_loss(model, objective, step_items(items, batch, group_ids, dro), batch, cfg,
                           pad_id, rt.device, group_ids if data.tracked else None, data.tracked,
                           heads),
                max_grad_norm=cfg.max_grad_norm, step=step + 1, run=run, scheduler=sched)
            metric_sums, group_losses = split_group_sums(out.metric_sums)
            if dro is not None:
                dro.update(group_losses)
            step += 1
            run.meter.step(samples=len(batch), tokens=sum(lengths[i] for i in batch))
            if step % cfg.log_every == 0 or step == total_steps:
                run.log_metrics(step, {"loss": out.loss, "grad_norm": out.grad_norm,
                                       "lr": lr, "epoch": sampler.epoch,
                                       **step_metrics(metric_sums, len(batch)),
                                       **{f"group_loss/{g}": v for g, v in group_losses.items()},
                                       **({f"group_weight/{g}": dro.weight_of(g)
                                           for g in dro.groups} if dro is not None else {})})
            improved = False
            if eval_items and evaluation_due(step, total_steps, cfg.eval_every):
                figures, stats_scores = held_out_figures()
                run.log_metrics(step, {k: v for k, v in figures.items() if isinstance(v, float)})
                improved = cfg.eval_every > 0 and best.update(step, figures["eval_loss"],
                                                              figures)
            if improved or (cfg.save_every and step % cfg.save_every == 0):
                checkpoint(step)
            show(step, f"loss {out.loss:.3f}")
            if best.should_stop:
                log.info("rm: no lower eval loss in %d evaluations; stopping at step %d (best: "
                         "step %s)", best.evals_since_best, step, best.best_step)
                break

    if eval_items and not figures:  # resumed after the last step: evaluate what was saved
        figures, stats_scores = held_out_figures()
    if best.best_step is not None and best.best_step != step:
        restore_weights(run.checkpoints_dir / f"step-{best.best_step}",
                        models={"reward": model})
        stats_scores = None
    return finish(cfg, rt, run, model, tokenizer, data, stats_scores,
                  {**figures, **best.summary()})
