"""Running a command whose engines must not outlive a failed or hung test."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence


def run_group(args: Sequence[str], env: Mapping[str, str], timeout: float = 600
              ) -> tuple[int, str, str]:
    """Run ``args`` in a process group of its own (a torchrun and its ranks, a trainer and its
    engine) and return its exit status, stdout and stderr; past ``timeout`` seconds the whole
    group is killed."""
    proc = subprocess.Popen(list(args), env=dict(env), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err
