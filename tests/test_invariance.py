"""METHODS §0: the same optimizer step at (batch 8, GA 1, 1 rank), (2, 4, 1) and (4, 1, 2 ranks) gives the same
gradients, for every static strategy and both normalization modes, with variable-length rows and a micro-batch
whose labels are all ignored."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import max_relative_difference
from helpers_invariance import CONFIGS, one_step_gradients

HERE = os.path.dirname(__file__)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return {name: one_step_gradients(kwargs, 8, 1, str(out)) for name, kwargs in CONFIGS.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_accumulation_invariance(name, reference, tmp_path):
    delta = one_step_gradients(CONFIGS[name], 2, 4, str(tmp_path))
    assert max_relative_difference(delta, reference[name]) <= TOLERANCE
    assert any(d.abs().sum() > 0 for d in reference[name].values())  # the step did something


@pytest.mark.multiprocess
def test_two_rank_invariance(reference, tmp_path):
    out = tmp_path / "deltas.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(HERE, "scripts", "one_step_worker.py"), str(out), "4", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two_rank = torch.load(out)
    for name in CONFIGS:
        assert max_relative_difference(two_rank[name], reference[name]) <= TOLERANCE, name
