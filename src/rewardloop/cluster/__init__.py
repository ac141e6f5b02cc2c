"""Online RL and batch jobs on a Ray cluster (``--ray``; docs/cluster.md).

The trainer group is N actors that form one torch.distributed process group and run the same
trainer code as torchrun; generation and reward-model scoring run in actors of their own and
plug in where the trainer would build them itself (``train.roles.RemoteRoles``). Only this
package imports Ray, and only when a command is given ``--ray``: this module itself does not.
"""

from __future__ import annotations

from types import ModuleType

from rewardloop.errors import UserError

RAY_INSTALL = "pip install 'rewardloop[ray]'"


def require_ray() -> ModuleType:
    """The ``ray`` module, or the UserError (exit 2) that says how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed; install it with "
                        f"{RAY_INSTALL}") from None
    return ray
