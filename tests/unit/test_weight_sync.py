"""Weight sync without an engine: trainer names -> checkpoint names for Llama and Qwen2 (plain,
peft LoRA, DDP/compile/FSDP wrappers), LoRA merged for the send and unmerged after, and when a
push is due."""

from __future__ import annotations

import pytest
import torch

from rewardloop.engines.weight_sync import (
    WeightSync,
    engine_name,
    engine_weights,
    expected_names,
    map_names,
)


def _llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, tie_word_embeddings=tie))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, tie_word_embeddings=True))


def _lora(model):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return lora


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight",
     "model.layers.1.self_attn.q_proj.weight"),
    ("base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias",
     "model.layers.1.self_attn.q_proj.bias"),
    ("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight", None),
    ("module.model.norm.weight", "model.norm.weight"),
    ("_orig_mod.lm_head.weight", "lm_head.weight"),
    ("model.layers._fsdp_wrapped_module.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("model.layers.0._checkpoint_wrapped_module.mlp.down_proj.weight",
     "model.layers.0.mlp.down_proj.weight"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("base_model.model.lm_head.original_module.weight", None),
])
def test_engine_names(name: str, expected: str | None) -> None:
    assert engine_name(name) == expected


def test_llama_layout_names() -> None:
    names = expected_names(_llama().config)
    assert len(names) == 3 + 2 * 9  # embed, norm, lm_head + per layer 4 attn + 3 mlp + 2 norms
    assert "lm_head.weight" in names and "model.layers.1.mlp.gate_proj.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert "lm_head.weight" not in expected_names(_llama(tie=True).config)


def test_qwen2_layout_has_qkv_biases_and_tied_head() -> None:
    names = expected_names(_qwen2().config)
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.self_attn.v_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" not in names


@pytest.mark.parametrize("build", [_llama, _qwen2, lambda: _llama(tie=True)])
def test_every_parameter_maps_onto_the_layout(build) -> None:
    model = build()
    mapping = map_names([n for n, _ in model.named_parameters()], model.config)
    assert set(mapping.values()) == expected_names(model.config)
    assert all(k == v for k, v in mapping.items())  # plain models already use checkpoint names


def test_unknown_or_missing_names_are_refused() -> None:
    model = _llama()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="missing.*norm"):
        map_names([n for n in names if n != "model.norm.weight"], model.config)
    with pytest.raises(ValueError, match="unknown.*extra"):
        map_names([*names, "model.extra.weight"], model.config)
    with pytest.raises(ValueError, match="layouts"):
        expected_names(type("C", (), {"model_type": "gpt2"})())


@pytest.mark.parametrize("build", [_llama, _qwen2])
def test_lora_is_merged_for_the_send_and_unmerged_after(build) -> None:
    import copy

    lora = _lora(build())
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    with engine_weights(lora) as weights:
        sent = dict(weights)
        assert set(sent) == expected_names(lora.get_base_model().config)
        for name, tensor in sent.items():
            assert torch.allclose(tensor, merged[name], atol=1e-6), name
        q = sent["model.layers.0.self_attn.q_proj.weight"]
        base_q = before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
        assert not torch.allclose(q, base_q)  # the adapter really is in what is sent
    for name, p in lora.named_parameters():  # unmerged: the trainer's weights are as before
        assert torch.allclose(p, before[name], atol=1e-6), name
    assert not any(getattr(m, "merged", False) for m in lora.modules())


def test_lora_is_unmerged_when_the_push_fails() -> None:
    lora = _lora(_llama())
    with pytest.raises(RuntimeError, match="push failed"), engine_weights(lora):
        raise RuntimeError("push failed")
    assert not any(getattr(m, "merged", False) for m in lora.modules())


def test_a_half_precision_base_is_unchanged_by_pushes() -> None:
    """bf16: W + dW - dW is not W. After many pushes the frozen base (the KL reference) is
    still bit for bit the one loaded, and every push sends the adapter merged in."""
    lora = _lora(_llama().to(torch.bfloat16))
    base = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_" not in n}
    merged = None
    for _ in range(30):
        with engine_weights(lora) as weights:
            sent = {n: t.clone() for n, t in weights}
        assert merged is None or all(torch.equal(sent[n], merged[n]) for n in sent)
        merged = sent
    for name, p in lora.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
    q = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base[q])


def test_dtype_cast_for_the_transfer() -> None:
    with engine_weights(_llama(), dtype=torch.bfloat16) as weights:
        assert {t.dtype for _, t in weights} == {torch.bfloat16}


def test_push_only_when_changed() -> None:
    sync = WeightSync()
    assert not sync.stale and sync.take() is None
    model = object()
    sync.mark(model)
    sync.mark(model)  # two updates before the next generation: one push
    assert sync.stale and sync.take() is model
    assert not sync.stale and sync.take() is None and sync.pushes == 1
