"""Tiny random models of real architectures, and an instruct-style tokenizer, built locally.

Every architecture shares the tiny BPE tokenizer (``rewardloop.tiny``); its config is the
architecture's own with the smallest sizes that keep its features (grouped-query attention,
sliding windows, tied embeddings, soft-capping, q/k norms).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewardloop.tiny import build_tokenizer, generate_corpus

EOT = "<|eot|>"  # an end-of-turn token distinct from the tokenizer's EOS, as Llama 3's <|eot_id|>
# A ChatML-style template (Qwen2.5, SmolLM2): every turn ends with the end-of-turn token, then a
# newline that generation never produces.
CHATML = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOT + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SIZE: dict[str, Any] = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 128}
WINDOW = 6  # sliding window (tokens): shorter than the test sequences, so it is exercised


def _llama(**kw: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SIZE, num_key_value_heads=2, tie_word_embeddings=False, **kw)


def _smollm(**kw: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SIZE, num_key_value_heads=2, tie_word_embeddings=True, **kw)


def _qwen2(**kw: Any) -> Any:
    from transformers import Qwen2Config

    # Overridable: use_sliding_window=False gives Qwen2.5's released layout.
    return Qwen2Config(**{**SIZE, "num_key_value_heads": 2, "use_sliding_window": True,
                          "sliding_window": WINDOW, "max_window_layers": 1, **kw})


def _qwen3(**kw: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**SIZE, num_key_value_heads=2, head_dim=8, **kw)


def _mistral(**kw: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**SIZE, num_key_value_heads=2, sliding_window=WINDOW, **kw)


def _gemma2(**kw: Any) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**SIZE, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, **kw)


def _gemma3(**kw: Any) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**SIZE, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                            **kw)


def _phi3(**kw: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**SIZE, num_key_value_heads=2, **kw)


def _gpt2(**kw: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(n_embd=16, n_layer=2, n_head=4, n_positions=128, **kw)


def _gpt_neox(**kw: Any) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**SIZE, **kw)


ARCHS: dict[str, Callable[..., Any]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral, "gemma2": _gemma2,
    "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "smollm": _smollm,
}


def build_arch(out: Path, arch: str, *, pad: bool = True, chat: bool = True,
               eot: bool = False, config: dict[str, Any] | None = None) -> Path:
    """A random ``arch`` causal LM with the tiny tokenizer in ``out``.

    ``pad=False`` drops the pad token (as GPT-2's tokenizer); ``chat=False`` drops the chat
    template; ``eot=True`` adds the end-of-turn token, the ChatML-style template and a
    generation config that stops on both EOS and end of turn (as Llama 3 / Qwen2.5 instruct);
    ``config`` overrides fields of the architecture's config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(generate_corpus(200), 300)
    if eot:
        tokenizer.add_special_tokens({"additional_special_tokens": [EOT]})
        tokenizer.chat_template = CHATML
    if not chat:
        tokenizer.chat_template = None
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if pad else None}
    model_config = ARCHS[arch](vocab_size=len(tokenizer), **ids, **(config or {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config)
    if eot:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                                tokenizer.convert_tokens_to_ids(EOT)]
    if not pad:
        tokenizer.pad_token = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
