"""Request-level protections: security headers on every response, request body size limits,
and a login rate limiter. The middleware is plain ASGI (no per-request task overhead)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
NO_STORE = [(b"cache-control", b"no-store")]
# Every route takes small JSON bodies except the admin's task upload: a small cap bounds the
# work a single (even unauthenticated) request can cause before anything checks it.
MAX_BODY = 64 * 1024
MAX_UPLOAD = 1024 * 1024
UPLOAD_PATHS = frozenset({"/api/admin/tasks"})


class SecurityMiddleware:
    """Adds security headers to every response (500s included) and answers 413 for bodies
    over ``max_body`` bytes (``max_upload`` on ``upload_paths``)."""

    def __init__(self, app: Any, max_body: int = MAX_BODY, max_upload: int = MAX_UPLOAD,
                 upload_paths: frozenset[str] = UPLOAD_PATHS) -> None:
        self.app, self.max_body, self.max_upload = app, max_body, max_upload
        self.upload_paths = upload_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"] in self.upload_paths else self.max_body
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(send, limit)
            return
        if length is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            # A chunked body has no declared size: read it (up to the limit) before the app.
            messages, size = [], 0
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > limit:
                    await _too_large(send, limit)
                    return
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            receive = _replay(messages, receive)
        started = False
        # Pages, API answers and exports are one user's: no browser or proxy may keep them
        # (an export stayed in the disk cache after logout). Static files may be cached.
        extra = HEADERS if scope["path"].startswith("/static/") else HEADERS + NO_STORE

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette answers unhandled errors outside every middleware, without our
            # headers; answer here instead and let the error go on to be logged.
            if not started:
                await _reply(send, 500, b'{"detail":"internal server error"}')
            raise


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _reply(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *HEADERS]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Any, limit: int) -> None:
    await _reply(send, 413, b'{"detail":"request body too large (limit %d KiB)"}' % (limit // 1024))


@dataclass(frozen=True)
class Attempt:
    """One login attempt as the limiter counts it: the keys it was counted under, and when."""

    keys: tuple[tuple[str, str], ...]
    at: float


class LoginLimiter:
    """Caps on failed logins per ``window_s``, and on password checks running at once.

    Failures are counted per (user name, address) (``per_pair``), per address over all names
    (``per_addr``: one host trying many names) and per user name over all addresses
    (``per_user``: one name tried from many hosts). An attempt is counted when it starts,
    before the password is checked, so parallel attempts cannot all slip under the limit; a
    successful one is withdrawn again. Password checks cost ~19 MiB and tens of milliseconds
    each, so at most ``max_checks`` run at once (``check_slot``). The counts are per process.
    """

    def __init__(self, per_pair: int = 5, per_addr: int = 20, per_user: int = 20,
                 window_s: float = 60.0, max_checks: int = 4) -> None:
        self.limits = {"pair": per_pair, "addr": per_addr, "user": per_user}
        self.window_s = window_s
        self._attempts: dict[tuple[str, str], deque[float]] = {}
        self._pruned_at = 0.0
        self._lock = threading.Lock()
        self._checks = threading.BoundedSemaphore(max_checks)

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._attempts.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def start(self, user: str, addr: str, known: Callable[[], bool] | None = None
              ) -> Attempt | None:
        """Count an attempt; None (nothing counted) when any of its limits is reached.

        The per-user-name limit alone would let anyone who knows a name lock its user out
        (a few wrong passwords a minute from many hosts): when it is the only limit reached,
        an address ``known`` to have signed in as that user before still gets its attempt
        (``known`` is called only then). Distributed guessing stays capped: the guessing hosts
        never signed in as the user."""
        keys = (("pair", f"{addr}\n{user}"), ("addr", addr), ("user", user))
        attempt = self._count(keys, ignore=None)
        if attempt is None and known is not None and self._only_user_full(keys) and known():
            attempt = self._count(keys, ignore="user")
        return attempt

    def _count(self, keys: tuple[tuple[str, str], ...], ignore: str | None) -> Attempt | None:
        """Check and count in one step (parallel attempts cannot all slip under a limit)."""
        now = time.monotonic()
        with self._lock:
            # Bound memory under a spray of names, pruning at most once a second (each prune
            # walks every key, which a flood must not make the cost of every attempt).
            if len(self._attempts) > 10_000 and now - self._pruned_at > 1.0:
                self._pruned_at = now
                for key in [k for k, q in self._attempts.items() if not self._recent(k, now)]:
                    del self._attempts[key]
            if any(len(self._recent(k, now)) >= self.limits[k[0]] for k in keys
                   if k[0] != ignore):
                return None
            for key in keys:
                self._attempts[key].append(now)
        return Attempt(keys, now)

    def _only_user_full(self, keys: tuple[tuple[str, str], ...]) -> bool:
        now = time.monotonic()
        with self._lock:
            return all((len(self._recent(k, now)) >= self.limits[k[0]]) == (k[0] == "user")
                       for k in keys)

    def withdraw(self, attempt: Attempt, *, clear_pair: bool = False) -> None:
        """Uncount ``attempt`` (it succeeded, or was never checked); ``clear_pair`` also
        forgets the earlier failures of its (user name, address)."""
        with self._lock:
            for key in attempt.keys:
                q = self._attempts.get(key)
                if q is None:
                    continue
                if clear_pair and key[0] == "pair":
                    del self._attempts[key]
                elif attempt.at in q:
                    q.remove(attempt.at)

    def check_slot(self, wait_s: float = 1.0) -> bool:
        """Take one of the password-check slots (waiting up to ``wait_s``); release it with
        ``release_slot``. False when all stayed busy."""
        return self._checks.acquire(timeout=wait_s)

    def release_slot(self) -> None:
        self._checks.release()
