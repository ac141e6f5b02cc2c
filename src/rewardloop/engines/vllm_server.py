"""``rewardloop vllm-serve``: one vLLM engine behind HTTP, for trainers on other devices or
machines (``--generator vllm --vllm-mode server --vllm-server URL``).

Endpoints (JSON unless said otherwise; errors are ``{"error": message}`` with HTTP 400/500):
- ``GET /health`` -> ``{model, vllm, logprobs_mode, max_model_len, dtype}``;
- ``POST /generate`` ``{prompts: [[token id]], n, settings: {max_new_tokens, temperature,
  top_p, top_k}, seed?}`` -> ``{completion_ids: [[id]], logps: [[float]]}``, ``n`` rows per
  prompt; with a ``seed`` (an integer) the answers depend on it alone, not on what the server
  sampled before (the client sends one drawn from the trainer's seeded generator); ``never``
  (token ids, optional) are not sampled: the client's pad, which the served model may not call
  a pad;
- ``POST /weights`` with a safetensors payload of checkpoint-named tensors -> ``{loaded}``.

The server has no authentication (anyone who can reach it can replace the weights): it binds
to 127.0.0.1 unless ``--host`` says otherwise; expose it on a trusted network only. Requests
are served one at a time (the engine batches inside a request; a push must not interleave with
a generation).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import vllm

from rewardloop.engines.base import SamplingSettings
from rewardloop.engines.factory import EngineOptions
from rewardloop.engines.vllm_engine import VLLMGenerator
from rewardloop.errors import UserError

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 << 20
"""Largest /generate body accepted (prompt ids of a very large batch fit easily)."""


def _settings(raw: Any) -> SamplingSettings:
    if not isinstance(raw, dict):
        raise ValueError("settings must be an object")
    return SamplingSettings(**{k: raw[k] for k in ("max_new_tokens", "temperature", "top_p",
                                                    "top_k") if k in raw})


class _Handler(BaseHTTPRequestHandler):
    engine: VLLMGenerator
    info: dict[str, Any]
    lock: threading.Lock

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        log.info("%s %s", self.address_string(), format % args)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # e.g. asked while the engine loaded
            log.info("%s left before the answer to %s", self.address_string(), self.path)

    def _body(self, limit: int | None) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        if limit is not None and length > limit:
            raise ValueError(f"body of {length} bytes exceeds {limit}")
        return self.rfile.read(length)

    def do_GET(self) -> None:  # noqa: N802 (stdlib's name)
        if self.path != "/health":
            self._answer(404, {"error": f"no such endpoint {self.path}"})
            return
        self._answer(200, self.info)

    def do_POST(self) -> None:  # noqa: N802 (stdlib's name)
        try:
            if self.path == "/generate":
                request = json.loads(self._body(MAX_JSON_BYTES))
                prompts, n = request["prompts"], int(request["n"])
                settings = _settings(request["settings"])
                seed = request.get("seed")
                if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                         or not 0 <= seed < 2**62):
                    raise ValueError(f"seed must be an integer in [0, 2**62), got {seed!r}")
                never = request.get("never", [])
                if not isinstance(never, list) or not all(
                        isinstance(i, int) and not isinstance(i, bool) and i >= 0
                        for i in never):
                    raise ValueError(f"never must be a list of token ids, got {never!r}")
                with self.lock:
                    ids, logps = self.engine.sample(prompts, n, settings, seed=seed,
                                                    never=never)
                self._answer(200, {"completion_ids": ids, "logps": logps})
            elif self.path == "/weights":
                from safetensors.torch import load

                tensors = load(self._body(None))
                with self.lock:
                    loaded = self.engine.load_weights(list(tensors.items()))
                self._answer(200, {"loaded": loaded})
            else:
                self._answer(404, {"error": f"no such endpoint {self.path}"})
        except (ValueError, KeyError, TypeError) as exc:  # a malformed request
            self._answer(400, {"error": f"bad request: {exc}"})
        except UserError as exc:  # a request the engine cannot serve (too long a prompt)
            self._answer(400, {"error": str(exc)})
        except Exception as exc:  # the engine failed: tell the client, keep serving
            log.exception("request %s failed", self.path)
            self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})


def _dtype_name(engine: VLLMGenerator) -> str | None:
    """The engine's compute dtype (``bfloat16``): weights are sent in it, not in the trainer's
    fp32 master copy (half the bytes)."""
    config = getattr(getattr(engine.llm, "llm_engine", None), "model_config", None)
    dtype = getattr(config, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def serve_engine(engine: VLLMGenerator, model: str | Path, *, host: str = "127.0.0.1",
                 port: int = 8000, server: ThreadingHTTPServer | None = None
                 ) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving: call ``serve_forever``) in front of ``engine``: a new
    one on ``host:port``, or ``server`` (already listening) given the engine's handler."""
    handler = type("Handler", (_Handler,), {
        "engine": engine, "lock": threading.Lock(),
        "info": {"model": str(model), "vllm": vllm.__version__,
                 "logprobs_mode": engine.logprobs_mode, "max_model_len": engine.max_model_len,
                 "dtype": _dtype_name(engine)}})
    if server is None:
        return ThreadingHTTPServer((host, port), handler)
    server.RequestHandlerClass = handler
    return server


def make_server(model: str | Path, tokenizer: Any, *, host: str = "127.0.0.1", port: int = 8000,
                server: ThreadingHTTPServer | None = None, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                dtype: str = "auto", logprobs_mode: str = "raw_logprobs", seed: int = 0
                ) -> ThreadingHTTPServer:
    """:func:`serve_engine` over a fresh engine on ``model`` (on ``server`` when given, which
    the command binds before the engine loads). ``gpu_memory_utilization`` None: 0.9 on a GPU
    (the engine has it to itself), 0.3 on a CPU build, where the share is of the host's memory
    (0.9 of a shared machine's RAM got the server killed for memory)."""
    from vllm.platforms import current_platform

    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.9 if current_platform.is_cuda_alike() else 0.3
    options = EngineOptions(generator="vllm", vllm_gpu_memory_utilization=gpu_memory_utilization,
                            vllm_tensor_parallel_size=tensor_parallel_size,
                            vllm_max_model_len=max_model_len)
    engine = VLLMGenerator(model, tokenizer, options, seed=seed, dtype=dtype,
                           logprobs_mode=logprobs_mode)
    return serve_engine(engine, model, host=host, port=port, server=server)
