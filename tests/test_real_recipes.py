"""Dress rehearsal of every real recipe (issue 12 item 6): its entry script, its YAML unchanged and its accelerate
config's engine, 2 optimizer steps on 2 gloo CPU ranks, with the hub model and dataset replaced by local stand-ins of
the same architecture class and format (tests/standins.py, through ``$HFWEIGHT_STANDINS``). It catches what parsing
cannot: dataset schemas, chat templates, reward functions, argument combinations.

Only sizes and the device are overridden on the command line (steps, batch, sequence and completion lengths, CPU, bf16
off, no saving or reporting); everything that decides *what* runs — trainer, weighting, PEFT, packing, reference, streaming — is the
recipe's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "real").glob("*.yaml"))
ENGINES = {"ddp.yaml": "ddp", "zero2.yaml": "zero2", "zero3.yaml": "zero3", "fsdp2.yaml": "fsdp2"}
SIZES = ["--max_steps", "2", "--save_strategy", "no", "--report_to", "none", "--bf16", "false", "--use_cpu", "true",
         "--logging_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
SCRIPT_SIZES = {
    "pretrain.py": ["--max_length", "32"],
    "sft.py": ["--max_length", "32"],
    "grpo.py": ["--num_generations", "2", "--max_completion_length", "8"],
    "rloo.py": ["--num_generations", "2", "--max_completion_length", "8"],
}


def launch_line(recipe: Path) -> tuple[str, str]:
    """``(engine, entry script)`` from the recipe's own ``hfweight <command> --config real/<name> --accelerate_config
    <file>`` line (the script: the clone's ``trainers/<command>.py``, which runs the same command)."""
    name = recipe.relative_to(ROOT / "recipes").with_suffix("").as_posix()
    match = re.search(rf"hfweight (\w+) --config {re.escape(name)} --accelerate_config (\w+)", recipe.read_text())
    assert match, f"{recipe.name}: no `hfweight <command> --config {name} --accelerate_config <config>` line"
    return ENGINES[match.group(2) + ".yaml"], match.group(1) + ".py"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from standins import build_standins

    return build_standins(str(tmp_path_factory.mktemp("standins")))


def test_every_real_recipe_names_its_engine_and_stand_ins(standins):
    mapping = json.loads(Path(standins).read_text())
    for recipe in RECIPES:
        launch_line(recipe)
        text = recipe.read_text()
        model = re.search(r"^model_name_or_path: (\S+)", text, re.M).group(1)
        dataset = re.search(r"^dataset_name: (\S+)", text, re.M).group(1)
        config = re.search(r"^dataset_config: (\S+)", text, re.M)
        assert model in mapping, f"{recipe.name}: no stand-in for model {model}"
        assert dataset in mapping or f"{dataset}:{config.group(1) if config else ''}" in mapping, recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_real_recipe_dress_rehearsal(recipe, standins, tmp_path, monkeypatch):
    import engines

    if "accuracy_reward" in recipe.read_text():
        pytest.importorskip("math_verify", reason="trl.rewards.accuracy_reward needs `pip install math-verify`")
    engine, script = launch_line(recipe)
    monkeypatch.setenv("HFWEIGHT_STANDINS", standins)
    proc = engines.run_entry(
        engine, str(ROOT / "trainers" / script), "--config", str(recipe), "--output_dir", str(tmp_path / "run"),
        *SIZES, *SCRIPT_SIZES[script], timeout=900,
    )
    facts = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("ENGINE_FACTS ")]
    assert len(facts) >= 2 and all(engines.check_engine(f, engine) == [] for f in facts), proc.stdout[-3000:]
    steps = [line for line in proc.stdout.splitlines() if "'loss'" in line or '"loss"' in line]
    assert steps, proc.stdout[-3000:]
