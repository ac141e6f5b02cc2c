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
from pathlib import Path
from typing import Any, Protocol

import torch

from rewardloop.errors import UserError
from rewardloop.tokenize import end_of_turn_id


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


def stop_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS, each EOS id of the model's
    ``generation_config`` (None: none; Llama 3 and Qwen2.5 instruct models list several, e.g.
    end of turn and end of text) and the chat template's end of turn
    (``tokenize.end_of_turn_id``: a base model's config may not list it), except the pad id
    (never sampled, and it would read as padding). Every engine stops on these, so they all
    end answers where ``generate`` would."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, list | tuple) else [extra]
    ids.append(end_of_turn_id(tokenizer))  # what chat answers are trained to end with
    return [int(i) for i in dict.fromkeys(ids) if i is not None and i != tokenizer.pad_token_id]


def saved_stop_ids(model_path: str | Path, tokenizer: Any) -> list[int]:
    """The stop tokens of the model in ``model_path``: its tokenizer's EOS and the EOS ids of
    its saved generation config (``generation_config.json``), when it has one."""
    from transformers import GenerationConfig

    saved = Path(model_path) / "generation_config.json"
    config = GenerationConfig.from_pretrained(model_path) if saved.is_file() else None
    return stop_token_ids(tokenizer, config)


def request_seed() -> int:
    """A seed for one generation request of an engine that samples with its own generators
    (vLLM), drawn from torch's global generator: so the request is as reproducible as the
    built-in loop's draws, wherever a run seeds that generator (per rank by the trainers,
    ``train.grpo.seed_sampling``; per batch by ``rollout.CandidateSampler``) or restores it (a
    checkpoint holds every rank's RNG state, so a resumed run draws what an uninterrupted one
    would). Below 2**62, leaving room for the per-row offsets an engine adds."""
    return int(torch.randint(0, 2**62, ()).item())


def check_context(max_model_len: int, prompt_tokens: int, max_new_tokens: int, prompt: str
                  ) -> None:
    """UserError when prompts of ``prompt_tokens`` tokens (``prompt`` says which: the
    ``--max-prompt-length`` limit or one prompt's length) plus ``max_new_tokens`` do not fit a
    vLLM engine's context of ``max_model_len`` tokens. vLLM would cut such answers short
    without saying so (they would read as answers that ran past ``--max-new-tokens``) or
    refuse the prompt mid-run; the built-in loop has no such limit."""
    if prompt_tokens + max_new_tokens > max_model_len:
        raise UserError(
            f"{prompt} ({prompt_tokens} tokens) + --max-new-tokens ({max_new_tokens}) = "
            f"{prompt_tokens + max_new_tokens} tokens exceed the vLLM engine's context "
            f"(max_model_len {max_model_len}); lower --max-prompt-length or --max-new-tokens, "
            "or raise --vllm-max-model-len (a server: vllm-serve --max-model-len) up to the "
            "model's limit")


def check_tensor_parallel(size: int, world_size: int) -> None:
    """UserError unless ``size`` (``--vllm-tensor-parallel-size``) divides the number of
    processes: a colocated engine spans ``size`` consecutive ranks of the trainer, so one
    process cannot drive a larger engine (vLLM would start its own workers and a weight push
    would be pickled to them, against colocate's in-process design)."""
    if size < 1 or world_size % size:
        raise UserError(f"--vllm-tensor-parallel-size {size} must divide the number of "
                        f"processes ({world_size}): each colocated engine spans that many "
                        f"consecutive ranks; start a multiple of {size} processes (--nproc) "
                        "or use --vllm-tensor-parallel-size 1")


def check_request(prompts: Sequence[Sequence[int]], n: int) -> None:
    """The checks every engine makes of a request: ValueError for no prompt, an empty one, or
    ``n`` < 1."""
    if n < 1:
        raise ValueError("n must be at least 1")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")


def decode_completions(tokenizer: Any, completion_ids: torch.Tensor,
                       completion_mask: torch.Tensor) -> list[str]:
    """The B texts of right-padded completions (B, C): the tokens under the mask, special
    tokens removed (whatever fills the padding)."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask,
                                                           strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    # A byte-level model can emit any byte; NUL breaks JSONL readers and PostgreSQL text.
    return [t.replace("\x00", "") for t in texts]


def rollout_from_tokens(prompts: Sequence[Sequence[int]], n: int,
                        completions: Sequence[Sequence[int]],
                        logps: Sequence[Sequence[float]] | None, tokenizer: Any,
                        stop_ids: Sequence[int] | None = None) -> Rollout:
    """A :class:`Rollout` from an engine's unpadded outputs: ``completions`` holds ``n`` token
    lists per prompt, contiguous, each ending at its first stop token (``stop_ids``, default
    the tokenizer's EOS) or at the length limit; ``logps`` the engine's log-prob of each of
    those tokens (None when it reports none)."""
    from rewardloop import ops
    from rewardloop.tokenize import pad

    if len(completions) != len(prompts) * n:
        raise ValueError(f"expected {len(prompts) * n} completions, got {len(completions)}")
    stops = list(stop_ids) if stop_ids else [int(tokenizer.eos_token_id)]
    # A tokenizer loaded for sampling only may have no pad (``load_tokenizer(sampling_only=
    # True)``): the padding is then filled with EOS, which the masks (from the lengths) hide.
    pad_id = int(tokenizer.eos_token_id if tokenizer.pad_token_id is None
                 else tokenizer.pad_token_id)
    prompt_ids = pad(prompts, pad_id, side="left").repeat_interleave(n, dim=0)
    prompt_mask = pad([[1] * len(p) for p in prompts], 0, side="left").repeat_interleave(n, 0)
    # -1 marks padding (no token, so never a stop); every row at least one column wide, so an
    # empty completion still has a (padding) slot.
    raw = pad([list(c) or [-1] for c in completions], -1)
    completion_mask, has_eos = ops.completion_mask(raw, stops)
    completion_mask = completion_mask * (raw >= 0).long()
    if tokenizer.pad_token_id is not None:  # a pad an engine sampled anyway is no answer token
        completion_mask = completion_mask * (raw != tokenizer.pad_token_id).long()
    completion_ids = raw.masked_fill(raw < 0, pad_id)
    sampler = None
    if logps is not None:
        rows = [list(lp) + [0.0] * (completion_ids.shape[1] - len(lp)) for lp in logps]
        sampler = torch.tensor(rows, dtype=torch.float32) * completion_mask
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, has_eos=has_eos,
                   texts=decode_completions(tokenizer, completion_ids, completion_mask),
                   sampler_logps=sampler)


class TensorParallelShare:
    """The ranks that drive one tensor-parallel engine together.

    A colocated vLLM engine under ``distributed_executor_backend="external_launcher"`` spans
    ``size`` consecutive ranks (vLLM's own grouping: ranks 0..size-1, size..2*size-1, ...), and
    every rank of such a group must submit the same requests, or the ranks' schedulers diverge
    and the engine hangs or mixes their batches. Each rank of a trainer holds its own share of
    the prompts; :meth:`gather` hands every rank of the group all of the group's prompts, in
    rank order, and says which rows of the result are this rank's. Build it on every rank at
    the same point (creating the groups is a collective), before the engine.
    """

    def __init__(self, size: int) -> None:
        import torch.distributed as dist

        check_tensor_parallel(size, dist.get_world_size())
        self.size = size
        self.group, _ = dist.new_subgroups(group_size=size)
        self.index = dist.get_rank(self.group)

    def gather(self, prompts: Sequence[Sequence[int]]) -> tuple[list[list[int]], slice]:
        """All the group's prompts (every rank gets the same list, in rank order) and the slice
        of it that holds this rank's ``prompts``."""
        import torch.distributed as dist

        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, [list(p) for p in prompts], group=self.group)
        start = sum(len(part) for part in parts[:self.index])
        return [p for part in parts for p in part], slice(start, start + len(prompts))

    def common_seed(self, seed: int) -> int:
        """The group's first rank's ``seed``, on every rank of the group: the ranks of one
        engine must draw the same numbers (each rank's scheduler feeds its own sampled tokens
        into the shared forward passes), while each rank's own generator is seeded apart."""
        import torch.distributed as dist

        box = [seed]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return int(box[0])
