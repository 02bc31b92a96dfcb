"""Run code on 2 gloo CPU ranks under a chosen engine — ``ddp``, ``zero2``, ``zero3``, ``fsdp2`` — and prove the engine
is really the one training (issue 12 item 1).

Why this module exists: on CPU ranks the stack silently falls back to plain DDP in several places (``accelerate
launch --cpu``, ``ACCELERATE_USE_CPU=1`` and ``Accelerator(cpu=True)`` drop DeepSpeed; accelerate picks FSDP only for
accelerator device types), so a test that only *configures* an engine proves nothing. Every engine test therefore
calls :func:`engine_facts` on the trained trainer and asserts on it (:func:`assert_engine`).

Use from a pytest test (the parent process)::

    from engines import run_engine
    outputs = run_engine("zero3", "my_module:my_function", "extra", "args")
    # -> [rank0_result, rank1_result]: what my_module.my_function("zero3", "extra", "args") returned on each rank
    #    (my_module importable from tests/ or PYTHONPATH; it runs inside tests/scripts/engine_worker.py)

or from inside an already-launched worker / entry script::

    import engines
    engines.activate(engine)                       # the test-only patches; before TrainingArguments is built
    args = WeightedTrainingArguments(..., **engines.training_overrides(engine))
    trainer.train()
    engines.assert_engine(trainer, engine)         # raises unless the engine is really active

Entry scripts (``trainers/*.py``) run unchanged through :func:`run_entry` (``HFW_ENGINE=<engine> torchrun
--nproc_per_node 2 tests/scripts/engine_entry.py SCRIPT ARGS...``), which
applies :func:`activate` and appends :func:`cli_flags` to the script's arguments.

What :func:`activate` does (tests only; nothing of this is in ``hfweight/``):
- replaces ``build_shm_op`` of the module ``deepspeed.comm.torch`` with a no-op: DeepSpeed's CPU accelerator otherwise
  JIT-compiles a shared-memory all-reduce with g++ on first use (~70 s on a quiet machine, minutes on a busy one;
  cached in ~/.cache/torch_extensions afterwards); gloo does the same job here. Trap: the attribute path
  ``deepspeed.comm.torch`` is the real ``torch`` (``deepspeed.comm`` star-imports it), so the module must be taken
  from ``sys.modules``;
- for ``fsdp2``, patches ``accelerate.state.AcceleratorState.__init__``: when an ``fsdp_plugin`` is passed and the
  state came out as ``MULTI_CPU``, it becomes ``FSDP`` (in the state and in ``PartialState._shared_state``), so
  transformers' Trainer wraps the model with ``fully_shard`` (FSDP2 runs over gloo on CPU; accelerate just never
  selects it there).

The ZeRO-3 config sets ``stage3_param_persistence_threshold: 0``: on a tiny model DeepSpeed otherwise keeps every
parameter (all are below the default threshold of 1e5 elements) whole on every rank and shards nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
SHARDED = ("zero3", "fsdp2")  # engines whose parameters are split across ranks outside the forward
TESTS_DIR = Path(__file__).resolve().parent


def deepspeed_config(stage: int) -> dict:
    """A DeepSpeed config for CPU training; ``auto`` values are filled in by transformers from the TrainingArguments
    (batch size, GA, clipping, precision)."""
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the tests use Trainer's torch SGD, not a DeepSpeed optimizer
        # "auto": follow the trainer's bf16/fp16 (TRL's SFTConfig defaults to bf16=True; the tests pass bf16=False)
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def fsdp2_config(layer_class: str = "LlamaDecoderLayer") -> dict:
    """transformers' ``fsdp_config`` for FSDP2: one ``fully_shard`` unit per decoder layer, sharded checkpoints."""
    return {
        "version": 2,
        "transformer_layer_cls_to_wrap": [layer_class],
        "reshard_after_forward": True,
        "state_dict_type": "SHARDED_STATE_DICT",
    }


def training_overrides(engine: str, layer_class: str = "LlamaDecoderLayer") -> dict:
    """Keyword arguments to add to ``TrainingArguments`` (or any TRL config) to train under ``engine``."""
    if engine == "ddp":
        return {}
    if engine in ("zero2", "zero3"):
        return {"deepspeed": deepspeed_config(int(engine[-1]))}
    if engine == "fsdp2":
        return {"fsdp": True, "fsdp_config": fsdp2_config(layer_class)}
    raise ValueError(f"unknown engine {engine!r}; pick one of {ENGINES}")


def cli_flags(engine: str, workdir: str, layer_class: str = "LlamaDecoderLayer") -> list[str]:
    """The same as :func:`training_overrides`, as command-line flags for an entry script (configs go to JSON files
    in ``workdir``)."""
    overrides = training_overrides(engine, layer_class)
    flags = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            path = os.path.join(workdir, f"{engine}_{key}.json")
            with open(path, "w") as f:
                json.dump(value, f)
            value = path
        elif key == "fsdp":
            # `TrainingArguments.fsdp` is typed `str` for the parser: "true" would be an unknown FSDP option.
            value = "full_shard"
        flags += [f"--{key}", str(value)]
    return flags


def activate(engine: str) -> None:
    """Apply the test-only patches ``engine`` needs in this process (idempotent). Call before any TrainingArguments
    or Accelerator is created."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; pick one of {ENGINES}")
    if engine in ("zero2", "zero3"):
        import importlib

        # Not `deepspeed.comm.torch.build_shm_op = ...`: `deepspeed.comm` star-imports `torch`, so that attribute
        # path is the real torch module and the patch would land there, leaving the g++ build in place.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        # An entry script loads its model with `from_pretrained` before any Trainer exists; under ZeRO-3 that runs
        # `deepspeed.zero.Init`, whose config reads the world size from DeepSpeed's own comm layer — on CPU ranks
        # (`use_cpu`) accelerate starts gloo without it, so it would see 1 process. Start it here (gloo, as launched).
        if "WORLD_SIZE" in os.environ:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
    if engine == "fsdp2":
        _patch_fsdp_on_cpu()


def _patch_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_hfw_fsdp_on_cpu", False):
        return
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._hfw_fsdp_on_cpu = True
    AcceleratorState.__init__ = init


def _local_numel(param) -> int:
    """Elements of ``param`` this rank stores: a ZeRO-3 partition, an FSDP2 shard, or the whole tensor."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    if hasattr(param, "to_local"):
        return param.to_local().numel()
    return param.numel()


def _full_numel(param) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def engine_facts(trainer) -> dict:
    """What is really running: the accelerate distributed type, the wrapper's class, the ZeRO stage, whether the
    parameters are DTensors, and this rank's stored vs the full parameter count (read outside the forward)."""
    import torch.distributed as dist

    wrapped = trainer.model_wrapped
    module = getattr(wrapped, "module", wrapped)
    params = list(module.parameters())
    stage = None
    if type(wrapped).__name__ == "DeepSpeedEngine":
        stage = wrapped.zero_optimization_stage()
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "wrapper": f"{type(wrapped).__module__}.{type(wrapped).__name__}",
        "zero_stage": stage,
        "dtensor_params": sum(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params),
        "params": len(params),
        "local_numel": sum(_local_numel(p) for p in params),
        "full_numel": sum(_full_numel(p) for p in params),
    }


def check_engine(facts: dict, engine: str) -> list[str]:
    """Reasons ``facts`` (from :func:`engine_facts`) do not show ``engine`` at work; empty if they do."""
    problems = []
    wrapper, world = facts["wrapper"], facts["world_size"]
    if world != 2:
        problems.append(f"world size {world}, expected 2")
    if engine == "ddp":
        if not wrapper.endswith("DistributedDataParallel"):
            problems.append(f"model wrapped by {wrapper}, expected DistributedDataParallel")
    elif engine in ("zero2", "zero3"):
        if not wrapper.endswith("DeepSpeedEngine") or "DEEPSPEED" not in facts["distributed_type"]:
            problems.append(f"{facts['distributed_type']} / {wrapper}: DeepSpeed is not running")
        if facts["zero_stage"] != int(engine[-1]):
            problems.append(f"ZeRO stage {facts['zero_stage']}, expected {engine[-1]}")
    elif engine == "fsdp2":
        if "FSDP" not in facts["distributed_type"] or facts["dtensor_params"] != facts["params"]:
            problems.append(
                f"{facts['distributed_type']}: {facts['dtensor_params']}/{facts['params']} parameters are DTensors"
            )
    if engine in SHARDED:
        # Each rank stores about half (padding to even shards rounds up).
        if not facts["local_numel"] <= 0.6 * facts["full_numel"]:
            problems.append(f"rank stores {facts['local_numel']} of {facts['full_numel']} elements: not sharded")
    elif facts["local_numel"] != facts["full_numel"]:
        problems.append(f"rank stores {facts['local_numel']} of {facts['full_numel']} elements under {engine}")
    return problems


def assert_engine(trainer, engine: str) -> dict:
    """Raise unless ``trainer`` (after ``train()``) really ran under ``engine``; return its :func:`engine_facts`."""
    facts = engine_facts(trainer)
    problems = check_engine(facts, engine)
    if problems:
        raise AssertionError(f"engine {engine!r} is not active: " + "; ".join(problems) + f" ({facts})")
    return facts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, engine: str = "ddp", timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 script args...`` on a free port, one thread per rank, ``HFW_ENGINE=engine`` in
    the environment; fails with the ranks' stderr if a rank fails."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; pick one of {ENGINES}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HFW_ENGINE": engine}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run([*cmd, script, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{engine}: {script} failed\n{proc.stderr[-6000:]}"
    return proc


def run_engine(engine: str, function: str, *args: str, timeout: int = 1200) -> list:
    """Run ``function`` (``"module:name"``, importable from tests/) on 2 ranks under ``engine`` and return what each
    rank returned (``[rank0, rank1]``, loaded with ``torch.load``). The function gets ``engine`` and ``*args``; it
    builds its trainer with :func:`training_overrides` and should call :func:`assert_engine` on it."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "out")
        launch(
            str(TESTS_DIR / "scripts" / "engine_worker.py"), prefix, function, *args, engine=engine, timeout=timeout
        )
        return [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in range(2)]


def run_entry(engine: str, script: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run an entry script (e.g. ``trainers/sft.py --config x.yaml``) unchanged on 2 ranks under ``engine``; the
    engine's flags are appended to its arguments."""
    return launch(str(TESTS_DIR / "scripts" / "engine_entry.py"), script, *args, engine=engine, timeout=timeout)
