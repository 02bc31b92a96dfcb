"""WeightedGRPOTrainer and WeightedRLOOTrainer under DeepSpeed ZeRO-3 and FSDP2 on 2 gloo CPU ranks (issue 12 items 2
and 4): every reward weighter and a prompt-domain mixture take the DDP step, and the dynamic weights, the weighters'
state, the domain probabilities and the reward-gradient Gram are identical on both ranks and equal to DDP's.

One launch per engine runs every case for both trainers (tests/helpers_rl_engines.py). ZeRO-2 is left out: its
parameters are whole on every rank, so the reward paths are DDP's (ZeRO-2 training itself is covered by the
supervised engine tests); ZeRO-3 and FSDP2 are the engines whose sharding these paths must handle.
"""

from __future__ import annotations

import pytest
import torch
from helpers_rl_engines import relative_difference, step_difference

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TOLERANCE = 1e-5  # fp32, relative


@pytest.fixture(scope="module")
def ddp():
    import engines

    return engines.run_engine("ddp", "helpers_rl_engines:one_step_cases")  # [rank 0, rank 1]


def _assert_same_state(got, expected, where: str) -> None:
    """Weighter state after the run: the same structure, numbers equal to fp32 precision (JSON-able lists/scalars)."""
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_state(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same_state(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=TOLERANCE, abs=1e-7), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_reward_weighting_takes_the_ddp_step_under_sharded_engines(engine, ddp):
    import engines

    ranks = engines.run_engine(engine, "helpers_rl_engines:one_step_cases")
    for algo, cases in ranks[0].items():
        for name, got in cases.items():
            where = f"{engine}/{algo}/{name}"
            other, expected = ranks[1][algo][name], ddp[0][algo][name]
            assert got["facts"]["local_numel"] < got["facts"]["full_numel"], where  # really sharded
            # Both ranks: identical weights, state, probabilities and Gram (bit for bit).
            for key in ("weights", "state", "probabilities"):
                assert got.get(key) == other.get(key), (where, key)
            for rank in range(2):  # each rank's prompt domains, as under DDP
                assert ranks[rank][algo][name].get("domains") == ddp[rank][algo][name].get("domains"), (where, rank)
            if "gram" in expected:
                assert torch.equal(got["gram"], other["gram"]), where
                assert relative_difference(got["gram"], expected["gram"]) <= TOLERANCE, where
            # Equal to DDP: same generations, same weights, the same parameter update.
            assert got["rewards"] == expected["rewards"], where
            for step, (w, e) in enumerate(zip(got["weights"], expected["weights"])):
                assert w == pytest.approx(e, rel=TOLERANCE), (where, step)
            _assert_same_state(got.get("state"), expected.get("state"), where)
            if "probabilities" in expected:
                assert got["probabilities"] == pytest.approx(expected["probabilities"], rel=TOLERANCE), where
            difference = step_difference(got["update"], expected["update"])
            assert difference <= TOLERANCE, (where, difference)
