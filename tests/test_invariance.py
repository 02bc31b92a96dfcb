"""docs/methods.md#normalization: the same optimizer step at (batch 8, GA 1, 1 rank), (2, 4, 1) and (4, 1, 2 ranks)
gives the same gradients, for every static strategy and both normalization modes, with variable-length rows and a
micro-batch whose labels are all ignored — through WeightedTrainer and through WeightedSFTTrainer (TRL's preparation,
packing)."""

import os

import pytest
import torch
from helpers import max_relative_difference, run_two_ranks
from helpers_invariance import SUITES

HERE = os.path.dirname(__file__)
TOLERANCE = 1e-5
CASES = [(suite, name) for suite, (configs, _) in SUITES.items() for name in sorted(configs)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return {
        suite: {name: one_step(kwargs, 8, 1, str(out)) for name, kwargs in configs.items()}
        for suite, (configs, one_step) in SUITES.items()
    }


@pytest.mark.parametrize("suite,name", CASES)
def test_gradient_accumulation_invariance(suite, name, reference, tmp_path):
    configs, one_step = SUITES[suite]
    gradients = one_step(configs[name], 2, 4, str(tmp_path))
    assert max_relative_difference(gradients, reference[suite][name]) <= TOLERANCE
    assert any(d.abs().sum() > 0 for d in reference[suite][name].values())  # the step did something


@pytest.mark.multiprocess
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_two_rank_invariance(suite, reference, tmp_path):
    out = tmp_path / "gradients.pt"
    run_two_ranks(os.path.join(HERE, "scripts", "one_step_worker.py"), str(out), "4", "1", suite)
    two_rank = torch.load(out)
    for name in SUITES[suite][0]:
        assert max_relative_difference(two_rank[name], reference[suite][name]) <= TOLERANCE, name
