"""The records rewardloop's data files hold, and chat-aware accessors trainers need.

Text is a string or a chat list of ``{"role", "content"}`` messages (extra keys are kept). A chat
*answer* ends with the assistant's message; UltraFeedback-binarized answers also repeat the
prompt before it (:func:`completion_messages` strips it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

Message: TypeAlias = dict[str, Any]
Chat: TypeAlias = list[Message]
Text: TypeAlias = str | Chat

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to generate answers for."""

    prompt: Text
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CandidatesRecord:
    """Candidate answers to one prompt; ``models[i]`` (if given) wrote ``responses[i]``."""

    prompt: Text
    responses: list[str]
    models: list[str | None] | None = None
    id: str | None = None


@dataclass(frozen=True)
class PairRecord:
    """``chosen`` was preferred to ``rejected`` (or, with ``tie``, neither was).

    ``models`` names who wrote (chosen, rejected); ``both_bad`` marks a tie where both answers
    were bad (Chatbot Arena's "tie (bothbad)"); ``dimension`` names what was judged when a data
    set judges one pair on several criteria (PKU-SafeRLHF: ``better`` and ``safer``). The last
    four say how a person gave the judgment (the annotation server records them):
    ``strength`` (``slight``, ``clear``, ``strong``), ``rationale``, ``time_ms`` spent and the
    ``guideline_version`` shown; a pair from a k-way ranking carries its judgment's.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    annotator: str | None = None
    id: str | None = None
    tie: bool = False
    models: list[str | None] | None = None
    dimension: str | None = None
    both_bad: bool = False
    strength: str | None = None
    rationale: str | None = None
    time_ms: int | None = None
    guideline_version: str | None = None


@dataclass(frozen=True)
class RankingRecord:
    """``ranking`` orders ``responses`` by index, best group first; a group of 2+ is a tie.

    Everything a judgment holds comes with it: ``models[i]`` wrote ``responses[i]``;
    ``margin``, ``dimension`` and ``both_bad`` as in :class:`PairRecord`; ``shown_order`` is the
    order (indices) the annotator saw the answers in; the rest as in :class:`PairRecord`.
    """

    prompt: Text
    responses: list[Text]
    ranking: list[list[int]]
    annotator: str | None = None
    id: str | None = None
    models: list[str | None] | None = None
    margin: float | None = None
    dimension: str | None = None
    both_bad: bool = False
    strength: str | None = None
    rationale: str | None = None
    time_ms: int | None = None
    shown_order: list[int] | None = None
    guideline_version: str | None = None


@dataclass(frozen=True)
class UnpairedRecord:
    """A thumbs up (``label=True``) or down for one completion (KTO)."""

    prompt: Text
    completion: Text
    label: bool
    annotator: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class SFTRecord:
    """Supervised data: ``prompt`` + ``completion``, or ``messages``, or ``text`` (one form)."""

    prompt: Text | None = None
    completion: Text | None = None
    messages: Chat | None = None
    text: str | None = None
    id: str | None = None

    def prompt_completion(self) -> tuple[Text, Text]:
        """(prompt, completion) for loss masking: a chat's last message is the completion."""
        if self.messages is not None:
            return self.messages[:-1], self.messages[-1:]
        if self.text is not None:
            return "", self.text
        assert self.prompt is not None and self.completion is not None
        return self.prompt, self.completion


Record: TypeAlias = (
    PromptRecord | CandidatesRecord | PairRecord | RankingRecord | UnpairedRecord | SFTRecord
)


# -- chat-aware accessors ----------------------------------------------------------------------


def is_chat(value: Text) -> bool:
    return isinstance(value, list)


def as_messages(prompt: Text) -> Chat:
    """A prompt as chat messages: a plain string becomes one user message."""
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_text(prompt: Text) -> str:
    """Plain text of a prompt: the string itself, or the chat as ``role: content`` paragraphs."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def response_text(response: Text) -> str:
    """Plain text of an answer: the string itself, or the content of the chat's last message."""
    if isinstance(response, str):
        return response
    return str(response[-1]["content"]) if response else ""


def completion_messages(prompt: Text, response: Text) -> Chat:
    """The answer's own messages, without a leading copy of the prompt (UltraFeedback-binarized
    rows repeat the prompt inside ``chosen``/``rejected``)."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    head = as_messages(prompt)
    return response[len(head):] if response[: len(head)] == head else list(response)


HH_NOT_HUMAN = ("pairs with system, developer or tool messages (HH transcripts have only "
                "Human and Assistant turns)")
HH_TURNS = ("pairs whose answers differ before their last turn (HH takes only the last turn "
            "as the answer; multi-turn answers need --format trl)")


def _hh_turn(message: Message) -> str:
    marker = HH_ASSISTANT if message["role"] == "assistant" else HH_HUMAN
    content = str(message["content"])
    # HH puts one space after the marker; an answer that starts with one already keeps its own
    # (TRL completion-style " blue."), so the text reads back as it was.
    return marker + ("" if content[:1].isspace() else " ") + content


def _hh_conversation(prompt: Text, answer: Text) -> str:
    if (isinstance(prompt, str) and isinstance(answer, str) and prompt.startswith(HH_HUMAN)
            and prompt.endswith(HH_ASSISTANT)):
        return prompt + answer  # read from an HH file: verbatim, so the file round-trips
    turns = as_messages(prompt) + completion_messages(prompt, answer)
    return "".join(_hh_turn(m) for m in turns)


def _hh_conversations(pair: PairRecord) -> tuple[str, str]:
    return (_hh_conversation(pair.prompt, pair.chosen),
            _hh_conversation(pair.prompt, pair.rejected))


def hh_unwritable(pair: PairRecord) -> str | None:
    """Why ``pair`` cannot be written as HH transcripts that read back as the same pair (one
    of ``HH_NOT_HUMAN``, ``HH_TURNS``), or None when it can."""
    messages = [*as_messages(pair.prompt), *(m for answer in (pair.chosen, pair.rejected)
                                             for m in completion_messages(pair.prompt, answer))]
    if any(m["role"] not in ("user", "assistant") for m in messages):
        return HH_NOT_HUMAN
    chosen, rejected = _hh_conversations(pair)
    cut = chosen.rfind(HH_ASSISTANT)
    if cut != rejected.rfind(HH_ASSISTANT) or chosen[:cut] != rejected[:cut]:
        return HH_TURNS
    return None


def hh_transcripts(pair: PairRecord) -> tuple[str, str]:
    """(chosen, rejected) as whole HH-RLHF transcripts, every turn of prompt and answers.

    A prompt read from an HH file (ending in ``"\\n\\nAssistant:"``) is joined verbatim with the
    answers, so HH files round-trip exactly; other prompts are rendered turn by turn. Raises
    ValueError for a pair :func:`hh_unwritable` refuses.
    """
    problem = hh_unwritable(pair)
    if problem is not None:
        raise ValueError(f"cannot write as HH: {problem}")
    return _hh_conversations(pair)


def split_shared(first: Chat, second: Chat) -> tuple[Chat, Chat, Chat]:
    """(shared leading messages, rest of ``first``, rest of ``second``).

    Each rest keeps at least its last message, so two equal conversations still leave an answer
    each. The prompt of TRL's implicit-prompt rows and of Chatbot Arena's conversation pairs.
    """
    shared = 0
    while shared < min(len(first), len(second)) - 1 and first[shared] == second[shared]:
        shared += 1
    return first[:shared], first[shared:], second[shared:]
