"""The accelerate configs under accelerate_configs/ load through accelerate's own code, and the CPU one launches.

Accelerate checks only the top-level keys of a config file; keys inside ``deepspeed_config`` / ``fsdp_config`` that it
does not know are silently ignored at launch. So besides loading each file with ``ClusterConfig``, the tests run it
through the launcher's own argument merging and environment preparation and build the DeepSpeed / FSDP plugin from
that environment, as a launched process would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "accelerate_configs"

EXPECTED = {
    "single_process.yaml": (DistributedType.NO, 1),
    "ddp.yaml": (DistributedType.MULTI_GPU, 2),
    "ddp_cpu.yaml": (DistributedType.MULTI_GPU, 2),
    "zero2.yaml": (DistributedType.DEEPSPEED, 2),
    "zero3.yaml": (DistributedType.DEEPSPEED, 2),
    "fsdp2.yaml": (DistributedType.FSDP, 2),
}
# Nested sections whose keys become launcher arguments (fsdp_config keys gain an `fsdp_` prefix if missing).
NESTED_PREFIX = {"deepspeed_config": "", "fsdp_config": "fsdp_"}


def _path(name: str) -> str:
    return str(CONFIG_DIR / name)


def _launcher_args(name: str):
    """The launcher's view of a config: CLI defaults merged with the file, as `accelerate launch` does it."""
    args = launch_command_parser().parse_args(["--config_file", _path(name), "script.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerate(name):
    with open(_path(name)) as f:
        assert isinstance(yaml.safe_load(f), dict)
    config = ClusterConfig.from_yaml_file(_path(name))
    distributed_type, num_processes = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launcher_arguments(name):
    known = {action.dest for action in launch_command_parser()._actions}
    config = ClusterConfig.from_yaml_file(_path(name))
    for section, prefix in NESTED_PREFIX.items():
        for key in getattr(config, section):
            flag = key if key.startswith(prefix) else prefix + key
            assert flag in known, f"{name}: `{section}.{key}` is not an option accelerate {section} understands"


def test_cpu_config_asks_for_the_cpu():
    args, _ = _launcher_args("ddp_cpu.yaml")
    assert args.use_cpu and args.multi_gpu and args.num_processes == 2


@pytest.mark.parametrize("name, stage, init, save16", [("zero2.yaml", 2, False, False), ("zero3.yaml", 3, True, True)])
def test_deepspeed_plugin_from_launch_environment(name, stage, init, save16):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    config = ClusterConfig.from_yaml_file(_path(name))
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.mixed_precision == "bf16"
    args, defaults = _launcher_args(name)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert bool(plugin.zero3_init_flag) is init
    assert plugin.zero3_save_16bit_model is save16
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is save16


def test_fsdp2_plugin_from_launch_environment():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import StateDictType

    config = ClusterConfig.from_yaml_file(_path("fsdp2.yaml"))
    assert config.fsdp_config["fsdp_version"] == 2
    args, _ = _launcher_args("fsdp2.yaml")
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args), clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert plugin.reshard_after_forward is True
    assert plugin.activation_checkpointing is False


@pytest.mark.multiprocess
def test_ddp_cpu_config_launches_two_ranks():
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        _path("ddp_cpu.yaml"),
        str(ROOT / "tests" / "scripts" / "allreduce_worker.py"),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(re.findall(r"rank=\d+ world_size=\d+ backend=\w+ sum=\S+?(?=rank=|\s|$)", result.stdout))
    assert lines == [
        "rank=0 world_size=2 backend=gloo sum=3",
        "rank=1 world_size=2 backend=gloo sum=3",
    ], result.stdout + result.stderr[-3000:]
