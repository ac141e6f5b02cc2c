"""One rank of the slow-save check in test_distributed.py (run as two processes): rank 0 spends
longer than --dist-timeout on its own (as when it writes a large model) while rank 1 waits at a
barrier; both must get past it and still share a collective. Prints one JSON line."""

from __future__ import annotations

import json
import time

import torch

from rewardloop.options import RuntimeOptions
from rewardloop.train.runtime import runtime_for


def main() -> None:
    with runtime_for(RuntimeOptions(dist_timeout=2), device="cpu") as rt:
        if rt.is_main:
            time.sleep(5)  # "saving": 2.5x the collective timeout
        rt.barrier()
        total = rt.all_reduce(torch.tensor([float(rt.rank + 1)]))
    print(json.dumps({"rank": rt.rank, "total": float(total)}))


if __name__ == "__main__":
    main()
