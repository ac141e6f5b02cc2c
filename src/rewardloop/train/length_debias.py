"""Length-debiased reward models: ODIN (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates
Hacking in RLHF", §4).

People prefer longer answers more than the answers deserve, and a reward model learns that; a
policy then earns reward by talking longer. ODIN gives the reward model one extra head, r_L,
trained with the quality heads r_Q on the preference loss of r_Q + r_L, plus

- a correlation term: r_L must correlate with answer length, r_Q must not
  (L = -ρ(r_L, len) + |ρ(r_Q, len)|, Pearson ρ over the answers of a batch);
- an orthogonality term: the length head's weight vector is kept orthogonal to each quality
  head's (|w_Q · w_L| with unit vectors), so the two read different directions of the trunk.

The length head soaks up what length explains of the preferences; it is dropped when the model
is saved, so ``score`` and RL see only r_Q.
"""

from __future__ import annotations

import torch
from torch import nn


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable Pearson correlation of two (N,) tensors (0 when either is constant)."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm() + eps)


def odin_correlation_loss(quality: torch.Tensor, length_reward: torch.Tensor,
                          lengths: torch.Tensor) -> torch.Tensor:
    """-ρ(r_L, len) + mean_h |ρ(r_Q_h, len)| over N answers: quality (N, H), length_reward (N,),
    lengths (N,) in tokens."""
    lengths = lengths.to(quality.dtype)
    quality_corr = torch.stack([pearson(quality[:, h], lengths).abs()
                                for h in range(quality.shape[1])]).mean()
    return quality_corr - pearson(length_reward, lengths)


def orthogonality_loss(head: nn.Linear) -> torch.Tensor:
    """mean_h |ŵ_Q_h · ŵ_L| of a score head whose LAST output row is the length head."""
    w = nn.functional.normalize(head.weight.float(), dim=-1)  # (H + 1, hidden)
    return (w[:-1] @ w[-1]).abs().mean()


def drop_length_head(head: nn.Linear) -> nn.Linear:
    """The quality heads of a score head whose last output is the length head: a new Linear
    with every row but the last (what ``model/`` keeps)."""
    out = nn.Linear(head.in_features, head.out_features - 1, bias=head.bias is not None,
                    dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        out.weight.copy_(head.weight[:-1])
        if head.bias is not None:
            out.bias.copy_(head.bias[:-1])
    return out
