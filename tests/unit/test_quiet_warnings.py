"""Library warnings that say nothing to a user are dropped where rewardloop triggers them, and
only those: a LoRA run printed transformers' FutureWarning about the name peft reads."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rewardloop.models import LoraSettings, load_policy, load_tokenizer, save_model
from rewardloop.tiny import build_tiny, generate_corpus
from rewardloop.util.quiet import CHECKPOINTING_ALIAS, quiet_checkpointing_alias

LORA = LoraSettings(r=2, alpha=4, target_modules=("q_proj", "v_proj"))


def _seen(run: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # as if no earlier test had shown it once already
        run()  # type: ignore[operator]
    return [str(w.message) for w in caught]


def test_only_the_checkpointing_alias_warning_is_dropped() -> None:
    def warn() -> None:
        with quiet_checkpointing_alias():
            warnings.warn(CHECKPOINTING_ALIAS + " and will be removed in v6.", FutureWarning,
                          stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
            warnings.warn(CHECKPOINTING_ALIAS, UserWarning, stacklevel=1)  # another category

    assert _seen(warn) == ["something else is deprecated", CHECKPOINTING_ALIAS]
    after = _seen(lambda: warnings.warn(CHECKPOINTING_ALIAS, FutureWarning, stacklevel=1))
    assert after == [CHECKPOINTING_ALIAS]  # the filter ends with the block


def test_making_and_loading_lora_adapters_prints_no_checkpointing_warning(
        tmp_path: Path) -> None:
    """The warning is real (peft 0.21 on transformers 5.x) and gone on both LoRA paths:
    fresh adapters (`--lora-r`) and a saved adapter directory loaded back."""
    tiny = build_tiny(tmp_path / "tiny", generate_corpus(100), vocab_size=300, hidden_size=16,
                      num_layers=1, num_heads=2, max_position=32)
    adapter = tmp_path / "adapter"

    def lora_paths() -> None:
        model = load_policy(tiny, lora=LORA, device="cpu")
        save_model(model, load_tokenizer(tiny), adapter)
        load_policy(adapter, trainable=False, device="cpu")

    seen = _seen(lora_paths)
    assert not [m for m in seen if CHECKPOINTING_ALIAS in m], seen
    assert (adapter / "adapter_config.json").is_file()


def test_the_warning_is_still_transformers_own() -> None:
    """If transformers renames its message, the filter above silently stops working: this
    fails first."""
    from transformers import AutoConfig, AutoModelForCausalLM

    pytest.importorskip("peft")
    config = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(config)
    seen = _seen(lambda: model.is_gradient_checkpointing)
    assert any(m.startswith(CHECKPOINTING_ALIAS) for m in seen), seen
