"""One row of a preference-data file <-> records: a parser per format (``PARSERS``) that turns
one JSON object into records, and a row writer per writable format (``ROW_WRITERS``). Field
validation with file/line/field messages is :mod:`._fields`; files, detection and streams are
:mod:`.formats`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rewardloop.data import _fields as F
from rewardloop.data.records import (
    HH_ASSISTANT,
    HH_HUMAN,
    CandidatesRecord,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    SFTRecord,
    UnpairedRecord,
    as_messages,
    completion_messages,
    hh_transcripts,
    hh_unwritable,
    split_shared,
)
from rewardloop.data.shapes import (
    parse_arena,
    parse_saferlhf_better,
    parse_saferlhf_safer,
    parse_shp,
)
from rewardloop.data.values import STRENGTHS, validate_ranking
from rewardloop.errors import UserError

# Completion rating keys, in order of preference (UltraFeedback's own key first).
RATING_KEYS = ("overall_score", "rating", "score", "fine-grained_score")


# -- row parsers: one JSON object -> records ---------------------------------------------------


def _chat_answers(obj: dict[str, Any]) -> bool:
    """Whether a row's answers are conversations (UltraFeedback-binarized ``chosen``)."""
    responses = obj.get("responses")
    answers = [obj.get("chosen"), obj.get("rejected"), obj.get("completion"),
               *(responses if isinstance(responses, list) else [])]
    return any(isinstance(a, list) and a for a in answers)


def _parse_prompts(obj: dict[str, Any]) -> list[Record]:
    key = "prompt" if obj.get("prompt") is not None else "messages"
    raw = F.required(obj, key)
    prompt = F.text(raw, key) if key == "prompt" else F.chat(raw, key)
    if isinstance(prompt, str) and _chat_answers(obj):
        # The trainers render a text prompt with chat answers through the chat template (one
        # user turn): generation and scoring from the same row must see that prompt too.
        prompt = as_messages(prompt)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise F.Invalid("meta", f"must be an object, got {F.kind_of(meta)}")
    return [PromptRecord(prompt, F.ident(obj), F.check_json(meta, "meta"))]


def _parse_candidates(obj: dict[str, Any]) -> list[Record]:
    prompt = F.text(F.required(obj, "prompt"), "prompt")
    responses = F.required(obj, "responses")
    if not isinstance(responses, list) or not responses:
        raise F.Invalid("responses", "must be a non-empty list of strings")
    responses = [F.string(r, f"responses[{i}]") for i, r in enumerate(responses)]
    models = obj.get("models")
    if models is not None:
        if not isinstance(models, list) or len(models) != len(responses):
            raise F.Invalid("models", f"must be a list of {len(responses)} model names (or null), "
                           "one per response")
        models = [None if m is None else F.ident({f"models[{i}]": m}, f"models[{i}]")
                  for i, m in enumerate(models)]
    return [CandidatesRecord(prompt, responses, models, F.ident(obj))]


def _judgment_options(obj: dict[str, Any]) -> dict[str, Any]:
    """The optional fields ``trl`` and ``ranking`` rows share: who judged, and how."""
    margin, time_ms, rationale = obj.get("margin"), obj.get("time_ms"), obj.get("rationale")
    return {
        "margin": None if margin is None else F.number(margin, "margin"),
        "annotator": F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS),
        "id": F.ident(obj),
        "dimension": F.ident(obj, "dimension", F.MAX_ANNOTATOR_CHARS),
        "both_bad": F.boolean(obj, "both_bad", default=False),
        "strength": F.choice(obj, "strength", STRENGTHS),
        "rationale": None if rationale is None else F.string(rationale, "rationale"),
        "time_ms": None if time_ms is None else F.whole(time_ms, "time_ms"),
        "guideline_version": F.ident(obj, "guideline_version", F.MAX_GUIDELINE_CHARS),
    }


def _pair_options(obj: dict[str, Any]) -> dict[str, Any]:
    models = [F.ident(obj, key, F.MAX_ID_CHARS) for key in ("chosen_model", "rejected_model")]
    return {**_judgment_options(obj), "tie": F.boolean(obj, "tie", default=False),
            "models": models if any(models) else None}


def _ranking_options(obj: dict[str, Any], n: int) -> dict[str, Any]:
    models, shown = obj.get("models"), obj.get("shown_order")
    if models is not None:
        if not isinstance(models, list) or len(models) != n:
            raise F.Invalid("models", f"must be a list of {n} model names (or null), one per "
                           "response")
        models = [None if m is None else F.ident({f"models[{i}]": m}, f"models[{i}]")
                  for i, m in enumerate(models)]
    if shown is not None:
        if not isinstance(shown, list) or sorted(
                F.whole(v, f"shown_order[{i}]") for i, v in enumerate(shown)) != list(range(n)):
            raise F.Invalid("shown_order", f"must list the indices 0..{n - 1} of 'responses', "
                           "each once, in the order they were shown")
        shown = [int(v) for v in shown]
    return {**_judgment_options(obj), "models": models if models and any(models) else None,
            "shown_order": shown}


def _parse_trl(obj: dict[str, Any]) -> list[Record]:
    chosen = F.text(F.required(obj, "chosen"), "chosen", answer=True)
    rejected = F.text(F.required(obj, "rejected"), "rejected", answer=True)
    if obj.get("prompt") is not None:
        prompt = F.text(obj["prompt"], "prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's "implicit prompt" form: the prompt is the conversation both answers share.
        prompt, chosen, rejected = split_shared(chosen, rejected)
        if not prompt:
            raise F.Invalid("prompt", "is missing, and chosen/rejected share no leading messages")
    elif isinstance(chosen, str) and HH_HUMAN not in chosen:
        raise F.Invalid("prompt", "is missing; string chosen/rejected without a prompt are "
                       "TRL implicit-prompt rows, which are not supported: add a 'prompt'")
    else:
        raise F.Invalid("prompt", "is missing (whole HH transcripts are --format hh)")
    return [PairRecord(prompt, chosen, rejected, **_scored_pair(obj, _pair_options(obj)))]


UFB_KEYS = ("prompt_id", "messages", "score_chosen", "score_rejected")
"""The columns of UltraFeedback-binarized rows (``HuggingFaceH4/ultrafeedback_binarized``),
whose scores are the annotators' ratings. ``rewardloop score`` writes its reward model's
scores under the same two names into plain trl rows: those are not ratings, and are ignored."""


def _scored_pair(obj: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """UltraFeedback-binarized rows rate both answers: equal ratings state no preference, so
    the pair is a tie (the publisher kept the row as a pair; the raw ``ultrafeedback`` reader,
    which makes the pairs itself, makes none). The ratings give no margin: ``score`` writes a
    reward model's scores under the same names, also into such rows, and those are no
    ratings (two exactly equal float scores are vanishingly rare)."""
    if any(obj.get(key) is None for key in UFB_KEYS):
        return options
    if F.number(obj["score_chosen"], "score_chosen") == F.number(obj["score_rejected"],
                                                                  "score_rejected"):
        return {**options, "tie": True}
    return options


def _split_hh(transcript: str, name: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0 and HH_HUMAN not in transcript:
        raise F.Invalid(name, 'has no "\\n\\nAssistant:" turn: not an HH transcript (TRL '
                        "implicit-prompt rows, plain answers without a prompt, are not "
                        "supported: add a 'prompt' field and use --format trl)")
    if cut < 0:
        raise F.Invalid(name, 'has no "\\n\\nAssistant:" turn')
    prompt, answer = transcript[: cut + len(HH_ASSISTANT)], transcript[cut + len(HH_ASSISTANT):]
    if HH_HUMAN not in prompt:
        raise F.Invalid(name, 'has no "\\n\\nHuman:" turn before the final assistant answer')
    if HH_HUMAN in answer:
        raise F.Invalid(name, "ends with a human turn; the last turn must be the assistant's")
    return prompt, answer


def _parse_hh(obj: dict[str, Any]) -> list[Record]:
    prompt, chosen = _split_hh(F.string(F.required(obj, "chosen"), "chosen"), "chosen")
    other, rejected = _split_hh(F.string(F.required(obj, "rejected"), "rejected"), "rejected")
    if other != prompt:
        raise F.Invalid("rejected", "differs from 'chosen' before the final assistant answer; "
                       "a pair must share its earlier turns")
    return [PairRecord(prompt, chosen, rejected, **_pair_options(obj))]


def _rated_completion(item: Any, name: str) -> tuple[str, float]:
    if isinstance(item, str):
        raise F.Invalid(name, "is a string, not an object with a text and a rating (TRL "
                       "stepwise-supervision rows, completions with labels, are not supported)")
    if not isinstance(item, dict):
        raise F.Invalid(name, f"must be an object with a text and a rating, got {F.kind_of(item)}")
    for key in ("response", "text"):
        if item.get(key) is not None:
            text = F.string(item[key], f"{name}.{key}")
            break
    else:
        raise F.Invalid(f"{name}.response", "is missing (give 'response' or 'text')")
    for key in RATING_KEYS:
        if item.get(key) is not None:
            return text, F.number(item[key], f"{name}.{key}")
    raise F.Invalid(f"{name}.overall_score", f"is missing (give one of {list(RATING_KEYS)})")


def _parse_ultrafeedback(obj: dict[str, Any]) -> list[Record]:
    key = "prompt" if obj.get("prompt") is not None else "instruction"
    prompt = F.text(F.required(obj, key), key)
    completions = F.required(obj, "completions")
    if not isinstance(completions, list):
        raise F.Invalid("completions", f"must be a list, got {F.kind_of(completions)}")
    rated = [_rated_completion(c, f"completions[{i}]") for i, c in enumerate(completions)]
    annotator, row_id = F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS), F.ident(obj)
    pairs: list[Record] = []
    for i, (text_i, score_i) in enumerate(rated):
        for text_j, score_j in rated[i + 1:]:
            if score_i == score_j or text_i == text_j:
                continue  # equal ratings (or equal texts) state no preference
            (win, win_score), (lose, lose_score) = sorted(
                [(text_i, score_i), (text_j, score_j)], key=lambda c: -c[1])
            pairs.append(PairRecord(prompt, win, lose, margin=win_score - lose_score,
                                    annotator=annotator, id=row_id))
    return pairs


def _parse_ranking(obj: dict[str, Any]) -> list[Record]:
    prompt = F.text(F.required(obj, "prompt"), "prompt")
    responses = F.required(obj, "responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise F.Invalid("responses", "must be a list of at least 2 answers")
    responses = [F.text(r, f"responses[{i}]", answer=True) for i, r in enumerate(responses)]
    F.distinct(responses, "responses")
    try:
        ranking = validate_ranking(F.required(obj, "ranking"), list(range(len(responses))))
    except ValueError as exc:
        raise F.Invalid("ranking", f"must order the indices 0..{len(responses) - 1} of "
                       f"'responses', each once, best group first: {exc}") from None
    return [RankingRecord(prompt, responses, ranking, **_ranking_options(obj, len(responses)))]


def _parse_kto(obj: dict[str, Any]) -> list[Record]:
    return [UnpairedRecord(
        F.text(F.required(obj, "prompt"), "prompt"),
        F.text(F.required(obj, "completion"), "completion", answer=True),
        F.boolean(obj, "label"),
        F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS),
        F.ident(obj),
    )]


def _first_user(messages: Any) -> Any:
    if isinstance(messages, list):
        return next((m.get("content") for m in messages
                     if isinstance(m, dict) and m.get("role") == "user"), None)
    return None


def _parse_sft(obj: dict[str, Any]) -> list[Record]:
    forms = [k for k in ("messages", "text", "prompt") if obj.get(k) is not None]
    if (forms == ["messages", "prompt"] and obj.get("completion") is None
            and obj["prompt"] == _first_user(obj["messages"])):
        forms = ["messages"]  # ultrachat / UltraFeedback train_sft: the prompt is a copy
    if len(forms) != 1:
        raise F.Invalid(forms[-1] if forms else "completion",
                       "give exactly one of 'messages', 'text', or 'prompt' + 'completion' "
                       "(a 'prompt' beside 'messages' may only repeat the first user turn)")
    if forms == ["messages"]:
        return [SFTRecord(messages=F.chat(obj["messages"], "messages", answer=True),
                          id=F.ident(obj))]
    if forms == ["text"]:
        return [SFTRecord(text=F.string(obj["text"], "text"), id=F.ident(obj))]
    return [SFTRecord(prompt=F.text(obj["prompt"], "prompt"),
                      completion=F.text(F.required(obj, "completion"), "completion", answer=True),
                      id=F.ident(obj))]


PARSERS: dict[str, Callable[[dict[str, Any]], list[Record]]] = {
    "prompts": _parse_prompts,
    "candidates": _parse_candidates,
    "trl": _parse_trl,
    "ranking": _parse_ranking,
    "hh": _parse_hh,
    "ultrafeedback": _parse_ultrafeedback,
    "kto": _parse_kto,
    "sft": _parse_sft,
    "arena": parse_arena,
    "shp": parse_shp,
    "saferlhf-better": parse_saferlhf_better,
    "saferlhf-safer": parse_saferlhf_safer,
}


# -- writing: one record -> one row -----------------------------------------------------------


def _compact(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _judgment_extras(r: PairRecord | RankingRecord) -> dict[str, Any]:
    return {"margin": r.margin, "annotator": r.annotator, "id": r.id,
            "dimension": r.dimension, "both_bad": True if r.both_bad else None,
            "strength": r.strength, "rationale": r.rationale, "time_ms": r.time_ms,
            "guideline_version": r.guideline_version}


def _pair_extras(r: PairRecord) -> dict[str, Any]:
    chosen_model, rejected_model = r.models or (None, None)
    return {**_judgment_extras(r), "tie": True if r.tie else None,
            "chosen_model": chosen_model, "rejected_model": rejected_model}


def _ranking_row(r: RankingRecord) -> dict[str, Any]:
    return _compact(prompt=r.prompt, responses=r.responses, ranking=r.ranking,
                    **_judgment_extras(r), models=r.models, shown_order=r.shown_order)


def _hh_row(r: PairRecord) -> dict[str, Any]:
    for answer in (r.chosen, r.rejected):
        for message in completion_messages(r.prompt, answer):
            text = str(message["content"])
            if HH_HUMAN in text or HH_ASSISTANT in text:
                raise UserError(f"cannot write as hh: the answer {text[:60]!r}... contains an HH "
                                "turn marker, so it would not read back; use --format trl")
    problem = hh_unwritable(r)
    if problem is not None:
        raise UserError(f"cannot write as hh: one of the {problem}")
    chosen, rejected = hh_transcripts(r)
    return _compact(chosen=chosen, rejected=rejected, **_pair_extras(r))


ROW_WRITERS: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "prompts": (PromptRecord, lambda r: _compact(prompt=r.prompt, meta=r.meta or None, id=r.id)),
    "candidates": (CandidatesRecord, lambda r: _compact(
        prompt=r.prompt, responses=r.responses, models=r.models, id=r.id)),
    "trl": (PairRecord, lambda r: _compact(
        prompt=r.prompt, chosen=r.chosen, rejected=r.rejected, **_pair_extras(r))),
    "ranking": (RankingRecord, _ranking_row),
    "hh": (PairRecord, _hh_row),
    "kto": (UnpairedRecord, lambda r: _compact(
        prompt=r.prompt, completion=r.completion, label=r.label, annotator=r.annotator, id=r.id)),
    "sft": (SFTRecord, lambda r: _compact(
        prompt=r.prompt, completion=r.completion, messages=r.messages, text=r.text, id=r.id)),
}
