"""Keeping an engine's copy of the policy equal to the trainer's: which tensors to send under
which names, LoRA merged for the send, and when a push is due.

Names. An engine loads Hugging Face checkpoint names (``model.layers.0.self_attn.q_proj.weight``)
and fuses them itself (vLLM's ``load_weights`` stacks q/k/v and gate/up). The trainer's names
carry wrappers: peft (``base_model.model.`` and ``.base_layer``), DDP (``module.``),
``torch.compile`` (``_orig_mod.``), FSDP1 (``_fsdp_wrapped_module.``) and activation
checkpointing. :func:`engine_name` removes them; :func:`expected_names` lists what a Llama or
Qwen2 checkpoint holds, so a name the engine would not know is an error here, not a weight the
engine silently keeps stale.

LoRA. The engine runs the plain architecture: the adapters are merged into the base weights
for the send and unmerged after (:func:`engine_weights`), so the trainer keeps training the
adapters (TRL #2698, #2856 were merge/unmerge bugs: tested here). In half precision
``W + ΔW - ΔW`` is not W: each push would move the frozen base (and the KL reference, which is
that base with the adapters off) by a rounding step, a random walk over a run. So a half-precision
base weight is copied before the merge and written back after the unmerge, bit for bit.

FSDP. Every rank gathers every full tensor before anything is sent (TRL #7103: rank 0 sending
while others still gather hangs NCCL).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# Wrapper prefixes/infixes to drop, in order; each is a regex on the dotted name.
_WRAPPERS = (
    (re.compile(r"(^|\.)module\."), r"\1"),  # DDP / DeepSpeed
    (re.compile(r"(^|\.)_orig_mod\."), r"\1"),  # torch.compile
    (re.compile(r"(^|\.)_fsdp_wrapped_module\."), r"\1"),  # FSDP1
    (re.compile(r"(^|\.)_checkpoint_wrapped_module\."), r"\1"),  # activation checkpointing
    (re.compile(r"^base_model\.model\."), ""),  # peft PeftModel -> LoraModel -> the model
    (re.compile(r"\.base_layer\."), "."),  # peft LoRA layer wrapping the original Linear
    (re.compile(r"\.modules_to_save\.[^.]+\."), "."),  # peft fully trained module copy
)
# Adapter tensors live only in the trainer; after merging they are already in the base weights.
_ADAPTER = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|original_module)"
                      r"(\.|$)")

LAYOUTS = ("llama", "qwen2")


def engine_name(name: str) -> str | None:
    """The checkpoint name an engine loads for trainer parameter ``name``; None for adapter
    tensors (LoRA A/B, peft's frozen original copy), which are not sent."""
    if _ADAPTER.search(name):
        return None
    for pattern, repl in _WRAPPERS:
        name = pattern.sub(repl, name)
    return name


def expected_names(config: Any) -> set[str]:
    """Every parameter name of a Llama or Qwen2 checkpoint with ``config`` (a transformers
    config): what the engine expects to receive. Tied embeddings have no ``lm_head.weight``."""
    layout = config.model_type
    if layout not in LAYOUTS:
        raise ValueError(f"weight sync knows the {', '.join(LAYOUTS)} layouts, not "
                         f"{layout!r}")
    qkv_bias = layout == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = layout == "llama" and bool(getattr(config, "attention_bias", False))
    mlp_bias = layout == "llama" and bool(getattr(config, "mlp_bias", False))
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not getattr(config, "tie_word_embeddings", False):
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}self_attn.{proj}.weight")
            if (qkv_bias and proj != "o_proj") or (o_bias and proj == "o_proj"):
                names.add(f"{p}self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}mlp.{proj}.weight")
            if mlp_bias:
                names.add(f"{p}mlp.{proj}.bias")
    return names


def map_names(names: list[str], config: Any) -> dict[str, str]:
    """Trainer name -> engine name for every parameter that is sent, checked against the
    layout: a missing or unknown name raises ValueError naming it."""
    mapping = {n: e for n in names if (e := engine_name(n)) is not None}
    expected = expected_names(config)
    sent = set(mapping.values())
    unknown, missing = sorted(sent - expected), sorted(expected - sent)
    if unknown or missing or len(sent) != len(mapping):
        raise ValueError(f"weight names do not match the {config.model_type} layout: unknown "
                         f"{unknown[:3]}, missing {missing[:3]}, {len(mapping) - len(sent)} "
                         "duplicates")
    return mapping


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard (FSDP2) is gathered (a collective every rank joins)."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _base_config(model: Any) -> Any:
    """The transformers config of a (possibly peft- or DDP-wrapped) causal LM."""
    inner = getattr(model, "module", model)
    return inner.config


@contextmanager
def engine_weights(model: Any, dtype: torch.dtype | None = None
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``(engine name, tensor)`` for every weight of ``model`` to send, LoRA merged in.

    Every shard is gathered before the list is yielded, so a sender that pushes inside the
    ``with`` never runs while another rank still gathers. With LoRA the adapters are merged on
    entry and unmerged on exit (also when the push fails). ``dtype`` casts for the transfer
    (an fp32 adapter merged into a bf16 engine, OpenRLHF #1349); the tensors are views of the
    live weights otherwise: use them inside the ``with`` only.
    """
    inner = getattr(model, "module", model)
    merge = getattr(inner, "merge_adapter", None)
    kept = _half_base_weights(inner) if callable(merge) else []
    if callable(merge):
        merge()
    try:
        with torch.no_grad():
            params = dict(inner.named_parameters())
            mapping = map_names(list(params), _base_config(inner))
            weights = []
            for name, target in mapping.items():
                tensor = _full(params[name].detach())
                weights.append((target, tensor if dtype is None else tensor.to(dtype)))
        yield weights
    finally:
        if callable(merge):
            inner.unmerge_adapter()
            with torch.no_grad():
                for live, saved in kept:
                    live.copy_(saved)


def _half_base_weights(model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live weight, copy) of the half-precision base weight of every LoRA layer of ``model``:
    what the unmerge cannot restore exactly. The copies are kept in host memory: on a GPU they
    would take as much again as the adapted weights while the engine holds its own share (a
    7B model with LoRA on every linear layer: about 13 GB); the price is a copy to the host and
    back per push. fp32 bases (the default) need no copy (the round trip moves them by about
    1e-8 of their size)."""
    kept = []
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if hasattr(module, "lora_A") and isinstance(weight, torch.Tensor) and \
                weight.dtype in (torch.float16, torch.bfloat16):
            # An FSDP2 shard (DTensor): this rank's part, a view the write-back goes into.
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            kept.append((local, local.detach().to("cpu", copy=True)))
    return kept


def push_once(send: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """``send(weights)`` on rank 0 only, the other ranks waiting for it: one engine shared by
    all ranks (server mode) gets one copy. Without torch.distributed it just sends."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        send(weights)
    if distributed:
        dist.barrier()


class WeightSync:
    """When an engine's copy is stale: after the trainer's weights changed (an optimizer step,
    a checkpoint restored on resume, a LoRA adapter over the engine's base model), and only
    then. The push happens lazily, right before the next generation, so several updates
    between two generations cost one push and an asleep engine is never written to."""

    def __init__(self) -> None:
        self.model: Any | None = None
        self.pushes = 0

    @property
    def stale(self) -> bool:
        return self.model is not None

    def mark(self, model: Any) -> None:
        """``model``'s weights changed since the last push."""
        self.model = model

    def take(self) -> Any | None:
        """The model to push now (None when the engine is up to date); clears the mark."""
        model, self.model = self.model, None
        if model is not None:
            self.pushes += 1
        return model
