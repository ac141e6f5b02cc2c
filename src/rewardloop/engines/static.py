"""The built-in loop's fast decode step: a static (pre-allocated) KV cache and, optionally, a
compiled one-token forward (CUDA graphs on CUDA).

Today's loop (``engines.hf.DynamicSteps``) grows its cache by one column per step: every step
copies the whole cache into a new tensor, and every step launches each kernel from Python, which
on a GPU leaves it idle most of the time for a small model. Here the cache is allocated once for
prompt + ``max_new_tokens`` (rounded up to :data:`BUCKET` so that batches of other prompt widths
reuse it), each step writes one column in place, and the step's tensors keep their shapes and
addresses, which is what lets ``torch.compile(mode="reduce-overhead")`` capture the step once as
a CUDA graph and replay it.

The columns not yet written hold zeros; the ready 4D mask of each step hides them, as it hides
the left padding of the prompts.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

BUCKET = 64
"""The cache length is rounded up to a multiple of this: a compiled step is compiled once per
cache shape, and a batch that fits the existing cache reuses it (and its compiled step)."""


def _cache_keeps_value_dtype() -> bool:
    """Whether the installed transformers' static cache allocates its values in the values'
    own dtype. Under autocast a decoder's keys come out of the rotary embedding in fp32 while
    its values stay bf16; a cache that allocates both in the keys' dtype (transformers 5.17,
    seen on a GPU) then fails its first in-place write. Probed, since no changelog names the
    version that fixed it."""
    try:
        from transformers.cache_utils import StaticLayer

        layer = StaticLayer(max_cache_len=1)
        layer.lazy_initialization(torch.zeros(1, 1, 1, 1),
                                  torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16))
    except (ImportError, TypeError, AttributeError):
        return False
    return bool(layer.values.dtype == torch.bfloat16)


def static_cache_problem(model: Any, autocast_dtype: torch.dtype | None = None) -> str | None:
    """Why ``model`` cannot decode with a static KV cache (None: it can), when decoding under
    autocast to ``autocast_dtype`` if that is given.

    The step passes a full-width 4D mask over the cache, which a sliding-window layer (it keeps
    only the last W keys, rolled) does not fit; models that transformers does not mark as
    compilable with a static cache (``_can_compile_fullgraph``) may keep state the step does not
    know of; other attention kernels (flash attention) take no ready 4D mask.
    """
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5"):
        return (f"transformers {transformers.__version__} has an older StaticCache; this path "
                "is built for transformers 5")
    config = model.config
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{config.model_type} models do not support transformers' static KV cache"
    layer_types = getattr(config, "layer_types", None) or ()
    if getattr(config, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return f"{config.model_type} uses sliding-window attention, which the static cache does " \
               "not cover"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} takes no ready mask (use sdpa or eager)"
    if autocast_dtype is not None and not _cache_keeps_value_dtype():
        return (f"transformers {transformers.__version__}'s static cache stores values in the "
                "keys' dtype, which decoding under a half --precision over fp32 weights "
                "breaks (upgrade transformers, or use --precision fp32)")
    return None


_ATTENTION_TERMS = ("softcap", "s_aux", "sinks", "position_bias")
"""Attention arguments some models add (logit soft-capping, attention sinks, a position bias):
a call with any of them goes to the model's own implementation."""


def _packed_step_attention(base: str) -> Callable[..., Any]:
    """Attention for the one-token step of a grouped-query model (fewer key/value heads than
    query heads: Qwen2, Llama 3, Mistral) that reads each cached key and value once.

    transformers' sdpa and eager attention copy every key/value head ``groups`` times to match
    the query heads (``repeat_kv``; its sdpa packs queries instead only outside
    ``torch.compile``). For a decode step that copy is most of the step's memory traffic: for a
    Qwen2-0.5B shape (14 query heads, 2 key/value heads), 64 rows and a 384-column cache it
    writes and reads about 4 GB a step, four times the model's weights. With one query position
    the ``groups`` query heads that share a key/value head can instead be the query *positions*
    of that head: (B, H, 1, D) -> (B, H_kv, groups, D), attended with the head's own keys under
    the same (B, 1, 1, L) mask, the same numbers without the copy. Anything else (a prompt, a
    mask per head, no groups, an extra term of :data:`_ATTENTION_TERMS`) goes to the
    implementation the model would run unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def own(module: Any) -> Callable[..., Any]:
        """The implementation the model would run: sdpa, or its modeling file's eager one."""
        if base == "sdpa":
            return ALL_ATTENTION_FUNCTIONS["sdpa"]
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise ValueError(f"{type(module).__name__}'s module has no eager_attention_forward")
        return eager

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        groups = getattr(module, "num_key_value_groups", 1)
        rows, heads, positions, size = query.shape
        shared_mask = attention_mask is None or attention_mask.shape[1] == 1
        extra = any(kwargs.get(name) is not None for name in _ATTENTION_TERMS)
        grouped = groups > 1 and heads == key.shape[1] * groups
        if positions != 1 or not grouped or not shared_mask or dropout or extra:
            return own(module)(module, query, key, value, attention_mask, scaling=scaling,
                               dropout=dropout, **kwargs)
        # Query head h reads key/value head h // groups (repeat_kv's order).
        packed = query.reshape(rows, key.shape[1], groups, size)
        scale = scaling if scaling is not None else size ** -0.5  # sdpa's default
        if base == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(
                packed, key, value, attn_mask=attention_mask, scale=scale)
        else:  # eager: the formula of transformers' eager_attention_forward
            weights = torch.matmul(packed, key.transpose(2, 3)) * scale
            if attention_mask is not None:
                weights = weights + attention_mask
            weights = weights.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
            out = torch.matmul(weights, value)
        return out.reshape(rows, heads, 1, size).transpose(1, 2).contiguous(), None

    return attention


def _step_attention_name(model: Any) -> str | None:
    """The name of the packed step attention registered for ``model``'s attention
    implementation (sdpa or eager), None when it has no grouped key/value heads."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    base = config._attn_implementation
    if not heads or heads == kv_heads or base not in ("sdpa", "eager"):
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = f"rewardloop_step_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _packed_step_attention(base))
        # The step passes a ready 4D mask, which transformers returns as is; should a model build
        # one anyway, it is built as for the base implementation.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. TorchDynamo keeps compiled graphs, and the guards
    that pick one, per code object; each decoder compiles its own copy, so the graph of one
    model is never a candidate for another (which matters with the module guards skipped)."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compile_step(step: Callable[..., Any], *, graphs: bool) -> Callable[..., Any]:
    """``torch.compile`` of one decoder's step: CUDA graphs when ``graphs`` (what
    ``mode="reduce-overhead"`` sets), and no guards on the model's modules.

    Before every call TorchDynamo checks that what the graph was traced from still holds; for a
    24-layer model most of those checks are on the modules' attributes (about 0.6 ms a step on
    this project's CPU machine, host time a GPU step pays too; 0.1 ms without them). Those
    attributes do not change while a decoder lives: it decodes in eval mode, from one model whose
    weights change in place, and has a graph of its own (``_own_code``). The tensors' guards
    (shapes, dtypes, devices) stay, so a cache of another size still compiles anew.
    """
    options: dict[str, Any] = {"triton.cudagraphs": True} if graphs else {}
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is not None:  # torch >= 2.8
        options["guard_filter_fn"] = skip
    return torch.compile(step, dynamic=False, options=options or None)


class StaticDecoder:
    """The static cache of one generator (kept between generations) and its one-token step."""

    def __init__(self, model: Any, cache_name: str, *, compiled: bool) -> None:
        self.model = model
        self.cache_name = cache_name
        self.cache: Any = None
        self.rows = self.length = 0  # the cache's shape: sequences, tokens
        self.token = self.positions = self.mask = torch.empty(0)  # the step's inputs (take_cache)
        # reduce-overhead = CUDA graphs: one replay per token instead of a kernel launch per
        # op. They exist only on CUDA; elsewhere inductor still fuses the step's kernels.
        self.graphs = compiled and next(model.parameters()).device.type == "cuda"
        # The packed attention runs for the one-token step only (the prefill keeps the model's
        # own): the config names it around each step.
        self.step_attention = _step_attention_name(model)
        self.step = self.forward_one
        if compiled:
            self.step = _compile_step(functools.partial(_own_code(StaticDecoder.forward_one),
                                                        self), graphs=self.graphs)

    def take_cache(self, rows: int, needed: int) -> Any:
        """An empty static cache for ``rows`` sequences of up to ``needed`` tokens: the previous
        one, emptied, when it fits (same tensors, so a compiled step is reused), else a new one
        :data:`BUCKET`-rounded."""
        from transformers import StaticCache

        if self.cache is not None and self.rows == rows and self.length >= needed:
            self.cache.reset()
            return self.cache
        self.rows, self.length = rows, -(-needed // BUCKET) * BUCKET
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.length)
        # The step's inputs live beside the cache at fixed addresses too, written in place by
        # StaticSteps: a CUDA graph then reads them where they are instead of copying each into
        # its own buffer every replay, and no step builds its mask anew.
        weight = next(self.model.parameters())
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=weight.device)
        self.mask = torch.zeros(rows, 1, 1, self.length, dtype=weight.dtype, device=weight.device)
        for tensor in (self.token, self.positions, self.mask):  # read only by a compiled step
            torch._dynamo.mark_static_address(tensor)
        return self.cache

    def run_step(self, token: torch.Tensor, mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_one` (compiled or not) with the packed step attention in place."""
        if self.step_attention is None:
            return self.step(token, mask, positions)
        config = self.model.config
        own = config._attn_implementation
        config._attn_implementation = self.step_attention
        try:
            return self.step(token, mask, positions)
        finally:
            config._attn_implementation = own

    def forward_one(self, token: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token after ``token`` (B, 1) at ``positions`` (B, 1),
        attending to the cache columns ``mask`` (B, 1, 1, L, additive) leaves open."""
        out = self.model(input_ids=token, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self.cache_name: self.cache})
        return out.logits[:, -1]


class StaticSteps:
    """One generation's decoding over a :class:`StaticDecoder`: the prefill, then
    :meth:`advance` once per sampled token (the interface of ``engines.hf.DynamicSteps``)."""

    def __init__(self, decoder: StaticDecoder, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, positions: torch.Tensor, limit: int) -> None:
        rows, width = prompt_ids.shape
        cache = decoder.take_cache(rows, width + limit)
        self.decoder = decoder
        # Cache columns a query may attend to: the real prompt tokens now, one more per step.
        open_ = torch.zeros(rows, decoder.length, dtype=torch.bool, device=prompt_ids.device)
        open_[:, :width] = prompt_mask.bool()
        # The prefill runs eagerly (its shape changes with every batch): the model builds its
        # causal + padding mask from the 2D mask, as wide as the cache.
        out = decoder.model(input_ids=prompt_ids, attention_mask=open_.long(),
                            position_ids=positions, use_cache=True, logits_to_keep=1,
                            **{decoder.cache_name: cache})
        self.logits = out.logits[:, -1]
        self.column = width
        # The steps' additive mask (0 = attend, the dtype's min = hidden: the hf loop's values)
        # and positions, in the decoder's buffers; each step opens one column, moves one on.
        hidden = (~open_)[:, None, None, :].to(decoder.mask.dtype)
        decoder.mask.copy_(hidden * torch.finfo(decoder.mask.dtype).min)
        decoder.positions.copy_(positions[:, -1:] + 1)

    def advance(self, token: torch.Tensor) -> torch.Tensor:
        """Write ``token`` (B,) into the cache and return the next logits (B, V)."""
        decoder = self.decoder
        decoder.mask[:, :, :, self.column] = 0
        decoder.token.copy_(token[:, None])
        if decoder.graphs:  # the previous step's outputs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()
        logits = decoder.run_step(decoder.token, decoder.mask, decoder.positions)
        decoder.positions.add_(1)
        self.column += 1
        # A CUDA graph's output is overwritten by its next replay, and the loop edits the logits:
        # it gets a copy, in float32 (half logits are copied by the cast the loop makes anyway).
        return logits.float() if logits.dtype != torch.float32 else logits.clone()
