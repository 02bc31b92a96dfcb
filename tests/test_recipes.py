"""Every recipe parses and validates offline; the README's main command runs end to end (shortened)."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from trl import TrlParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))


def _script(name):
    module_name = f"trainer_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, "trainers", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def parser_for(recipe: str) -> TrlParser:
    name = os.path.basename(recipe)
    if name.startswith("pretrain"):
        module = _script("pretrain")
        from hfweight import WeightedTrainingArguments

        return TrlParser((module.PretrainScriptArguments, WeightedTrainingArguments))
    if name.startswith("sft"):
        from trl import ModelConfig

        from hfweight import WeightedSFTConfig

        return TrlParser((_script("sft").SFTScriptArguments, WeightedSFTConfig, ModelConfig))
    raise AssertionError(f"no parser for {name}")


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(r, ROOT) for r in RECIPES])
def test_recipe_parses_and_validates_offline(recipe):
    """Building the config dataclasses runs every validation (strategy names and kwargs) without touching a model."""
    # This machine has no GPU: a bf16 recipe is validated with `use_cpu`, the only check relaxed here.
    cpu = ["--use_cpu", "true"] if "bf16: true" in open(recipe).read() else []
    configs = parser_for(recipe).parse_args_and_config(["--config", recipe, *cpu])
    training_args = next(c for c in configs if hasattr(c, "weighting_enabled"))
    assert training_args.output_dir


def _run(args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.slow
def test_main_command_runs_end_to_end(tmp_path):
    """The README's main job, shortened: a weighted tiny pretraining that saves a model, logs and a plot."""
    out = tmp_path / "pretrain"
    stdout = _run(
        ["trainers/pretrain.py", "--config", "recipes/tiny/pretrain_domain_weights.yaml", "--max_steps", "4",
         "--logging_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--max_eval_samples_per_domain", "8",
         "--per_device_train_batch_size", "4", "--max_length", "64"]
    )
    for name in ("model.safetensors", "config.json", "weighting.png", "mixture_weights.json", "trainer_log_history.json"):
        assert (out / name).exists(), name
    assert (out / "checkpoint-4" / "hfweight_state.pt").exists()
    summary = json.loads((out / "run_summary.json").read_text())
    assert set(summary["heldout_loss"]) == {"arithmetic", "code", "noise", "prose", "redundant"}
    assert summary["weighting"]["mixture"] == "static"
    assert str(out / "weighting.png") in stdout and "held-out loss by domain" in stdout

    sft_out = tmp_path / "sft"
    _run(
        ["trainers/sft.py", "--config", "recipes/tiny/sft_prior.yaml", "--model_name_or_path", str(out),
         "--reference_model", str(out), "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(sft_out), "--builtin_rows", "200",
         "--max_eval_samples_per_domain", "4", "--per_device_train_batch_size", "4"]
    )
    assert (sft_out / "model.safetensors").exists() and (sft_out / "weighting.png").exists()
