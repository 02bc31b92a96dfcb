"""Strategies that used to refuse sharded engines, on 2 gloo CPU ranks (issue 12 item 4; tests/helpers_lifted.py):
ASFT's full-vocabulary KL under ZeRO-3 and FSDP2 and STORM's meta step under FSDP2 take exactly the DDP step;
STORM under DeepSpeed still fails at init with the reason and the configs to use instead.

The reward-gradient Gram under ZeRO-3/FSDP2 is tested with the RL trainers (tests/test_rl_engines.py)."""

from __future__ import annotations

import pytest
import torch
from helpers_rl_engines import step_difference

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TOLERANCE = 1e-5  # fp32, relative


@pytest.fixture(scope="module")
def ddp():
    import engines

    return engines.run_engine("ddp", "helpers_lifted:one_step")[0]


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_lifted_strategies_take_the_ddp_step(engine, ddp):
    import engines
    from helpers_lifted import REFUSED

    ranks = engines.run_engine(engine, "helpers_lifted:one_step")
    for name in REFUSED.get(engine, ()):
        message = ranks[0]["refused"][name]
        assert message is not None, f"{name} trained under {engine}"
        assert "DeepSpeed" in message and "fsdp2.yaml" in message and "ddp.yaml" in message, message
    expected_cases = {n for n in ddp if n != "refused"} - set(REFUSED.get(engine, ()))
    assert {n for n in ranks[0] if n != "refused"} == expected_cases
    for name in expected_cases:
        got, other, expected = ranks[0][name], ranks[1][name], ddp[name]
        where = f"{engine}/{name}"
        assert got["facts"]["local_numel"] < got["facts"]["full_numel"], where  # really sharded
        assert got["state"] == other["state"], where  # e.g. STORM's rescaler: identical on both ranks
        assert got["loss"] == pytest.approx(expected["loss"], rel=TOLERANCE), where
        difference = step_difference(got["update"], expected["update"])
        assert difference <= TOLERANCE, (where, difference)
        if expected["state"] is not None:
            got_state = torch.tensor(_numbers(got["state"]), dtype=torch.float64)
            expected_state = torch.tensor(_numbers(expected["state"]), dtype=torch.float64)
            assert torch.allclose(got_state, expected_state, rtol=TOLERANCE, atol=1e-8), where


def _numbers(value) -> list[float]:
    """Every number in a nested state (dicts in key order, lists in order), flattened."""
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _numbers(value[key])]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    return [float(value)]
