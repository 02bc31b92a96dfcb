"""The engine helper (tests/engines.py) and, launched on 2 gloo CPU ranks, training under DDP, DeepSpeed ZeRO-2/3 and
FSDP2 (issue 12)."""

from __future__ import annotations

import sys

import engines
import pytest

DDP_FACTS = {
    "distributed_type": "DistributedType.MULTI_CPU",
    "world_size": 2,
    "wrapper": "torch.nn.parallel.distributed.DistributedDataParallel",
    "zero_stage": None,
    "dtensor_params": 0,
    "params": 21,
    "local_numel": 22688,
    "full_numel": 22688,
}


def test_check_engine_catches_a_silent_ddp_fallback():
    assert engines.check_engine(DDP_FACTS, "ddp") == []
    for engine in ("zero2", "zero3", "fsdp2"):
        assert engines.check_engine(DDP_FACTS, engine), f"a DDP run passed as {engine}"
    zero2 = {**DDP_FACTS, "distributed_type": "DistributedType.DEEPSPEED", "zero_stage": 2,
             "wrapper": "deepspeed.runtime.engine.DeepSpeedEngine"}
    assert engines.check_engine(zero2, "zero2") == []
    assert engines.check_engine(zero2, "zero3"), "ZeRO-2 passed as ZeRO-3"
    unsharded_zero3 = {**zero2, "zero_stage": 3}  # stage 3 with every parameter below the persistence threshold
    assert any("not sharded" in p for p in engines.check_engine(unsharded_zero3, "zero3"))
    assert engines.check_engine({**unsharded_zero3, "local_numel": 11344}, "zero3") == []
    fsdp = {**DDP_FACTS, "distributed_type": "DistributedType.FSDP", "dtensor_params": 21, "local_numel": 11360,
            "wrapper": "transformers.models.llama.modeling_llama.FSDPLlamaForCausalLM"}
    assert engines.check_engine(fsdp, "fsdp2") == []
    assert engines.check_engine({**fsdp, "dtensor_params": 20}, "fsdp2")
    assert engines.check_engine({**fsdp, "world_size": 1}, "fsdp2")


def test_training_overrides_and_flags(tmp_path):
    assert engines.training_overrides("ddp") == {}
    zero3 = engines.training_overrides("zero3")["deepspeed"]["zero_optimization"]
    assert zero3["stage"] == 3 and zero3["stage3_param_persistence_threshold"] == 0
    assert engines.training_overrides("fsdp2")["fsdp_config"]["version"] == 2
    flags = engines.cli_flags("fsdp2", str(tmp_path))
    assert flags[:2] == ["--fsdp", "true"] and flags[2] == "--fsdp_config" and flags[3].endswith(".json")
    with pytest.raises(ValueError, match="unknown engine"):
        engines.training_overrides("zero1")


def test_shm_patch_lands_on_deepspeeds_module_not_on_torch():
    pytest.importorskip("deepspeed")
    import torch

    engines.activate("zero2")
    assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None
    assert not hasattr(torch, "build_shm_op")
