"""Every recipe parses and validates offline; the README's main command runs end to end (shortened)."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest
import yaml
from trl import TrlParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))


def _script(name):
    """The entry point behind ``hfweight <name>`` (``trainers/<name>.py`` in a clone runs the same)."""
    return importlib.import_module(f"hfweight.commands.{name}")


SCRIPTS = ("pretrain", "sft", "grpo", "rloo")


def script_for(recipe: str) -> str:
    """The entry point a recipe is for, from its file name: ``<script>_*.yaml`` or ``demo_<script>.yaml``."""
    name = os.path.basename(recipe).removeprefix("demo_")
    for script in SCRIPTS:
        if name.startswith(script):
            return script
    raise AssertionError(f"no entry point for {recipe}: name it <script>_... with script in {SCRIPTS}")


def is_pipeline(recipe: str) -> bool:
    with open(recipe) as f:
        return "stages" in (yaml.safe_load(f) or {})


def parser_for(recipe: str) -> TrlParser:
    if os.path.basename(recipe).startswith("search_"):  # `hfweight search-mixture` / python -m hfweight.search
        from hfweight.search.cli import recipe_dataclasses

        return TrlParser(recipe_dataclasses())
    return TrlParser(_script(script_for(recipe)).DATACLASSES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[os.path.relpath(r, ROOT) for r in RECIPES])
def test_recipe_parses_and_validates_offline(recipe):
    """Building the config dataclasses runs every validation (strategy names and kwargs) without touching a model."""
    # This machine has no GPU: a bf16 recipe is validated with `use_cpu`, the only check relaxed here.
    if is_pipeline(recipe):
        pipeline = _script("demo").read_pipeline(recipe)
        for stage in pipeline["stages"]:
            assert script_for(stage["config"]) == stage["script"], stage
            assert os.path.realpath(stage["config"]) in map(os.path.realpath, RECIPES), stage  # validated on its own
        return
    cpu = ["--use_cpu", "true"] if "bf16: true" in open(recipe).read() else []
    configs = parser_for(recipe).parse_args_and_config(["--config", recipe, *cpu])
    training_args = next(c for c in configs if hasattr(c, "weighting_enabled"))
    assert training_args.output_dir
    if getattr(training_args, "reward_weighting", None) is not None:
        # GRPO/RLOO: the reward functions resolve and the weighter binds to their names (weights, thresholds, task).
        import torch

        from hfweight.entrypoints import resolve_reward_functions

        script_args = configs[0]
        names = [f.__name__ for f in resolve_reward_functions(script_args.reward_funcs)]
        weighter = training_args.build_reward_weighting()
        weighter.bind(names, torch.ones(len(names)))


def _run(args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_demo_baseline_switches_every_weighting_off():
    """The demo's unweighted baseline of a stage: same recipe, every weighting switch (and its kwargs) unset."""
    demo = _script("demo")
    for stage in demo.read_pipeline(os.path.join(ROOT, "recipes/tiny/demo.yaml"))["stages"]:
        configs = parser_for(stage["config"]).parse_args_and_config(["--config", os.path.join(ROOT, stage["config"])])
        training = next(c for c in configs if hasattr(c, "weighting_summary"))
        assert training.weighting_summary(), stage  # every demo stage is weighted
        demo.switch_weighting_off(configs)
        assert training.weighting_summary() == {} and not training.weighting_enabled
        assert all(getattr(training, f"{name}_kwargs") == {} for name in demo.WEIGHTING_SWITCHES)


def test_demo_comparison_table_puts_the_baseline_beside_each_stage():
    summaries = [
        {"stage": "pretrain", "heldout_loss": {"code": 2.5, "prose": 3.0},
         "unweighted": {"heldout_loss": {"code": 2.0, "prose": 3.5}}},
        {"stage": "grpo", "heldout_reward": {"format": 0.75}, "unweighted": {"heldout_reward": {"format": 0.5}}},
    ]
    rows = [line.split() for line in _script("demo").comparison_table(summaries).splitlines() if line.startswith(("pre", "grpo"))]
    assert [(r[0], r[-4], r[-3], r[-2], r[-1]) for r in rows] == [
        ("pretrain", "code", "2.000", "2.500", "+0.500"),
        ("pretrain", "prose", "3.500", "3.000", "-0.500"),
        ("pretrain", "mean", "2.750", "2.750", "+0.000"),
        ("grpo", "format", "0.500", "0.750", "+0.250"),
        ("grpo", "mean", "0.500", "0.750", "+0.250"),
    ]


@pytest.mark.slow
def test_main_command_runs_end_to_end(tmp_path):
    """The README's main command (the demo pipeline, `hfweight demo`), shortened: every stage saves a model, logs and a
    plot, and the pipeline ends with one summary table naming where they are. Then a clone's script
    (`trainers/sft.py`, the same command) from the pretrained stage."""
    root = tmp_path / "demo"
    stdout = _run(
        ["-m", "hfweight", "demo", "--config", "tiny/demo", "--output_dir", str(root), "--max_steps", "4",
         "--logging_steps", "2", "--max_eval_samples_per_domain", "4", "--per_device_train_batch_size", "4",
         "--max_length", "64"]
    )
    pipeline = json.loads((root / "pipeline_summary.json").read_text())
    stages = [s["stage"] for s in pipeline["stages"]]
    assert stages == [s["name"] for s in _script("demo").read_pipeline("recipes/tiny/demo.yaml")["stages"]]
    for stage in pipeline["stages"]:
        out = root / stage["stage"]
        for name in ("model.safetensors", "config.json", "weighting.png", "weighting_summary.json", "trainer_log_history.json"):
            assert (out / name).exists(), (stage["stage"], name)
        assert stage["steps"] == 4 and stage["weighting"] != "off"
        assert f"[{stage['stage']}] plot:  {out / 'weighting.png'}" in stdout
    pretrain = pipeline["stages"][0]
    assert set(pretrain["heldout_loss"]) == {"arithmetic", "code", "noise", "prose", "redundant"}
    assert (root / "pretrain" / "mixture_weights.json").exists()
    assert "held-out loss by domain" in stdout and "pipeline done" in stdout
    # Each stage beside its unweighted baseline: same start, steps and seed, weighting off, its own directory.
    assert "What the weighting did" in stdout
    for stage in pipeline["stages"]:
        baseline = stage["unweighted"]
        assert baseline["weighting"] == "off" and baseline["steps"] == stage["steps"]
        assert (root / (stage["stage"] + "_unweighted") / "model.safetensors").exists()
        key = "heldout_reward" if "heldout_reward" in stage else "heldout_loss"
        assert set(baseline[key]) == set(stage[key])
        if key == "heldout_loss":
            assert baseline[key] != stage[key]  # weighting changed the model
        for domain, value in stage[key].items():
            assert f"{value:.3f}" in stdout and f"{baseline[key][domain]:.3f}" in stdout
    out = root / "pretrain"

    sft_out = tmp_path / "sft"
    _run(
        ["trainers/sft.py", "--config", "recipes/tiny/sft_prior.yaml", "--model_name_or_path", str(out),
         "--reference_model", str(out), "--max_steps", "3", "--logging_steps", "1", "--output_dir", str(sft_out), "--builtin_rows", "200",
         "--max_eval_samples_per_domain", "4", "--per_device_train_batch_size", "4"]
    )
    assert (sft_out / "model.safetensors").exists() and (sft_out / "weighting.png").exists()
