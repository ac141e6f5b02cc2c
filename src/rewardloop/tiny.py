"""Tiny random Llama-style models and a locally trained byte-level BPE tokenizer.

They exist so tests, benchmarks and the demo run on a laptop CPU with no network: the result is
an ordinary Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
a chat template) that plain ``transformers`` loads without rewardloop.

The tokenizer is trained on the user's texts (JSONL or plain lines) or, with none, on a
deterministic corpus of customer-support sentences generated from the word lists below.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rewardloop.errors import DataError, UserError
from rewardloop.util.files import check_output_dir

log = logging.getLogger(__name__)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3 in this order

# Each message ends with EOS, so a model trained on the template learns to stop after its turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# JSONL fields whose text the tokenizer learns from (every format in DESIGN.md's table).
_TEXT_FIELDS = ("prompt", "instruction", "text", "completion", "response", "chosen", "rejected")
_LIST_FIELDS = ("responses", "messages", "completions")

_PRODUCTS = ("order", "package", "laptop", "phone", "subscription", "account", "invoice",
             "headphones", "printer", "router", "refund", "delivery", "card", "app", "camera")
_PROBLEMS = ("has not arrived", "stopped working", "was charged twice", "is broken",
             "keeps crashing", "cannot log in", "shows an error", "arrived damaged",
             "is missing a part", "will not turn on", "was cancelled", "is too slow")
_TIMES = ("yesterday", "last week", "two days ago", "this morning", "a month ago", "on Monday",
          "since the update", "after the last payment")
_ACTIONS = ("reset your password", "restart the device", "update the app", "check your email",
            "clear the cache", "send us a photo", "confirm your address", "log out and back in",
            "wait for the confirmation", "contact your bank")
_THINGS = ("tracking number", "order number", "account email", "billing address",
           "serial number", "receipt", "payment method")
_TONES = ("Thanks for reaching out.", "I am sorry to hear that.", "Happy to help!",
          "Thank you for your patience.", "I understand how frustrating this is.")
_CUSTOMER = (
    "Hi, my {product} {problem} {time}.",
    "Hello, I need help because my {product} {problem}.",
    "Why is my {product} {problem}? I bought it {time}.",
    "Can you help me? The {product} {problem} and I need it today.",
    "I want a refund for my {product}, it {problem}.",
    "Where can I find my {thing}?",
)
_AGENT = (
    "{tone} Please {action} and tell me if the {product} still {problem}.",
    "{tone} Could you send me your {thing} so I can check the {product}?",
    "{tone} I have opened a ticket for your {product}; you will hear from us within a day.",
    "{tone} First, please {action}. If that does not work, reply with your {thing}.",
    "{tone} Your {product} is covered, so we will send a replacement at no cost.",
)


@dataclass(frozen=True)
class TinyConfig:
    """Options of ``rewardloop tiny``: the size of the random model and its tokenizer."""

    FLAG_NAMES: ClassVar[Mapping[str, str | tuple[str, ...]]] = {
        "hidden_size": ("--hidden-size", "--hidden"), "num_layers": ("--num-layers", "--layers"),
        "num_heads": ("--num-heads", "--heads")}
    """Flags spelled otherwise than ``--field-name`` (also keys of --config): cli/_flags.py."""

    out: Path
    """Directory to write (must be empty or absent unless ``overwrite``)."""
    texts: Path | None = None
    """JSONL (prompt/text/chosen/... fields) or plain-text file to train the tokenizer on;
    None uses the built-in customer-support corpus."""
    vocab_size: int = 1024
    """Target BPE vocabulary size (bytes + merges + 4 special tokens); at least 300."""
    hidden_size: int = 64
    """Width of the model; a multiple of ``num_heads`` with an even head dimension."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads (no grouped-query attention: key/value heads = heads)."""
    max_position: int = 512
    """Longest sequence (tokens) the model accepts."""
    seed: int = 0
    """Seed for the built-in corpus and the weight initialisation."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes + special tokens)")
        if self.hidden_size < 8 or self.num_layers < 1 or self.num_heads < 1:
            raise ValueError("hidden_size >= 8, num_layers >= 1 and num_heads >= 1 are required")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads must be a whole, even head dimension")
        if self.max_position < 16:
            raise ValueError("max_position must be at least 16")


def generate_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """``n`` customer-support sentences (alternately customer and agent), same for the same seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        template = rng.choice(_CUSTOMER if i % 2 == 0 else _AGENT)
        out.append(template.format(
            product=rng.choice(_PRODUCTS), problem=rng.choice(_PROBLEMS), time=rng.choice(_TIMES),
            action=rng.choice(_ACTIONS), thing=rng.choice(_THINGS), tone=rng.choice(_TONES),
        ))
    return out


def _texts_of(record: object, path: Path, line: int) -> Iterable[str]:
    if not isinstance(record, dict):
        raise DataError("expected a JSON object", path=str(path), line=line)
    found = False
    for key in _TEXT_FIELDS:
        value = record.get(key)
        if isinstance(value, str):
            found = True
            yield value
    for key in _LIST_FIELDS:
        for item in record.get(key) or ():
            text = item.get("content", item.get("text")) if isinstance(item, dict) else item
            if isinstance(text, str):
                found = True
                yield text
    if not found:
        raise DataError(f"no text field (one of {list(_TEXT_FIELDS + _LIST_FIELDS)})",
                        path=str(path), line=line)


def read_texts(path: Path) -> list[str]:
    """Texts from a JSONL file (``.jsonl`` or lines starting with ``{``) or a plain-text file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8",
                        path=str(path)) from None
    first = next((ln for ln in lines if ln.strip()), "")
    is_jsonl = path.suffix == ".jsonl" or first.lstrip().startswith("{")
    texts: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not is_jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", path=str(path), line=number) from None
        texts.extend(_texts_of(record, path, number))
    if not texts:
        raise UserError(f"{path}: no text to train a tokenizer on")
    return texts


def build_tokenizer(texts: Sequence[str], vocab_size: int = 1024):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer with distinct unk/bos/eos/pad tokens and a chat template.

    No special token is added automatically: the chat template writes BOS, and callers append
    EOS to completions explicitly, so a prompt + completion never gets a stray BOS in the middle.
    """
    # tokenizers/transformers/torch take seconds to import: only when something is built.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="right", model_max_length=1_000_000,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _check_out(out: Path, overwrite: bool) -> None:
    """UserError unless ``out`` is absent, empty, or (with ``overwrite``) a model directory."""
    check_output_dir(out, flag="--out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; choose a new --out or pass --overwrite")
        if not (out / "config.json").is_file():
            raise UserError(f"{out} is not a model directory (no config.json); not overwriting it")


def build_tiny(
    out_dir: Path | str,
    texts: Sequence[str] | Path | str | None = None,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position: int = 512,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random tiny Llama causal LM and its tokenizer to ``out_dir``; return the path.

    ``texts`` is a list of strings, a path to a JSONL/plain-text file, or None for the built-in
    corpus. The same arguments give byte-identical weights and the same tokenizer.
    """
    import torch  # heavy: see build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = TinyConfig(out=Path(out_dir), vocab_size=vocab_size, hidden_size=hidden_size,
                     num_layers=num_layers, num_heads=num_heads, max_position=max_position,
                     seed=seed, overwrite=overwrite)
    _check_out(cfg.out, cfg.overwrite)  # before the tokenizer is trained, not after
    if texts is None:
        corpus = generate_corpus(2000, seed)
    elif isinstance(texts, str | Path):
        corpus = read_texts(Path(texts))
    else:
        corpus = list(texts)
    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
    )
    # A local generator-free seed: model init draws from the global torch RNG, so fork it to
    # leave the caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    cfg.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out, safe_serialization=True)
    tokenizer.save_pretrained(cfg.out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote tiny model (%d parameters, vocab %d) to %s", n_params, len(tokenizer), cfg.out)
    return cfg.out
