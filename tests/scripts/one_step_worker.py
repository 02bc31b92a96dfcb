"""Run one weighted SGD step per configuration and save the parameter deltas (used under 1 and 2 ranks).

Usage: torchrun --nproc_per_node 2 tests/scripts/one_step_worker.py OUT.pt BATCH GA [SUITE]
SUITE (default `pretrain`) names a `(configs, one_step)` pair of `tests/helpers_invariance.py::SUITES`; rank 0
writes {name: gradients}.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from helpers import leave_process_group  # noqa: E402
from helpers_invariance import SUITES  # noqa: E402


def main():
    out, batch, ga = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    configs, one_step = SUITES[sys.argv[4] if len(sys.argv) > 4 else "pretrain"]
    results = {name: one_step(kwargs, batch, ga, f"/tmp/hfw_worker_{os.getpid()}") for name, kwargs in configs.items()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
    leave_process_group()
