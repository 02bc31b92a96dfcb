"""Run one function on this rank under the engine named by ``HFW_ENGINE`` (see tests/engines.py::run_engine).

Usage: HFW_ENGINE=zero3 torchrun --nproc_per_node 2 tests/scripts/engine_worker.py OUT_PREFIX MODULE:FUNCTION [ARG ...]
Calls ``MODULE.FUNCTION(engine, *ARGS)`` after the engine's test-only patches and saves its return value to
OUT_PREFIX.rank{R}.pt.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import engines  # noqa: E402
import torch  # noqa: E402
from helpers import leave_process_group  # noqa: E402


def main():
    prefix, target, *args = sys.argv[1:]
    engine = os.environ["HFW_ENGINE"]
    engines.activate(engine)
    module, name = target.split(":")
    result = getattr(importlib.import_module(module), name)(engine, *args)
    torch.save(result, f"{prefix}.rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main()
    leave_process_group()
