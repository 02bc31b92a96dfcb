"""Run every configuration of `tests/helpers_sample.py::CONFIGS` for a few optimizer steps and save, per rank, the
gradients and the sample weights of each step (used under 2 ranks).

Usage: torchrun --nproc_per_node 2 tests/scripts/sample_worker.py OUT_PREFIX BATCH GA
Rank r writes OUT_PREFIX.rank{r}.pt = {name: {"gradients": [...], "weights": [...]}}.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from helpers import leave_process_group  # noqa: E402
from helpers_sample import CONFIGS, run_steps  # noqa: E402


def main():
    import hfweight.plots

    hfweight.plots.plot_weighting_history = lambda *args, **kwargs: None  # not under test here; ~1.5 s per run
    out, batch, ga = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    results = {name: run_steps(kwargs, batch, ga, f"/tmp/hfw_sample_worker_{os.getpid()}") for name, kwargs in CONFIGS.items()}
    torch.save(results, f"{out}.rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
    leave_process_group()
