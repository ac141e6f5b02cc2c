"""Preference-data files: readers and writers for every format rewardloop speaks.

Rows come from JSONL, Parquet or Arrow files or dataset folders (:mod:`.sources`). Reading is
strict: the first problem stops it with a :class:`DataError` naming the file, the 1-based line
(JSONL) or row (columnar) and the field. Writing is atomic (temp file, fsync, rename) and every
format rewardloop writes reads back to equal records.

Formats (``FORMATS``) and the record each yields:

- ``prompts``: ``prompt`` (text or chat) or ``messages``; ``id``, ``meta`` -> :class:`PromptRecord`
- ``candidates``: ``prompt``, ``responses``, ``models`` -> :class:`CandidatesRecord`
- ``trl``: ``prompt``, ``chosen``, ``rejected`` (or chat lists without ``prompt``, the prompt then
  being their shared leading messages); ``margin``, ``annotator``, ``tie``, ``chosen_model``,
  ``rejected_model`` and the judgment fields -> :class:`PairRecord`
- ``ranking``: ``prompt``, ``responses``, ``ranking`` (groups of indices); ``models``,
  ``margin``, ``shown_order`` and the judgment fields -> :class:`RankingRecord`

  (judgment fields: ``dimension``, ``both_bad``, ``strength``, ``rationale``, ``time_ms``,
  ``guideline_version``)
- ``hh``: ``chosen``/``rejected`` whole HH-RLHF transcripts -> :class:`PairRecord`
- ``ultrafeedback``: ``prompt``/``instruction``, rated ``completions`` -> :class:`PairRecord`\\ s
  (read only: higher rating wins, margin = rating difference, equal ratings give no pair)
- ``kto``: ``prompt``, ``completion``, ``label`` -> :class:`UnpairedRecord`
- ``sft``: ``prompt`` + ``completion``, ``messages`` or ``text`` -> :class:`SFTRecord`
- ``arena``, ``oasst``, ``shp``, ``saferlhf-better``, ``saferlhf-safer``: published data sets
  in their owners' shapes (read only; see :mod:`rewardloop.data.shapes`)

Records, text types and chat accessors live in :mod:`rewardloop.data.records` and are re-exported
here. Optional fields are omitted when written empty; a null optional field reads as absent.
The ``prompts`` reader gives a text prompt whose row has chat answers as one user turn, as the
trainers tokenise it (see :mod:`rewardloop.tokenize`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rewardloop.data import _fields as F
from rewardloop.data.records import (
    CHAT_ROLES,
    HH_ASSISTANT,
    HH_HUMAN,
    CandidatesRecord,
    Chat,
    Message,
    PairRecord,
    PromptRecord,
    RankingRecord,
    Record,
    SFTRecord,
    Text,
    UnpairedRecord,
    as_messages,
    completion_messages,
    hh_transcripts,
    hh_unwritable,
    is_chat,
    prompt_text,
    response_text,
    split_shared,
)
from rewardloop.data.shapes import (
    parse_arena,
    parse_saferlhf_better,
    parse_saferlhf_safer,
    parse_shp,
    stream_oasst,
)
from rewardloop.data.sources import COLUMNAR, Location, data_error, open_source, rows
from rewardloop.data.values import STRENGTHS, validate_ranking
from rewardloop.errors import DataError, UserError
from rewardloop.util.files import atomic_file

__all__ = [
    "CHAT_ROLES", "FORMATS", "WRITABLE", "CandidatesRecord", "Chat", "Message", "PairRecord",
    "PromptRecord", "RankingRecord", "Record", "SFTRecord", "Text", "UnpairedRecord",
    "as_messages", "completion_messages", "detect_format", "hh_transcripts", "hh_unwritable",
    "is_chat",
    "iter_records", "prompt_text", "read_as", "read_records", "read_training_records",
    "response_text", "write_dataset", "write_records",
]

R = TypeVar("R")

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


_PARSERS: dict[str, Callable[[dict[str, Any]], list[Record]]] = {
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
Rows = Iterator[tuple[Location, dict[str, Any]]]
# Formats whose records need more than one row (a ranking of an oasst tree's siblings).
_STREAMS: dict[str, Callable[[Rows], Iterator[Record]]] = {"oasst": stream_oasst}
FORMATS: tuple[str, ...] = (*_PARSERS, *_STREAMS)


# -- reading -----------------------------------------------------------------------------------


# A preference-format key makes a row a comparison even when another of its keys is missing:
# the row is then reported as missing that key, never read as a bare prompt.
_ROW_KEYS = (("completions", "ultrafeedback"), ("ranking", "ranking"),
             ("responses", "candidates"), ("label", "kto"), ("completion", "sft"),
             ("text", "sft"))
DETECT_ROWS = 100
"""Rows :func:`detect_format` reads: all of them must point to one format."""


def _guess(obj: dict[str, Any]) -> str | None:
    """The format a row's keys point to (None when they point nowhere)."""
    keys = set(obj)
    for shape, fmt in (({"model_a", "model_b", "winner"}, "arena"),
                       ({"message_id", "role", "text"}, "oasst"),
                       ({"score_A", "score_B"}, "shp"),
                       ({"better_response_id", "safer_response_id"}, "saferlhf-better")):
        if shape <= keys:
            return fmt
    if keys & {"chosen", "rejected"}:
        answer = obj.get("chosen", obj.get("rejected"))
        return "hh" if "prompt" not in keys and isinstance(answer, str) else "trl"
    for key, fmt in _ROW_KEYS:
        if key in keys:
            return fmt
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        # A conversation that ends with the assistant is SFT data; otherwise it awaits an answer.
        return "sft" if messages[-1].get("role") == "assistant" else "prompts"
    return "prompts" if "prompt" in keys else None


def _empty(name: str) -> DataError:
    return DataError("the input is empty: expected one object per line or row", path=name)


def _unit(where: Location) -> str:
    return f"{where.unit} {where.number}"


def detect_format(path: str | Path, split: str | None = None) -> str:
    """The format of a data file or folder, from the keys of its first ``DETECT_ROWS`` rows.

    They must all point to one format (a ``trl`` row without ``rejected`` still points to
    ``trl`` and is then reported as missing it); rows that point to different formats are a
    DataError naming both, so a broken file is never read as some other format.
    """
    source = open_source(path, split)
    stream = rows(source)
    first: tuple[Location, str] | None = None
    try:
        for where, obj in itertools.islice(stream, DETECT_ROWS):
            guess = _guess(obj)
            if first is None:
                if guess is None:
                    raise data_error(where, f"cannot tell the format from the keys "
                                     f"{sorted(obj)}; pass --format (one of {', '.join(FORMATS)})")
                first = (where, guess)
            elif guess is not None and guess != first[1]:
                raise data_error(where, f"looks like {guess} (keys {sorted(obj)}) but "
                                 f"{_unit(first[0])} like {first[1]}; the rows must be of one "
                                 f"format: fix the file or pass --format")
    finally:
        stream.close()
    if first is None:
        raise _empty(source.name)
    return first[1]


def check_format(fmt: str, known: Iterable[str] = FORMATS) -> str:
    """``fmt`` if it is one of ``known``, else a UserError listing them."""
    known = tuple(known)
    if fmt not in known:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(known)}")
    return fmt


def _parsed(parse: Callable[[dict[str, Any]], list[Record]], stream: Rows) -> Iterator[Record]:
    for where, obj in stream:
        try:
            yield from parse(obj)
        except F.Invalid as exc:
            raise data_error(where, str(exc), exc.field) from None


def _counted(stream: Rows, name: str) -> Rows:
    """``stream``, raising the no-rows error once it ends without a row."""
    empty = True
    for item in stream:
        empty = False
        yield item
    if empty:
        raise _empty(name)


def iter_records(path: str | Path, fmt: str | None = None, split: str | None = None
                 ) -> tuple[str, Iterator[Record]]:
    """``(format, records)`` of any input :func:`open_source` takes, streamed row by row.

    ``fmt=None`` detects the format. The iterator raises DataError (file, line or row, field)
    at the first bad row, or at the end for an input with no rows.
    """
    source = open_source(path, split)
    fmt = detect_format(path, split) if fmt is None else check_format(fmt)
    stream = _counted(rows(source), source.name)
    if fmt in _STREAMS:
        return fmt, _STREAMS[fmt](stream)
    return fmt, _parsed(_PARSERS[fmt], stream)


def read_records(path: str | Path, fmt: str | None = None, split: str | None = None
                 ) -> tuple[str, list[Record]]:
    """Read and validate a whole input: ``(format, records)``; see :func:`iter_records`.

    The one reader trainers and commands call: a JSONL, Parquet or Arrow file, a saved
    ``datasets`` directory or a Hub-style folder (``DIR:SPLIT`` picks a split).
    """
    fmt, records = iter_records(path, fmt, split)
    return fmt, list(records)


# What each published shape's records are, for trainers that choose a loss by record kind.
TRAINING_KIND = {"arena": "trl", "shp": "trl", "saferlhf-better": "trl", "saferlhf-safer": "trl",
                 "oasst": "ranking"}


def read_training_records(path: str | Path, fmt: str | None = None, split: str | None = None
                          ) -> tuple[str, list[Record]]:
    """:func:`read_records` for trainers: the format comes back as the kind of its records.

    A published shape (Arena, SHP, PKU-SafeRLHF pairs; oasst rankings) reads as ``trl`` or
    ``ranking``, so a trainer that accepts those accepts it too.
    """
    fmt, records = read_records(path, fmt, split)
    return TRAINING_KIND.get(fmt, fmt), records


def read_as(path: str | Path, fmt: str, cls: type[R]) -> list[R]:
    """The records of a file in format ``fmt``, typed as ``cls`` (the record class that format
    reads into, e.g. ``PromptRecord`` for ``prompts``)."""
    records = read_records(path, fmt)[1]
    wrong = next((r for r in records if not isinstance(r, cls)), None)
    if wrong is not None:
        raise TypeError(f"{fmt} rows read as {type(wrong).__name__}, not {cls.__name__}")
    return [r for r in records if isinstance(r, cls)]


# -- writing -----------------------------------------------------------------------------------


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


_WRITERS: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
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
WRITABLE: tuple[str, ...] = tuple(_WRITERS)


def _rows_of(fmt: str, records: Iterable[Record]) -> Iterator[dict[str, Any]]:
    cls, to_row = _WRITERS[check_format(fmt, WRITABLE)]
    for record in records:
        if not isinstance(record, cls):
            raise TypeError(f"{fmt} rows are written from {cls.__name__}, "
                            f"got {type(record).__name__}")
        yield to_row(record)


def write_records(path: str | Path, fmt: str, records: Iterable[Record]) -> int:
    """Write ``records`` as ``fmt`` atomically (temp file, fsync, rename); returns the row count.

    A ``.parquet`` or ``.arrow`` path is written columnar, anything else as JSONL. A reader
    never sees a half-written file, and a failure leaves any old file in place.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist")
    if path.suffix in COLUMNAR:
        from rewardloop.data.columnar import write_table_file  # pyarrow: only when asked

        table_rows = list(_rows_of(fmt, records))
        write_table_file(path, table_rows)
        return len(table_rows)
    count = 0
    with atomic_file(path) as fh:
        for row in _rows_of(fmt, records):
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count


def write_dataset(path: str | Path, fmt: str, records: Iterable[Record]) -> int:
    """Write ``records`` as a directory ``datasets.load_from_disk`` loads; returns the rows."""
    from rewardloop.data.columnar import write_saved_dataset  # pyarrow: only when asked

    table_rows = list(_rows_of(fmt, records))
    write_saved_dataset(Path(path), table_rows)
    return len(table_rows)
