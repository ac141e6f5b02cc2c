"""Turning (prompt, completion) pairs into token ids, masks and padded batches.

The one implementation every trainer uses (SFT, reward models, DPO/KTO, RL rollouts), so that
"which tokens belong to the answer" is decided in exactly one place:

- a string prompt is tokenised as is (plus BOS when the tokenizer adds one and the text does not
  already start with it; never the EOS a tokenizer such as Llama 2's with ``add_eos_token``
  appends) and the completion follows it, then EOS;
- a conversation (a chat prompt or a chat completion, lists of ``{"role", "content"}``) goes
  through the tokenizer's chat template: the prompt is the template's rendering of the prompt
  messages with the generation prompt, and the completion is what the template adds for the
  answer's turn, up to and including its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``,
  ``<end_of_turn>``...: ``end_of_turn_id``), not a bare EOS appended after it. What the
  template puts after the end-of-turn token (whitespace; Phi-3's EOS) is left out: generation
  stops at that token and never samples it. A template that ends the turn with no special token
  (a plain ``USER:``/``ASSISTANT:`` one, or ChatML on a vocabulary without ``<|im_end|>``)
  cannot stop generation: its answers get the tokenizer's EOS, with a warning. A
  tokenizer without a chat template is refused for conversations (``--chat-template FILE``
  gives one, ``models.load_tokenizer``). A text prompt whose answer is a conversation is one
  user turn (UltraFeedback-binarized rows); the ``prompts`` reader gives such a row's prompt
  as that user turn too, so generation and reward scoring from the same file see the prompt
  exactly as training did;
- prompts are cut from the left (the end of a conversation matters most) to
  ``max_prompt_length``, keeping a leading BOS (the system turn and role header of a long chat
  prompt are still lost). Without ``max_prompt_length`` the prompt gives way to the answer: it
  is cut so that the answer keeps all of itself, or half of ``max_length`` when it is longer
  (a long prompt must not squeeze the answer to a token, which would make two answers to it
  identical). Completions are cut from the right to fit ``max_length``, and a cut completion
  gets no EOS (``has_eos=False``) so RL can penalise answers that never end.

The prompt and completion are tokenised separately and concatenated, so the boundary is exact
(tokenising the joined string could merge tokens across it).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rewardloop.data.records import (
    Chat,
    SFTRecord,
    Text,
    as_messages,
    completion_messages,
    is_chat,
    response_text,
)
from rewardloop.errors import UserError
from rewardloop.lm_head import label_logps, with_end_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    """One tokenised example.

    ``completion_mask[t]`` is 1 where ``input_ids[t]`` is a completion token (the EOS included),
    0 on prompt tokens. ``has_eos`` is False when the completion was cut at ``max_length``.
    """

    input_ids: list[int]
    completion_mask: list[int]
    prompt_len: int
    has_eos: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def render_chat(tokenizer: Any, messages: Chat, *, generation_prompt: bool) -> str:
    """The chat template's text of ``messages``; a tokenizer without a template is a UserError."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"the tokenizer of {name} has no chat template, but the data holds "
                        "conversations (chat messages); pass --chat-template FILE (a Jinja chat "
                        "template) or give prompt/completion text rows")
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(list(messages),
                                             add_generation_prompt=generation_prompt,
                                             tokenize=False)
    except TemplateError as exc:  # e.g. Gemma's template refuses a system turn
        roles = [m.get("role") for m in messages]
        raise UserError(f"the chat template refused a conversation with roles {roles}: {exc}") \
            from None


_MEMO: contextvars.ContextVar[tuple[Any, dict[tuple[str, bool], list[int]]] | None] = \
    contextvars.ContextVar("rewardloop_token_memo", default=None)
"""Within ``encode_many``: its tokenizer and the ids of each (text, special tokens) it met."""

ENCODE_CHUNK = 1000
"""Examples whose texts ``encode_many`` tokenises in one batched call (a call per text costs
about 2.5x as much per text with a fast tokenizer)."""


def _ids(tokenizer: Any, text: str, special: bool = False) -> list[int]:
    """The tokenizer's ids of ``text`` (with its special tokens such as BOS when ``special``),
    from ``encode_many``'s memo when one is open for this tokenizer."""
    memo = _MEMO.get()
    if memo is None or memo[0] is not tokenizer:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    found = memo[1].get((text, special))
    if found is None:
        found = memo[1][(text, special)] = list(
            tokenizer(text, add_special_tokens=special)["input_ids"])
    return list(found)


@contextlib.contextmanager
def _memo(tokenizer: Any, texts: Iterable[tuple[str, bool]]) -> Iterator[None]:
    """Tokenise ``texts`` ((text, special tokens) each; every distinct one once, in one batched
    call per kind) and let ``_ids`` answer from them, and remember what else it tokenises,
    until the block ends."""
    distinct = list(dict.fromkeys(texts))
    table: dict[tuple[str, bool], list[int]] = {}
    for special in (False, True):
        todo = [text for text, sp in distinct if sp is special]
        if todo:
            got = tokenizer(todo, add_special_tokens=special)["input_ids"]
            table.update(((t, special), list(ids)) for t, ids in zip(todo, got, strict=True))
    token = _MEMO.set((tokenizer, table))
    try:
        yield
    finally:
        _MEMO.reset(token)


_PROBE_ANSWER = "Fine, thanks"
_END_OF_TURN_ATTR = "_rewardloop_end_of_turn"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template ends an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, Phi-3's ``<|end|>``, Mistral's ``</s>``), found by
    rendering a one-turn conversation; None without a template, or for one that ends the turn
    with no special token. An answer trained to end with it must stop generation too: the
    engines add it to their stop tokens (``engines.base.stop_token_ids``) and a trained model
    saves it in its generation config (``train.runtime``), as TRL's ``eos_token`` option does.
    """
    found = _end_of_turn(tokenizer)
    return None if found is False else found


def _end_of_turn(tokenizer: Any) -> int | None | bool:
    """``end_of_turn_id``, or False when the template refused every probe (its end unknown),
    remembered on the tokenizer for its template and vocabulary."""
    template = template_text(tokenizer)
    if template is None:
        return None
    key = (template, len(tokenizer))  # a token added later can be the end of turn
    cached = getattr(tokenizer, _END_OF_TURN_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _probe_end_of_turn(tokenizer)
    with contextlib.suppress(AttributeError):  # every example asks
        setattr(tokenizer, _END_OF_TURN_ATTR, (key, found))
    return found


_PROBES = ([{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
"""One-turn conversations to render, the second for templates that want a system turn first."""


def _probe_end_of_turn(tokenizer: Any) -> int | None | bool:
    """The first special token after the answer in a probe conversation's rendering; None
    when the template puts none there, False when it refused every probe (its end unknown)."""
    for probe in _PROBES:
        try:
            head = render_chat(tokenizer, probe, generation_prompt=True)
            full = render_chat(tokenizer, [*probe, {"role": "assistant",
                                                    "content": _PROBE_ANSWER}],
                               generation_prompt=False)
        except Exception as exc:  # noqa: BLE001 (this probe refused: try the next)
            log.debug("the chat template refused an end-of-turn probe: %s", exc)
            continue
        tail = full[len(head):] if full.startswith(head) else full
        at = tail.rfind(_PROBE_ANSWER)
        after = tail[at + len(_PROBE_ANSWER):] if at >= 0 else ""
        special = _special_ids(tokenizer)
        return next((i for i in _ids(tokenizer, after) if i in special), None)
    return False


def template_text(tokenizer: Any) -> str | None:
    """The chat template ``apply_chat_template`` uses by default: the tokenizer's own, or the
    "default" one of a tokenizer saved with several named templates (a dict)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template if isinstance(template, str) and template else None


def prompt_ids(tokenizer: Any, prompt: Text) -> list[int]:
    """Token ids of a prompt: chat prompts through the chat template with the generation prompt.

    A text prompt that already starts with the BOS token (data shipped with the template
    applied) gets no second one, as in TRL."""
    if isinstance(prompt, list):  # a chat
        return _ids(tokenizer, render_chat(tokenizer, prompt, generation_prompt=True))
    bos = getattr(tokenizer, "bos_token", None)
    if bos and str(prompt).startswith(bos):
        return _ids(tokenizer, str(prompt))
    ids = _ids(tokenizer, str(prompt), special=True)
    eos, eos_text = tokenizer.eos_token_id, getattr(tokenizer, "eos_token", None) or "\0"
    if len(ids) > 1 and ids[-1] == eos and not str(prompt).endswith(eos_text):
        ids.pop()  # the tokenizer's own EOS (add_eos_token): the prompt has not ended
    return ids


def _cut_left(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    """The last ``limit`` ids, keeping a leading BOS: models are trained with one first."""
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id and limit > 1:
        return [bos_id, *ids[len(ids) - limit + 1:]]
    return ids[len(ids) - limit:]


def completion_ids(tokenizer: Any, completion: Text) -> list[int]:
    """Token ids of a completion's text (no special tokens; EOS is added by ``encode``)."""
    text = response_text(completion) if is_chat(completion) else str(completion)
    return _ids(tokenizer, text)


def chat_completion_ids(tokenizer: Any, prompt: Chat, completion: Text) -> list[int]:
    """Token ids of the answer's turn as the template renders it after the generation prompt,
    ending with the template's end-of-turn token.

    A template whose rendering of the whole conversation does not start with its rendering of
    the prompt (some drop or rewrite earlier turns) cannot say where the answer starts: the
    answer's text then gets the tokenizer's EOS, as for text rows.
    """
    head = render_chat(tokenizer, prompt, generation_prompt=True)
    full = render_chat(tokenizer, [*prompt, *completion_messages(prompt, completion)],
                       generation_prompt=False)
    if not full.startswith(head):
        log.warning("the chat template does not extend the prompt's rendering with the answer; "
                    "ending the answer with EOS instead of the template's end of turn")
        return completion_ids(tokenizer, completion) + [tokenizer.eos_token_id]
    ids = _ids(tokenizer, full[len(head):].rstrip())
    end = _end_of_turn(tokenizer)
    if end is False:  # the probes were refused: the answer as the template renders it
        return ids
    if end is not None and end in ids:  # up to its last end of turn: no more is ever sampled
        return ids[:len(ids) - ids[::-1].index(end)]
    if end is None:
        _warn_no_end_of_turn(tokenizer)
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    return ids


_WARNED_TEMPLATES: set[int] = set()


def _warn_no_end_of_turn(tokenizer: Any) -> None:
    key = hash(template_text(tokenizer))
    if key in _WARNED_TEMPLATES:
        return
    _WARNED_TEMPLATES.add(key)
    log.warning("the chat template ends an answer with no special token (one the tokenizer "
                "knows as a single token, such as <|im_end|>), which could never stop "
                "generation: answers end with the tokenizer's EOS %r instead. Add the template's "
                "end-of-turn marker to the tokenizer as a special token to use it",
                getattr(tokenizer, "eos_token", None))


def prompt_limit(answer_tokens: int | None, max_length: int, max_prompt_length: int | None
                 ) -> int:
    """The most prompt tokens an example keeps: ``max_prompt_length`` when given (at most
    max_length - 1 beside an answer); else all of max_length without an answer, and beside
    one, what the answer leaves: it keeps all of its ``answer_tokens``, or half of max_length
    when it is longer."""
    if answer_tokens is None:
        return max_length if max_prompt_length is None else min(max_length, max_prompt_length)
    if max_prompt_length is not None:
        return min(max_length - 1, max_prompt_length)
    return max_length - max(min(answer_tokens, max_length // 2), 1)


def encode(tokenizer: Any, prompt: Text | None, completion: Text | None, *, max_length: int,
           max_prompt_length: int | None = None, add_eos: bool = True) -> Encoded:
    """Tokenise one example; see the module docstring for the rules. ``add_eos`` does not apply
    to conversations: their answer ends with the template's end-of-turn token."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    chat = (prompt is not None and is_chat(prompt)) or (completion is not None
                                                        and is_chat(completion))
    if chat and completion is not None:
        messages = as_messages(prompt) if prompt is not None else []
        p_ids = _ids(tokenizer, render_chat(tokenizer, messages, generation_prompt=True))
    else:
        p_ids = prompt_ids(tokenizer, prompt) if prompt is not None else []
    c_ids: list[int] = []
    ends = False
    if completion is not None and chat:
        c_ids, ends = chat_completion_ids(tokenizer, messages, completion), True
    elif completion is not None:
        c_ids, ends = completion_ids(tokenizer, completion), add_eos
        if add_eos:
            c_ids = c_ids + [tokenizer.eos_token_id]
    limit = prompt_limit(len(c_ids) if completion is not None else None, max_length,
                         max_prompt_length)
    if len(p_ids) > limit:
        log.debug("prompt cut from %d to %d tokens (from the left)", len(p_ids), limit)
        p_ids = _cut_left(p_ids, limit, getattr(tokenizer, "bos_token_id", None))
    if completion is None:
        return Encoded(p_ids, [0] * len(p_ids), len(p_ids), has_eos=False)
    room = max_length - len(p_ids)
    has_eos = ends and len(c_ids) <= room
    c_ids = c_ids[:room]
    return Encoded(p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids), len(p_ids), has_eos)


def _plain_texts(tokenizer: Any, prompt: Text | None, completion: Text | None
                 ) -> Iterator[tuple[str, bool]]:
    """What ``encode`` tokenises for a text example, as (text, special tokens); nothing for a
    conversation, whose texts are known only once the template rendered them."""
    if (prompt is not None and is_chat(prompt)) or (completion is not None
                                                    and is_chat(completion)):
        return
    if prompt is not None:
        bos = getattr(tokenizer, "bos_token", None)
        yield str(prompt), not (bos and str(prompt).startswith(bos))
    if completion is not None:
        yield str(completion), False


def encode_many(tokenizer: Any, examples: Sequence[tuple[Text | None, Text | None]], *,
                max_length: int, max_prompt_length: int | None = None, add_eos: bool = True
                ) -> list[Encoded]:
    """``encode`` of each (prompt, completion): the same ids, faster. Per ``ENCODE_CHUNK``
    examples, the texts are tokenised in one batched call and each distinct text once (a pair's
    two answers share their prompt's ids); the memo ends with the chunk, so memory stays flat."""
    out: list[Encoded] = []
    for at in range(0, len(examples), ENCODE_CHUNK):
        chunk = examples[at:at + ENCODE_CHUNK]
        with _memo(tokenizer, (t for p, c in chunk for t in _plain_texts(tokenizer, p, c))):
            out.extend(encode(tokenizer, p, c, max_length=max_length,
                              max_prompt_length=max_prompt_length, add_eos=add_eos)
                       for p, c in chunk)
    return out


def encode_sft(tokenizer: Any, record: SFTRecord, *, max_length: int,
               max_prompt_length: int | None = None) -> Encoded:
    """An SFT row: prompt/completion, chat messages (the last assistant turn is the completion),
    or plain text (all of it is trained on)."""
    prompt, completion = record.prompt_completion()
    return encode(tokenizer, prompt, completion, max_length=max_length,
                  max_prompt_length=max_prompt_length)


def pad(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ints to one (B, T) LongTensor, on the right (training) or left (generation)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(s) for s in seqs), default=0)
    if not seqs:
        return torch.empty((0, 0), dtype=torch.long)
    # One tensor from padded Python lists: a tensor per row costs more than the copy.
    if side == "right":
        rows = [list(s) + [pad_value] * (width - len(s)) for s in seqs]
    else:
        rows = [[pad_value] * (width - len(s)) + list(s) for s in seqs]
    return torch.tensor(rows, dtype=torch.long).reshape(len(seqs), width)


def collate(encoded: Sequence[Encoded], pad_id: int, side: str = "right"
            ) -> dict[str, torch.Tensor]:
    """A padded batch: ``input_ids``, ``attention_mask``, ``completion_mask`` (B, T), ``has_eos``
    (B,)."""
    return {
        "input_ids": pad([e.input_ids for e in encoded], pad_id, side),
        "attention_mask": pad([[1] * len(e) for e in encoded], 0, side),
        "completion_mask": pad([e.completion_mask for e in encoded], 0, side),
        "has_eos": torch.tensor([e.has_eos for e in encoded], dtype=torch.bool),
    }


def collate_pairs(chosen: Sequence[Encoded], rejected: Sequence[Encoded], pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """Chosen and rejected rows in ONE (2B, T) batch (chosen first) for a single forward pass."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected examples")
    return collate(list(chosen) + list(rejected), pad_id)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                           mega_batch_mult: int = 16) -> list[list[int]]:
    """Index batches of similar lengths, in random order, each index exactly once.

    Shuffle, cut into mega-batches of ``batch_size * mega_batch_mult``, sort each by length
    (longest first) and cut into batches; then shuffle the batches. Padding waste drops to a
    few percent while the order stays random (the trick TRL/transformers call group_by_length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * max(1, mega_batch_mult)
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def completion_token_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the completion tokens and their mask, both (B, T-1).

    Logits at position t predict token t+1, so both are shifted by one. Only the positions from
    the earliest completion start on are projected to the vocabulary (``logits_to_keep``): the
    prompt's logits are never used, and the vocabulary projection is the largest matmul of a
    small model. Earlier positions get log-prob 0 under a 0 mask.
    """
    input_ids, completion = batch["input_ids"], batch["completion_mask"]
    width = input_ids.shape[1]
    has_completion = completion.any(dim=1)
    first = int(completion.float().argmax(dim=1)[has_completion].min()) \
        if bool(has_completion.any()) else width
    start = max(0, first - 1)  # the logit at `start` predicts the first completion token
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"],
              "logits_to_keep": width - start}
    labels = with_end_label(input_ids[:, start + 1:])
    part = label_logps(model, inputs, labels, temperature).logps[:, :-1]  # (B, width-start-1)
    logps = part.new_zeros((input_ids.shape[0], width - 1))
    logps[:, start:] = part
    return logps, completion[:, 1:].to(logps.dtype)


def sequence_logps(model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                   average: bool = False) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-prob of each row's completion: (B,)."""
    logps, mask = completion_token_logps(model, batch, temperature)
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total
