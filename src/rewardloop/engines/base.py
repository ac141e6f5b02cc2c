"""What every generation engine shares: sampling settings, the rollout it returns, the protocol.

Layout of a rollout of ``P`` prompts with ``n`` samples each (``B = P * n`` rows): the ``n``
samples of a prompt are contiguous (rows ``i * n ... i * n + n - 1``), which is what the group
advantage estimators in ``ops`` expect. Prompts are LEFT-padded (so every completion starts at
the same column) and completions RIGHT-padded; the sequence fed to the model is
``cat(prompt_ids, completion_ids)``.

Algorithms only see :class:`Generator` and :class:`Rollout`. An engine that samples from its
own copy of the weights (vLLM) reports its per-token log-probs in ``Rollout.sampler_logps``:
that is how a trainer knows the samples are slightly off-policy and corrects for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled. Log-probs for training use the same ``temperature``."""

    max_new_tokens: int = 64
    """Longest completion in tokens; a completion cut here has no EOS (``has_eos=False``)."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = no limit)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


@dataclass(frozen=True)
class Rollout:
    """Sampled completions of a batch of prompts (``B`` rows, ``n`` per prompt, contiguous)."""

    prompt_ids: torch.Tensor
    """(B, P) long: prompt tokens, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(B, P) long: 1 on real prompt tokens."""
    completion_ids: torch.Tensor
    """(B, C) long: sampled tokens, right-padded with the pad id after the first EOS."""
    completion_mask: torch.Tensor
    """(B, C) long: 1 on the completion's tokens up to and including its first EOS."""
    has_eos: torch.Tensor
    """(B,) bool: False when the completion was cut at ``max_new_tokens`` (it never ended)."""
    texts: list[str]
    """B decoded completions (special tokens removed)."""
    sampler_logps: torch.Tensor | None = None
    """(B, C) float log-probs the sampling engine assigned to its tokens (0 on padding), when
    it samples from its own copy of the weights (vLLM): temperature-scaled, before top-p/top-k.
    None for ``HFGenerator``, which samples from the trainer's model itself."""

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + C): prompt and completion, the sequence the model scores."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + C): 1 on real prompt and completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows: Sequence[int] | torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (a minibatch).

        Prompt columns that are padding in every selected row are dropped (less compute); the
        completion width C is kept, so (B, C) tensors computed for the whole rollout (old
        log-probs, advantages, values) index the same way with ``[rows]``.
        """
        index = torch.as_tensor(rows, dtype=torch.long)
        prompt_mask = self.prompt_mask[index]
        first = int(prompt_mask.any(dim=0).long().argmax())  # first column real in some row
        sampler = self.sampler_logps[index] if self.sampler_logps is not None else None
        return replace(
            self, prompt_ids=self.prompt_ids[index][:, first:], prompt_mask=prompt_mask[:, first:],
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index], has_eos=self.has_eos[index],
            texts=[self.texts[int(i)] for i in index], sampler_logps=sampler)


class Generator(Protocol):
    """Anything that samples ``n`` completions for each of a batch of tokenised prompts."""

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        """Sample ``n`` completions per prompt (unpadded token-id lists); rows of a prompt are
        contiguous in the returned :class:`Rollout`."""
        ...

    def policy_updated(self, model: Any) -> None:
        """The trainer's ``model`` has new weights (an optimizer step, or a checkpoint restored
        on resume). A generator sampling from ``model`` itself has nothing to do; an engine
        with its own copy pushes them before its next ``generate``."""
        ...
