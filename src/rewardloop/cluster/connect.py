"""Joining a Ray cluster, or starting one on this machine, with one-line errors.

Ray itself retries an unreachable ``HOST:PORT`` for minutes, printing a warning every few
seconds; a quick TCP probe first turns a wrong address into one line and exit 2. Ray's notice
that it turned token authentication on (its default) is not printed on every run; its warning
that authentication is off still is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

from rewardloop.cluster import require_ray
from rewardloop.errors import UserError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""Seconds to open a TCP connection to ADDRESS: a running head node accepts at once."""
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
TOKEN_AUTH_ON = "Token authentication is enabled for this Ray cluster"  # noqa: S105 (a log text)
"""Ray 2.5x logs this WARNING at every ``ray.init`` that finds or makes a token: the secure
default at work, with nothing for the user to do."""


class _DropTokenAuthOn(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TOKEN_AUTH_ON)


@contextlib.contextmanager
def quiet_token_auth_notice() -> Iterator[None]:
    """Inside: Ray's ``TOKEN_AUTH_ON`` notice is dropped; every other record of its
    authentication logger (the warning that authentication is off, errors) passes."""
    logger, drop = logging.getLogger(AUTH_LOGGER), _DropTokenAuthOn()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _probe(address: str) -> None:
    """UserError unless something listens at ``HOST:PORT`` / ``ray://HOST:PORT``."""
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise UserError(f"--ray {address}: give local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address} ({exc.strerror or exc}); is `ray start "
                        "--head` running there, and is the port open?") from None


def connect(address: str, *, cpus: float = 0.0) -> bool:
    """Connect this process to the Ray at ``address`` (``local``: start one here, with at
    least ``cpus`` logical CPUs so that the job's actors fit; Ray counts a CPU per core
    otherwise); True when this call started Ray (the caller shuts it down). A process already
    connected (a test session's shared cluster) stays connected to its own."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address == "local":
        with quiet_token_auth_notice():
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(cpus)),
                     include_dashboard=False, logging_level=logging.WARNING)
        return True
    if address != "auto":
        _probe(address)
    try:
        with quiet_token_auth_notice():
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot reach Ray at {address}: {first}") from None
    return False
