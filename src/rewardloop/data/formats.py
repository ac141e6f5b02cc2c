"""Preference-data files: JSONL readers and writers for every format rewardloop speaks.

One JSON object a line; blank lines are allowed. Reading is strict: the first problem stops it
with a :class:`DataError` naming the file, the 1-based line and the field. Writing is atomic
(temp file, fsync, rename) and every format rewardloop writes reads back to equal records.

Formats (``FORMATS``) and the record each yields:

- ``prompts``: ``prompt`` (text or chat) or ``messages``; ``id``, ``meta`` -> :class:`PromptRecord`
- ``candidates``: ``prompt``, ``responses``, ``models`` -> :class:`CandidatesRecord`
- ``trl``: ``prompt``, ``chosen``, ``rejected`` (or chat lists without ``prompt``, the prompt then
  being their shared leading messages); ``margin``, ``annotator``, ``tie`` -> :class:`PairRecord`
- ``ranking``: ``prompt``, ``responses``, ``ranking`` (groups of indices) -> :class:`RankingRecord`
- ``hh``: ``chosen``/``rejected`` whole HH-RLHF transcripts -> :class:`PairRecord`
- ``ultrafeedback``: ``prompt``/``instruction``, rated ``completions`` -> :class:`PairRecord`\\ s
  (read only: higher rating wins, margin = rating difference, equal ratings give no pair)
- ``kto``: ``prompt``, ``completion``, ``label`` -> :class:`UnpairedRecord`
- ``sft``: ``prompt`` + ``completion``, ``messages`` or ``text`` -> :class:`SFTRecord`

Records, text types and chat accessors live in :mod:`rewardloop.data.records` and are re-exported
here. Optional fields are omitted when written empty.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterable
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
    is_chat,
    prompt_text,
    response_text,
)
from rewardloop.data.values import validate_ranking
from rewardloop.errors import DataError, UserError
from rewardloop.util.files import atomic_file

__all__ = [
    "CHAT_ROLES", "FORMATS", "WRITABLE", "CandidatesRecord", "Chat", "Message", "PairRecord",
    "PromptRecord", "RankingRecord", "Record", "SFTRecord", "Text", "UnpairedRecord",
    "as_messages", "completion_messages", "detect_format", "hh_transcripts", "is_chat",
    "prompt_text", "read_as", "read_records", "response_text", "write_records",
]

R = TypeVar("R")

# Completion rating keys, in order of preference (UltraFeedback's own key first).
RATING_KEYS = ("overall_score", "rating", "score", "fine-grained_score")


# -- row parsers: one JSON object -> records ---------------------------------------------------


def _parse_prompts(obj: dict[str, Any]) -> list[Record]:
    key = "prompt" if obj.get("prompt") is not None else "messages"
    raw = F.required(obj, key)
    prompt = F.text(raw, key) if key == "prompt" else F.chat(raw, key)
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


def _pair_options(obj: dict[str, Any]) -> dict[str, Any]:
    margin = obj.get("margin")
    return {
        "margin": None if margin is None else F.number(margin, "margin"),
        "annotator": F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS),
        "id": F.ident(obj),
        "tie": F.boolean(obj, "tie", default=False),
    }


def _parse_trl(obj: dict[str, Any]) -> list[Record]:
    chosen = F.text(F.required(obj, "chosen"), "chosen", answer=True)
    rejected = F.text(F.required(obj, "rejected"), "rejected", answer=True)
    if obj.get("prompt") is not None:
        prompt = F.text(obj["prompt"], "prompt")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's "implicit prompt" form: the prompt is the conversation both answers share.
        shared = 0
        while (shared < min(len(chosen), len(rejected)) - 1
               and chosen[shared] == rejected[shared]):
            shared += 1
        if shared == 0:
            raise F.Invalid("prompt", "is missing, and chosen/rejected share no leading messages")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise F.Invalid("prompt", "is missing (whole HH transcripts are --format hh)")
    return [PairRecord(prompt, chosen, rejected, **_pair_options(obj))]


def _split_hh(transcript: str, name: str) -> tuple[str, str]:
    cut = transcript.rfind(HH_ASSISTANT)
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
    return [RankingRecord(prompt, responses, ranking,
                          F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS), F.ident(obj))]


def _parse_kto(obj: dict[str, Any]) -> list[Record]:
    return [UnpairedRecord(
        F.text(F.required(obj, "prompt"), "prompt"),
        F.text(F.required(obj, "completion"), "completion", answer=True),
        F.boolean(obj, "label"),
        F.ident(obj, "annotator", F.MAX_ANNOTATOR_CHARS),
        F.ident(obj),
    )]


def _parse_sft(obj: dict[str, Any]) -> list[Record]:
    forms = [k for k in ("messages", "text", "prompt") if obj.get(k) is not None]
    if len(forms) != 1:
        raise F.Invalid(forms[-1] if forms else "completion",
                       "give exactly one of 'messages', 'text', or 'prompt' + 'completion'")
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
}
FORMATS: tuple[str, ...] = tuple(_PARSERS)


# -- reading -----------------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _rows(path: Path) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """(1-based line number, object) for each non-blank line; lines may be of any length."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"not UTF-8 text (bad byte at column {exc.start + 1})",
                                path=str(path), line=number) from None
            line = line.removeprefix("\ufeff") if number == 1 else line
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_reject_constant)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg} at column {exc.colno}",
                                path=str(path), line=number) from None
            except (ValueError, RecursionError) as exc:
                raise DataError(f"not valid JSON: {exc}", path=str(path), line=number) from None
            if not isinstance(obj, dict):
                raise DataError(f"each line must be a JSON object, got {F.kind_of(obj)}",
                                path=str(path), line=number)
            yield number, obj


def _guess(obj: dict[str, Any]) -> str | None:
    """The format a row's keys point to (None when they point nowhere)."""
    keys = set(obj)
    if {"chosen", "rejected"} <= keys:
        return "hh" if "prompt" not in keys and isinstance(obj["chosen"], str) else "trl"
    for key, fmt in (("completions", "ultrafeedback"), ("ranking", "ranking"),
                     ("responses", "candidates"), ("label", "kto"), ("completion", "sft"),
                     ("text", "sft")):
        if key in keys:
            return fmt
    messages = obj.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        # A conversation that ends with the assistant is SFT data; otherwise it awaits an answer.
        return "sft" if messages[-1].get("role") == "assistant" else "prompts"
    return "prompts" if "prompt" in keys else None


def _empty(path: Path) -> DataError:
    return DataError("the file is empty: expected one JSON object per line", path=str(path))


def detect_format(path: str | Path) -> str:
    """The format of a JSONL file, from the keys of its first non-blank row.

    Later rows are not consulted: a row that lacks a field of the detected format is then
    reported by :func:`read_records` as that missing field, which is the useful message.
    """
    path = _existing(path)
    rows = _rows(path)
    try:
        number, obj = next(rows)
    except StopIteration:
        raise _empty(path) from None
    finally:
        rows.close()
    guess = _guess(obj)
    if guess is None:
        raise DataError(f"cannot tell the format from the keys {sorted(obj)}; pass --format "
                        f"(one of {', '.join(FORMATS)})", path=str(path), line=number)
    return guess


def check_format(fmt: str, known: Iterable[str] = FORMATS) -> str:
    """``fmt`` if it is one of ``known``, else a UserError listing them."""
    known = tuple(known)
    if fmt not in known:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(known)}")
    return fmt


def read_records(path: str | Path, fmt: str | None = None) -> tuple[str, list[Record]]:
    """Read and validate a whole file: ``(format, records)``; ``fmt=None`` detects the format.

    Raises DataError (file, line, field) on the first bad row, or for a file with no rows.
    """
    path = _existing(path)
    fmt = detect_format(path) if fmt is None else check_format(fmt)
    parse = _PARSERS[fmt]
    records: list[Record] = []
    rows = 0
    for number, obj in _rows(path):
        rows += 1
        try:
            records.extend(parse(obj))
        except F.Invalid as exc:
            raise DataError(str(exc), path=str(path), line=number, field=exc.field) from None
    if rows == 0:
        raise _empty(path)
    return fmt, records


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


def _pair_extras(r: PairRecord) -> dict[str, Any]:
    tie = True if r.tie else None
    return {"margin": r.margin, "annotator": r.annotator, "id": r.id, "tie": tie}


def _hh_row(r: PairRecord) -> dict[str, Any]:
    for answer in (r.chosen, r.rejected):
        text = response_text(answer)
        if HH_HUMAN in text or HH_ASSISTANT in text:
            raise UserError(f"cannot write as hh: the answer {text[:60]!r}... contains an HH turn "
                            "marker, so it would not read back; use --format trl")
    chosen, rejected = hh_transcripts(r)
    return _compact(chosen=chosen, rejected=rejected, **_pair_extras(r))


_WRITERS: dict[str, tuple[type, Callable[[Any], dict[str, Any]]]] = {
    "prompts": (PromptRecord, lambda r: _compact(prompt=r.prompt, meta=r.meta or None, id=r.id)),
    "candidates": (CandidatesRecord, lambda r: _compact(
        prompt=r.prompt, responses=r.responses, models=r.models, id=r.id)),
    "trl": (PairRecord, lambda r: _compact(
        prompt=r.prompt, chosen=r.chosen, rejected=r.rejected, **_pair_extras(r))),
    "ranking": (RankingRecord, lambda r: _compact(
        prompt=r.prompt, responses=r.responses, ranking=r.ranking, annotator=r.annotator,
        id=r.id)),
    "hh": (PairRecord, _hh_row),
    "kto": (UnpairedRecord, lambda r: _compact(
        prompt=r.prompt, completion=r.completion, label=r.label, annotator=r.annotator, id=r.id)),
    "sft": (SFTRecord, lambda r: _compact(
        prompt=r.prompt, completion=r.completion, messages=r.messages, text=r.text, id=r.id)),
}
WRITABLE: tuple[str, ...] = tuple(_WRITERS)


def write_records(path: str | Path, fmt: str, records: Iterable[Record]) -> int:
    """Write ``records`` as ``fmt`` atomically (temp file, fsync, rename); returns the row count.

    A reader never sees a half-written file, and a failure leaves any old file in place.
    """
    cls, to_row = _WRITERS[check_format(fmt, WRITABLE)]
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist")
    count = 0
    with atomic_file(path) as fh:
        for record in records:
            if not isinstance(record, cls):
                raise TypeError(f"{fmt} rows are written from {cls.__name__}, "
                                f"got {type(record).__name__}")
            fh.write(json.dumps(to_row(record), ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count
