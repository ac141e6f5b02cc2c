"""Published preference data sets, read in the shape their owners publish them.

- ``arena``: Chatbot Arena conversations (``lmsys/chatbot_arena_conversations``): one battle a
  row with ``model_a``, ``model_b``, ``winner`` (``model_a``, ``model_b``, ``tie`` or
  ``tie (bothbad)``), ``conversation_a``/``conversation_b`` and the voter in ``judge``.
  -> a PairRecord with the two model names, ties kept (``both_bad`` for "tie (bothbad)").
- ``oasst``: OpenAssistant message trees (``OpenAssistant/oasst1``): one message a row with
  ``message_id``, ``parent_id``, ``role`` (``prompter``/``assistant``), ``text`` and ``rank``.
  -> one RankingRecord per prompter message with 2+ ranked assistant replies; the prompt is the
  conversation from the tree's root (rank 0 is best, equal ranks tie).
- ``shp``: Stanford Human Preferences (``stanfordnlp/SHP``): ``history``, ``human_ref_A``/``B``,
  ``score_A``/``B`` and ``labels`` (1 when A is preferred). -> a PairRecord whose margin is
  ln(winner's score / loser's score) when both scores are positive.
- ``saferlhf-better`` / ``saferlhf-safer``: PKU-SafeRLHF rows (``prompt``, ``response_0``,
  ``response_1``, ``better_response_id``, ``safer_response_id``) judge each pair twice. The
  format name picks the dimension; each PairRecord carries it in ``dimension``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from rewardloop.data import _fields as F
from rewardloop.data.records import PairRecord, RankingRecord, Record, Text, split_shared
from rewardloop.data.sources import Location, data_error

ARENA_WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
SAFERLHF_DIMENSIONS = ("better", "safer")


def _model(obj: dict[str, Any], key: str) -> str:
    name = F.ident(obj, key, F.MAX_ID_CHARS)
    if name is None:
        raise F.Invalid(key, "is missing")
    return name


def parse_arena(obj: dict[str, Any]) -> list[Record]:
    """One Arena battle -> a pair (winner first) with model names; ties keep A first."""
    model_a, model_b = _model(obj, "model_a"), _model(obj, "model_b")
    winner = F.required(obj, "winner")
    if winner not in ARENA_WINNERS:
        raise F.Invalid("winner", f"must be one of {list(ARENA_WINNERS)}, got {winner!r}")
    conv_a = F.chat(F.required(obj, "conversation_a"), "conversation_a", answer=True)
    conv_b = F.chat(F.required(obj, "conversation_b"), "conversation_b", answer=True)
    prompt, answer_a, answer_b = split_shared(conv_a, conv_b)
    if not prompt:
        raise F.Invalid("conversation_b", "shares no leading user turn with conversation_a")
    models: list[str | None] = [model_a, model_b]
    chosen, rejected = answer_a, answer_b
    if winner == "model_b":
        chosen, rejected, models = answer_b, answer_a, [model_b, model_a]
    return [PairRecord(
        prompt, chosen, rejected, annotator=F.ident(obj, "judge", F.MAX_ANNOTATOR_CHARS),
        id=F.ident(obj, "question_id"), tie=winner.startswith("tie"), models=models,
        both_bad=winner == "tie (bothbad)")]


def _score(obj: dict[str, Any], key: str) -> float:
    return F.number(F.required(obj, key), key)


def parse_shp(obj: dict[str, Any]) -> list[Record]:
    """One SHP pair: ``labels`` (else the higher score) picks the winner."""
    prompt = F.string(F.required(obj, "history"), "history")
    answer_a = F.string(F.required(obj, "human_ref_A"), "human_ref_A")
    answer_b = F.string(F.required(obj, "human_ref_B"), "human_ref_B")
    score_a, score_b = _score(obj, "score_A"), _score(obj, "score_B")
    labels = obj.get("labels")
    if labels is not None and labels not in (0, 1):
        raise F.Invalid("labels", f"must be 1 (A preferred) or 0 (B preferred), got {labels!r}")
    a_wins = bool(labels) if labels is not None else score_a > score_b
    tie = labels is None and score_a == score_b
    (chosen, win), (rejected, lose) = ((answer_a, score_a), (answer_b, score_b)) if (
        a_wins or tie) else ((answer_b, score_b), (answer_a, score_a))
    margin = math.log(win / lose) if win > 0 and lose > 0 and not tie else None
    return [PairRecord(prompt, chosen, rejected, margin=margin, id=F.ident(obj, "post_id"),
                       tie=tie)]


def _saferlhf(obj: dict[str, Any], dimension: str) -> list[Record]:
    prompt = F.text(F.required(obj, "prompt"), "prompt")
    answers = [F.text(F.required(obj, f"response_{i}"), f"response_{i}", answer=True)
               for i in (0, 1)]
    key = f"{dimension}_response_id"
    best = F.required(obj, key)
    # 1.0 counts: pandas writes an int column with nulls as floats.
    if isinstance(best, bool) or not isinstance(best, int | float) or best not in (0, 1):
        raise F.Invalid(key, f"must be 0 or 1, got {best!r}")
    best = int(best)
    sources = [obj.get(f"response_{i}_source") for i in (0, 1)]
    models = None
    if any(sources):
        models = [F.ident(obj, f"response_{i}_source", F.MAX_ID_CHARS) for i in (best, 1 - best)]
    return [PairRecord(prompt, answers[best], answers[1 - best], id=F.ident(obj),
                       models=models, dimension=dimension)]


def parse_saferlhf_better(obj: dict[str, Any]) -> list[Record]:
    """PKU-SafeRLHF's helpfulness label: ``better_response_id`` wins."""
    return _saferlhf(obj, "better")


def parse_saferlhf_safer(obj: dict[str, Any]) -> list[Record]:
    """PKU-SafeRLHF's harmlessness label: ``safer_response_id`` wins."""
    return _saferlhf(obj, "safer")


# -- OpenAssistant trees: a whole-file parser (a ranking needs all siblings) -------------------


class _Message:
    __slots__ = ("parent", "role", "text", "rank", "where")

    def __init__(self, parent: str | None, role: str, text: str, rank: float | None,
                 where: Location) -> None:
        self.parent, self.role, self.text, self.rank, self.where = parent, role, text, rank, where


def _oasst_message(obj: dict[str, Any], where: Location) -> tuple[str, _Message | None]:
    """(message_id, message); the message is None when it was deleted."""
    try:
        message_id = F.ident(obj, "message_id")
        if message_id is None:
            raise F.Invalid("message_id", "is missing")
        role = F.required(obj, "role")
        if role not in OASST_ROLES:
            raise F.Invalid("role", f"must be one of {list(OASST_ROLES)}, got {role!r}")
        text = F.string(F.required(obj, "text"), "text")
        rank = obj.get("rank")
        rank = None if rank is None else F.number(rank, "rank")
        parent = F.ident(obj, "parent_id")
        if F.boolean(obj, "deleted", default=False):
            return message_id, None
        return message_id, _Message(parent, role, text, rank, where)
    except F.Invalid as exc:
        raise data_error(where, str(exc), exc.field) from None


def _conversation(messages: dict[str, _Message], message_id: str) -> list[dict[str, str]] | None:
    """Root -> ``message_id`` as chat messages; None when a deleted message cuts the path."""
    path = []
    current: str | None = message_id
    while current is not None:
        message = messages.get(current)
        if message is None:
            return None
        path.append({"role": OASST_ROLES[message.role], "content": message.text})
        current = message.parent
    return path[::-1]


def _sibling_ranking(replies: list[_Message]) -> tuple[list[Text], list[list[int]]]:
    """Distinct reply texts and their ranking (rank 0 first, equal ranks tied)."""
    texts: list[Text] = []
    groups: dict[float, list[int]] = {}
    for reply in sorted(replies, key=lambda m: m.rank or 0.0):
        if reply.text in texts:
            continue  # the same text twice says nothing about itself
        groups.setdefault(reply.rank or 0.0, []).append(len(texts))
        texts.append(reply.text)
    return texts, [groups[r] for r in sorted(groups)]


def stream_oasst(rows: Iterator[tuple[Location, dict[str, Any]]]) -> Iterator[Record]:
    """Rankings of ranked sibling assistant replies, one per prompter message.

    The whole tree has to be seen before a prompt can be rebuilt, so the messages (not the
    records) are held in memory. A parent_id that names no message of the file is an error at
    the child's row; replies below a deleted message are left out.
    """
    messages: dict[str, _Message] = {}
    seen: set[str] = set()  # deleted messages too
    missing: dict[str, Location] = {}
    for where, obj in rows:
        message_id, message = _oasst_message(obj, where)
        seen.add(message_id)
        missing.pop(message_id, None)
        if message is None:
            continue
        messages[message_id] = message
        if message.parent is not None and message.parent not in seen:
            missing.setdefault(message.parent, where)
    for parent, where in missing.items():
        raise data_error(where, f"names message {parent!r}, which is not in the data",
                         "parent_id")
    replies: dict[str, list[_Message]] = {}
    for message in messages.values():
        if message.role == "assistant" and message.rank is not None and message.parent:
            replies.setdefault(message.parent, []).append(message)
    for parent, siblings in replies.items():
        prompt = _conversation(messages, parent)
        texts, ranking = _sibling_ranking(siblings)
        if prompt is None or len(texts) < 2 or messages[parent].role != "prompter":
            continue
        yield RankingRecord(prompt, texts, ranking, id=parent)
