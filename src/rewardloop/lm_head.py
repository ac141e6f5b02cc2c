"""Token log-probs straight from the final hidden states, a chunk of positions at a time.

The vocabulary projection of a causal LM makes a (tokens x vocabulary) tensor: 8 x 1024 tokens
of a 151,936-word vocabulary is 2.5 GiB in bf16, and the float32 log-softmax kept for the
backward pass doubles it. Every trainer only needs one number per position, the log-prob of the
token that follows. ``label_logps`` runs the model with its output head swapped, for the one
call, for a head that projects ``_CHUNK_ELEMENTS`` logits at a time, keeps the log-prob of the
label and the log-normaliser, and throws the logits away; the backward pass projects each chunk
again (one extra matmul of the head, ~1/3 of the head's cost) to form the gradient. Peak memory
for the head goes from O(tokens x V) to O(chunk x V), whatever the batch.

The swap happens inside the model's own forward, so DDP's and FSDP2's hooks run as always (the
head's weight is read while FSDP2 holds it gathered). The numbers equal the materialised path's:
the same projection in the same compute dtype (autocast's, or the weights' own), then a float32
log-softmax. A model whose forward transforms the head's output (logit soft-capping, scaling)
is seen doing so (the output it returns is not the head's) and is run the ordinary way from
then on, with a warning. ``--no-chunked-lm-head`` (``RuntimeOptions``) turns it off for a run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rewardloop import ops

log = logging.getLogger(__name__)

# Logits one chunk may hold (float32): 32M = 128 MiB; the backward pass holds ~3 such at once.
_CHUNK_ELEMENTS = 32 * 1024 * 1024

FULL_LOGITS_ATTR = "rewardloop_full_logits"
"""Set (True) on a model (or its wrapper) to make ``label_logps`` materialise the logits."""
_UNFIT_ATTR = "_rewardloop_head_unfit"


@dataclass(frozen=True)
class LabelLogps:
    """What ``label_logps`` gives: per-position log-probs and, if asked, entropies."""

    logps: torch.Tensor
    """(B, K) log-prob of each position's label under softmax(logits / temperature), float32
    (or the logits' dtype when that is wider)."""
    entropy: torch.Tensor | None
    """(B, K) entropy of softmax(logits / temperature) at each position, without gradient."""


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in here: autocast's when it is on."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _rows_per_chunk(vocab: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, vocab))


def _softmax_dtype(weight: torch.Tensor) -> torch.dtype:
    """float32 for the softmax, float64 when the weights are (exact checks)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, dtype: torch.dtype
                   ) -> torch.Tensor:
    """z = h W^T / T for one chunk, ``h`` and ``w`` already in the compute dtype, z in
    ``dtype`` (the softmax's)."""
    z = (h @ w.T).to(dtype)
    return z / temperature if temperature != 1.0 else z


def _label_logps(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z)[label] and the log-normaliser of each row of ``z``."""
    norm = torch.logsumexp(z, dim=-1)
    return z.gather(-1, labels[:, None]).squeeze(-1) - norm, norm


def _entropy(z: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row, from its log-normaliser (0 log 0 = 0 for -inf logits)."""
    p = torch.exp(z - norm[:, None])
    return norm - (p * torch.nan_to_num(z, neginf=0.0)).sum(-1)


class _ChunkedLabelLogps(torch.autograd.Function):
    """log softmax(h W^T / T)[label] over rows of h, ``rows`` at a time, and its gradient;
    optionally the entropy H of softmax(h W^T / T), with its gradient when ``entropy_grad``.

    Saves h, W, the labels, one log-normaliser per row and the entropies (not the logits).
    With z = h W^T / T, p = softmax(z) and s = sum_k p_k z_k (= lse - H):
    d logp / d z = onehot(label) - p and dH / dz = -p (z - s); per chunk the upstream
    gradients make dz, and dh = dz W / T, dW = dz^T h / T.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                temperature: float, rows: int, dtype: torch.dtype, with_entropy: bool,
                entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        out_dtype = _softmax_dtype(weight)
        logps = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse = torch.empty(n, dtype=out_dtype, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=out_dtype, device=hidden.device)
        w = weight.to(dtype)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            z = _scaled_logits(hidden[start:stop].to(dtype), w, temperature, out_dtype)
            logps[start:stop], lse[start:stop] = _label_logps(z, labels[start:stop])
            if with_entropy:
                entropy[start:stop] = _entropy(z, lse[start:stop])
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, dtype
        ctx.entropy_grad = with_entropy and entropy_grad
        if not ctx.entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, grad_entropy: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, rows, dtype = ctx.temperature, ctx.rows, ctx.dtype
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = (torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
                       if want_weight else None)
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            stop = min(hidden.shape[0], start + rows)
            h = hidden[start:stop].to(dtype)
            z = _scaled_logits(h, w, temperature, lse.dtype)
            g = grad_logps[start:stop, None].to(lse.dtype)
            p = torch.exp(z - lse[start:stop, None])
            if ctx.entropy_grad:
                g_h = grad_entropy[start:stop, None].to(lse.dtype)
                mean_z = (lse[start:stop] - entropy[start:stop])[:, None]
                dz = p * (-g - g_h * (torch.nan_to_num(z, neginf=0.0) - mean_z))
            else:
                dz = p.mul_(-g)
            dz.scatter_add_(-1, labels[start:stop, None], g)
            if temperature != 1.0:
                dz = dz / temperature
            dz_c = dz.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (dz_c @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (dz_c.T @ h).to(lse.dtype)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None, None, None)


def chunked_label_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        temperature: float = 1.0, *, with_entropy: bool = False,
                        entropy_grad: bool = False, rows: int | None = None) -> LabelLogps:
    """Log-probs of ``labels`` under softmax(hidden @ weight.T / temperature), chunked.

    hidden (..., H), weight (V, H), labels (...) -> (...) each; the projection runs in the
    compute dtype (autocast's when on), the softmax in float32. The entropy (``with_entropy``)
    carries a gradient only with ``entropy_grad`` (an entropy bonus in the loss). ``rows``:
    positions per chunk (default: 32M logits' worth); a batch of at most one chunk goes through
    plain autograd.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = labels.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    rows = rows or _rows_per_chunk(weight.shape[0])
    dtype = _compute_dtype(flat_hidden)
    if flat_hidden.shape[0] <= rows:
        # One chunk: keeping its logits for the backward pass costs at most one chunk, and
        # saves projecting them again (small vocabularies and batches are faster this way).
        logps, entropy = _one_chunk(flat_hidden, weight, labels.reshape(-1), temperature,
                                    dtype, with_entropy, entropy_grad)
    else:
        logps, entropy = _ChunkedLabelLogps.apply(
            flat_hidden, weight, labels.reshape(-1), float(temperature), rows, dtype,
            with_entropy, entropy_grad)
    return LabelLogps(logps=logps.view(shape),
                      entropy=entropy.view(shape) if with_entropy else None)


def _one_chunk(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
               temperature: float, dtype: torch.dtype, with_entropy: bool, entropy_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``_ChunkedLabelLogps.forward``'s numbers for one chunk, through autograd."""
    z = _scaled_logits(hidden.to(dtype), weight.to(dtype), temperature, _softmax_dtype(weight))
    logps, norm = _label_logps(z, labels)
    entropy = z.new_empty(0)
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = _entropy(z, norm)
    return logps, entropy


def with_end_label(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` (B, K - 1), the tokens that positions 0..K-2 of a forward predict, plus a K-th
    column for the last position, which predicts past the end: ``label_logps`` needs a label at
    every position it scores; the caller drops that last log-prob. Any valid id does there."""
    return torch.cat([labels, labels[:, -1:]], dim=1)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's vocabulary projection when ``label_logps`` can stand in for it: a plain
    linear layer without bias whose forward is its class's (through DDP and PEFT wrappers);
    None otherwise."""
    inner: Any = model.module if isinstance(
        model, torch.nn.parallel.DistributedDataParallel) else model
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear and not (  # FSDP2 subclasses the module's class
            isinstance(head, nn.Linear) and type(head).__name__.startswith("FSDP")):
        return None
    # A forward already replaced on the instance (accelerate's device hooks) is left alone.
    if head.bias is not None or getattr(head, _UNFIT_ATTR, False) or "forward" in vars(head):
        return None
    return head


@contextlib.contextmanager
def _head_replaced(head: nn.Linear, labels: torch.Tensor, temperature: float,
                   with_entropy: bool, entropy_grad: bool, made: list[torch.Tensor]
                   ) -> Iterator[None]:
    """``head`` returns, instead of logits, the chunked log-probs (B, K, 1), or log-probs and
    entropies (B, K, 2), for a while; what it returned is appended to ``made``."""

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:-1] != labels.shape:
            raise ValueError(f"label_logps: the head saw positions {tuple(hidden.shape[:-1])}, "
                             f"labels are {tuple(labels.shape)} (logits_to_keep must match)")
        result = chunked_label_logps(hidden, head.weight, labels, temperature,
                                     with_entropy=with_entropy, entropy_grad=entropy_grad)
        parts = [result.logps] if result.entropy is None else [result.logps, result.entropy]
        made.append(torch.stack(parts, dim=-1))
        return made[-1]

    head.forward = forward  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del head.forward


def label_logps(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                temperature: float = 1.0, *, with_entropy: bool = False,
                entropy_grad: bool = False) -> LabelLogps:
    """Run ``model(**inputs)`` and give, at each position whose logits it would return, the
    log-prob of ``labels`` there (B, K) — chunked when the model allows, else from the logits.

    ``labels`` has the shape of the returned logits without the vocabulary (so with
    ``logits_to_keep=K`` it is (B, K)); every entry must be a valid token id (positions the
    caller will mask may hold any). The entropy (``with_entropy``) carries a gradient only
    with ``entropy_grad``.
    """
    head = None if getattr(model, FULL_LOGITS_ATTR, False) else output_head(model)
    if head is not None:
        made: list[torch.Tensor] = []
        with _head_replaced(head, labels, temperature, with_entropy, entropy_grad, made):
            out = model(**inputs)
        got = out.logits
        if len(made) == 1 and got is not None and got.shape == made[0].shape and \
                got.data_ptr() == made[0].data_ptr():
            # Read from the model's output, not the head's: FSDP2 hooks the output's gradient
            # to gather the parameters again before the head's backward runs.
            entropy = None
            if with_entropy:
                entropy = got[..., 1] if entropy_grad else got[..., 1].detach()
            return LabelLogps(logps=got[..., 0], entropy=entropy)
        setattr(head, _UNFIT_ATTR, True)
        log.warning("%s changes its output head's logits (soft-capping or scaling?): token "
                    "log-probs are computed from the whole logits for it",
                    type(model).__name__)
    return _from_logits(model(**inputs).logits, labels, temperature, with_entropy,
                        entropy_grad)


def _from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                 with_entropy: bool, entropy_grad: bool) -> LabelLogps:
    logps = ops.token_log_probs(logits, labels, temperature)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            scaled = logits / temperature if temperature != 1.0 else logits
            entropy = ops.entropy_from_logits(scaled)
    return LabelLogps(logps=logps, entropy=entropy)
