"""Request-level protections: security headers on every response, a request body size limit,
and a login rate limiter. The middleware is plain ASGI (no per-request task overhead)."""

from __future__ import annotations

import threading
import time
from collections import deque
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
MAX_BODY = 1024 * 1024


class SecurityMiddleware:
    """Adds security headers and answers 413 for bodies over ``max_body`` bytes."""

    def __init__(self, app: Any, max_body: int = MAX_BODY) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _too_large(send)
            return
        if length is None and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            # A chunked body has no declared size: read it (up to the limit) before the app.
            messages, size = [], 0
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.max_body:
                    await _too_large(send)
                    return
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            receive = _replay(messages, receive)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _replay(messages: list[dict[str, Any]], receive: Any) -> Any:
    pending = list(messages)

    async def replayed() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replayed


async def _too_large(send: Any) -> None:
    body = b'{"detail":"request body too large (limit 1 MiB)"}'
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *HEADERS]})
    await send({"type": "http.response.body", "body": body})


class LoginLimiter:
    """At most ``max_failures`` failed logins per (username, client address) per ``window_s``."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0) -> None:
        self.max_failures, self.window_s = max_failures, window_s
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def blocked(self, user: str, addr: str) -> bool:
        with self._lock:
            return len(self._recent((user, addr), time.monotonic())) >= self.max_failures

    def failed(self, user: str, addr: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:  # bound memory under a spray of names
                for key in [k for k, q in self._failures.items() if not self._recent(k, now)]:
                    del self._failures[key]
            self._recent((user, addr), now).append(now)

    def succeeded(self, user: str, addr: str) -> None:
        with self._lock:
            self._failures.pop((user, addr), None)
