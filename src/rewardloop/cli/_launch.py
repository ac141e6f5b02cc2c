"""``rewardloop train ... --nproc N``: start N processes of the same command on this machine.

Each child is ``python -m rewardloop <the same arguments>`` with torch.distributed's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port), exactly what
``torchrun --standalone --nproc-per-node N -m rewardloop ...`` gives it, so the trainer code is
the same under both. The launcher watches the children: when one exits with an error the others
are stopped (after a short grace period, so that an error every rank agreed on is reported by
each), and the launcher exits with that child's status naming its rank (3 for a NaN, 2 for a
user error). A launcher stopped by SIGTERM, SIGHUP, SIGQUIT or Ctrl-C stops its ranks; one
killed outright (SIGKILL) takes them with it (Linux: PR_SET_PDEATHSIG). Several machines use
torchrun's rendezvous flags instead (docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

from rewardloop.util.net import free_port

GRACE_S = 10.0


NPROC = typer.Option(None, "--nproc", help="Start this many processes on this machine, one per "
                     "GPU (or CPU share), with the same options (the same as torchrun "
                     "--standalone --nproc-per-node N -m rewardloop ...). --batch-size stays "
                     "the global batch. Several machines: docs/distributed.md.")


def refuse_nproc(nproc: int | None) -> None:
    """``--nproc`` is taken off the command line before parsing (``main``); reaching a command
    with N > 1 means it was called in-process, where it cannot start processes."""
    if nproc is not None and nproc > 1:
        raise typer.BadParameter("--nproc works from the rewardloop command (or use torchrun)",
                                 param_hint="--nproc")


def take_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """(N, the arguments without ``--nproc N``); N is None when the flag is absent."""
    rest, nproc = [], None
    it = iter(range(len(argv)))
    for i in it:
        arg = argv[i]
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = arg.split("=", 1)[1] if "=" in arg else (
                argv[i + 1] if i + 1 < len(argv) else "")
            if "=" not in arg:
                next(it, None)
            if not value.isdigit() or int(value) < 1:
                typer.echo(f"error: --nproc needs a whole number >= 1, got {value!r}", err=True)
                raise SystemExit(2)
            nproc = int(value)
            continue
        rest.append(arg)
    return nproc, rest


def launch(nproc: int, args: list[str]) -> int:
    """Run ``rewardloop *args`` in ``nproc`` processes; the exit status of the run."""
    if "WORLD_SIZE" in os.environ:
        typer.echo("error: --nproc inside an already launched process (torchrun or --nproc); "
                   "give one or the other", err=True)
        return 2
    port = free_port()
    children = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        # Each process would otherwise start one thread per core: N x cores threads fighting.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # The user's own command line, run again by the same interpreter: no shell.
        command = [sys.executable, "-m", "rewardloop", *args]
        children.append(subprocess.Popen(  # noqa: S603
            command, env=env, preexec_fn=_die_with_parent))

    def terminate(signum: int, _frame: object) -> None:
        # A launcher told to stop (a job scheduler, a closed terminal, a test's timeout) stops
        # its ranks first, so that none is left running; as torchrun does.
        _stop(children)
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, terminate)
    try:
        return _watch(children)
    except KeyboardInterrupt:
        return _interrupted(children)


def _interrupted(children: list[subprocess.Popen[bytes]]) -> int:
    """Ctrl-C: a terminal's reaches every rank too, and each stops as one process does (a
    checkpoint it was writing is removed, it says so). They get a moment for that before
    anything is forced: a rank killed mid-save used to leave its partial checkpoint behind.
    Ranks that did not get it (the launcher alone was interrupted) are sent it."""
    def wait(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(c.poll() is None for c in children):
            time.sleep(0.1)
        return all(c.poll() is not None for c in children)

    try:
        if not wait(1.0):
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGINT)
            wait(GRACE_S)
    except KeyboardInterrupt:  # a second Ctrl-C: stop them now
        pass
    forced = any(c.poll() is None for c in children)
    _stop(children)
    if forced:
        typer.echo("interrupted: the run's processes were stopped", err=True)
    return 130


def _die_with_parent() -> None:
    """In each child before it runs (Linux): ask the kernel for SIGTERM when the launcher dies,
    however it dies (SIGKILL, the OOM killer), so that no rank trains on under init, writing
    to --out. A launcher already gone by then means the same: stop."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # only here: the launcher's children on Linux

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _watch(children: list[subprocess.Popen[bytes]]) -> int:
    while True:
        codes = [c.poll() for c in children]
        failed = [(r, code) for r, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and any(c.poll() is None for c in children):
                time.sleep(0.1)
            _stop(children)
            rank, code = failed[0]
            reason = f"signal {-code}" if code < 0 else f"status {code}"
            typer.echo(f"error: rank {rank} of {len(children)} exited with {reason}; "
                       "the other processes were stopped", err=True)
            return code if code > 0 else 1
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.1)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
