"""The client of ``rewardloop vllm-serve`` ("server" mode): generation and weight pushes over
HTTP to an engine running elsewhere (other GPUs, another machine).

Every call has a timeout and every failure is one line that names the server, the request and
what to check: a sync that hangs forever with no message is the most reported failure of RL
trainers with an external engine (TRL #6796). A failure that may pass (the connection refused
or dropped, a proxy's 502/503/504) is tried again, ``ATTEMPTS`` times in all, with a warning each
time; a timeout or the server's own refusal is not. Weights travel as one safetensors payload
(no pickle: loading it cannot run code). This module does not import vLLM.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import httpx
import torch

from rewardloop.engines.base import (
    Rollout,
    SamplingSettings,
    check_request,
    request_seed,
    rollout_from_tokens,
)
from rewardloop.engines.options import logprobs_mode
from rewardloop.engines.weight_sync import WeightSync, engine_weights, push_once
from rewardloop.errors import UserError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
"""Seconds to open a connection: a server that is up accepts at once."""
REQUEST_TIMEOUT_S = 600.0
"""Seconds for one generation or weight push: long batches on a busy engine take minutes."""
ATTEMPTS = 3
"""Tries of a call that failed in passing: the connection refused or dropped (a server
restarting, a network blip) or a proxy's 502/503/504. Every call may be sent again (a lost
generation was never used; weights loaded twice are the same weights). A timeout, or the
server's own refusal, is not tried again."""
RETRY_WAIT_S = 2.0
"""Seconds before the second try, doubled before each next one."""
_PASSING = (502, 503, 504)


class ServerError(UserError):
    """The vLLM server could not be reached, timed out or refused a request."""


class _Passing(Exception):  # noqa: N818 (not an error to its callers: tried again)
    """A failure that may pass (``ATTEMPTS``), with the error to raise if it does not."""

    def __init__(self, error: ServerError) -> None:
        super().__init__(str(error))
        self.error = error


class ServerClient:
    """Plain calls to one ``rewardloop vllm-serve``: health, generate, load weights."""

    def __init__(self, url: str, *, timeout_s: float = REQUEST_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, attempts: int = ATTEMPTS,
                 retry_wait_s: float = RETRY_WAIT_S) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.attempts = max(1, attempts)
        self.retry_wait_s = retry_wait_s

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One call, tried up to ``attempts`` times while it fails in passing."""
        wait = self.retry_wait_s
        for attempt in range(1, self.attempts + 1):
            try:
                return self._call_once(method, path, **kwargs)
            except _Passing as failed:
                if attempt == self.attempts:
                    raise failed.error from None
                log.warning("%s; trying again in %g s (%d of %d tries)", failed.error, wait,
                            attempt + 1, self.attempts)
                time.sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")  # the loop returns or raises

    def _call_once(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        what = f"{method} {path}"
        try:
            response = self._http.request(method, self.url + path, **kwargs)
        except httpx.ConnectError as exc:
            raise _Passing(ServerError(
                f"cannot reach the vLLM server at {self.url} ({what}: {exc}); check that "
                "`rewardloop vllm-serve` runs there and that host and port are right")) from None
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            raise _Passing(ServerError(
                f"the connection to the vLLM server at {self.url} broke during {what} ({exc}); "
                "check the server's log (did it restart?) and the network")) from None
        except httpx.ConnectTimeout:
            raise ServerError(f"could not connect to the vLLM server at {self.url} ({what}) "
                              f"within {self.connect_timeout_s:g} s; check that the host is up "
                              "and that no firewall drops the port") from None
        except httpx.TimeoutException:
            raise ServerError(f"the vLLM server at {self.url} did not answer {what} within "
                              f"{self.timeout_s:g} s; check the server's log (stuck, "
                              "overloaded or out of memory?)") from None
        except httpx.HTTPError as exc:
            raise ServerError(f"{what} to the vLLM server at {self.url} failed: {exc}; check "
                              "the network and the server's log") from None
        if response.status_code in _PASSING:  # a proxy in front of a server that restarts
            raise _Passing(ServerError(
                f"{what} to the vLLM server at {self.url} got HTTP {response.status_code} "
                "(a proxy or load balancer without a live server behind it?)"))
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServerError(f"the server at {self.url} answered {what} with HTTP "
                              f"{response.status_code} and no JSON; is it a `rewardloop "
                              "vllm-serve`?") from None
        if response.status_code != 200 or not isinstance(body, dict):
            detail = body.get("error") if isinstance(body, dict) else body
            raise ServerError(f"the vLLM server at {self.url} refused {what} (HTTP "
                              f"{response.status_code}): {detail}; check the server's log")
        return body

    def health(self) -> dict[str, Any]:
        """The server's model, vLLM version and log-prob mode."""
        return self._call("GET", "/health")

    def generate(self, prompts: Sequence[Sequence[int]], n: int, settings: SamplingSettings,
                 seed: int | None = None, never: Sequence[int] = ()
                 ) -> tuple[list[list[int]], list[list[float]]]:
        """``n`` completions per prompt and their tokens' log-probs; with a ``seed`` they depend
        on it alone (and a call tried again asks for the same answers); ``never``: token ids
        the server must not sample (the trainer's pad)."""
        request: dict[str, Any] = {"prompts": [list(p) for p in prompts], "n": n,
                                   "settings": asdict(settings)}
        if seed is not None:
            request["seed"] = seed
        if never:
            request["never"] = [int(i) for i in never]
        body = self._call("POST", "/generate", json=request)
        ids, logps = body.get("completion_ids"), body.get("logps")
        if not isinstance(ids, list) or not isinstance(logps, list) or len(ids) != len(logps):
            raise ServerError(f"the vLLM server at {self.url} answered POST /generate without "
                              "completion_ids/logps of equal length; are client and server "
                              "the same rewardloop version?")
        return ids, logps

    def load_weights(self, weights: Sequence[tuple[str, Any]]) -> int:
        """Send ``(checkpoint name, tensor)`` pairs; returns how many the server loaded."""
        from safetensors.torch import save

        payload = save({name: t.detach().contiguous().cpu() for name, t in weights})
        body = self._call("POST", "/weights", content=payload,
                          headers={"content-type": "application/octet-stream"})
        return int(body.get("loaded", 0))


class ServerGenerator:
    """A :class:`~rewardloop.engines.base.Generator` backed by a ``rewardloop vllm-serve``."""

    def __init__(self, url: str, tokenizer: Any, *, timeout_s: float = REQUEST_TIMEOUT_S,
                 logprob_settings: SamplingSettings | None = None,
                 stop_ids: Sequence[int] | None = None) -> None:
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer's pad token is its EOS (TRL #1623): load it with "
                             "load_tokenizer(sampling_only=True)")
        self.client = ServerClient(url, timeout_s=timeout_s)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids  # where answers end (the server stops on its model's)
        self.sync = WeightSync()
        info = self.client.health()
        # Older servers say neither: no start check of the lengths, weights sent as they are.
        self.max_model_len: int | None = info.get("max_model_len")
        self.dtype = _torch_dtype(info.get("dtype"))
        # Only a trainer compares the engine's log-probs with its own; eval and generate take
        # the completions from a server in either mode.
        needed = logprobs_mode(logprob_settings) if logprob_settings is not None else None
        if needed is not None and info.get("logprobs_mode") != needed:
            flag = needed.removesuffix("_logprobs")  # vllm-serve's --logprobs-mode value
            raise UserError(f"the vLLM server at {url} reports {info.get('logprobs_mode')} "
                            f"but this sampling needs {needed}: restart it with "
                            f"`rewardloop vllm-serve ... --logprobs-mode {flag}`")

    def policy_updated(self, model: Any) -> None:
        self.sync.mark(model)

    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 settings: SamplingSettings) -> Rollout:
        check_request(prompts, n)
        model = self.sync.take()
        if model is not None:
            # Every rank gathers inside engine_weights; only then does rank 0 send.
            with engine_weights(model, dtype=self.dtype) as weights:
                push_once(self.client.load_weights, weights)
        # A seed from the trainer's generator (seeded per rank, restored on resume): the
        # server's answers then depend on the run, not on what else it served before.
        # The trainer's pad (one --add-pad-token added may be an ordinary token to the
        # served model, which loads its directory without a pad) is never sampled.
        pad = self.tokenizer.pad_token_id
        ids, logps = self.client.generate(prompts, n, settings, seed=request_seed(),
                                          never=() if pad is None else (pad,))
        return rollout_from_tokens(prompts, n, ids, logps, self.tokenizer, self.stop_ids)



def _torch_dtype(name: Any) -> torch.dtype | None:
    """The torch dtype a server names (``bfloat16``), None for one it does not name."""
    from rewardloop.models import DTYPES, resolve_dtype

    return resolve_dtype(name) if name in DTYPES and name != "auto" else None
