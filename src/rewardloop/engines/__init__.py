"""Generation behind one :class:`~rewardloop.engines.base.Generator` protocol: the built-in
decoding loop (``hf``), vLLM in-process or behind ``rewardloop vllm-serve``, and the weight sync
that keeps an engine's copy of the policy current. Commands get theirs from
:func:`make_generator`; only ``engines/vllm_*.py`` import vLLM (see docs/generation.md)."""

from rewardloop.engines.factory import EngineOptions, make_generator

__all__ = ["EngineOptions", "make_generator"]
