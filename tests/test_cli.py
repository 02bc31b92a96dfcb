"""The ``hfweight`` command (hfweight/cli.py) and its packaged resources (hfweight/resources.py): recipe and
accelerate-config names, the ``recipes`` listing, ``--version``, the ``accelerate launch`` command a relaunch runs,
and real runs through ``python -m hfweight`` from a directory that is not the repository. The wheel itself (built,
installed in a fresh venv, run from outside the repository) is checked by ``scripts/wheel_check.sh``."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest

from hfweight import cli, resources

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILES = sorted((ROOT / "recipes").rglob("*.yaml"))
CONFIG_FILES = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


# ---- names -> files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["tiny/sft_dft", "tiny/sft_dft.yaml", "recipes/tiny/sft_dft.yaml"])
def test_recipe_name_resolves_with_or_without_suffix(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: the name, not a relative path, finds the file
    assert Path(resources.resolve(value, "recipes")) == ROOT / "recipes" / "tiny" / "sft_dft.yaml"


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "sft_dft.yaml").write_text("max_steps: 1\n")
    assert resources.resolve("tiny/sft_dft.yaml", "recipes") == "tiny/sft_dft.yaml"
    assert Path(resources.resolve("tiny/sft_dft", "recipes")) == ROOT / "recipes" / "tiny" / "sft_dft.yaml"


def test_unknown_recipe_name_lists_the_near_matches():
    with pytest.raises(resources.UnknownResourceError) as err:
        resources.resolve("tiny/sft_dtf", "recipes")
    message = str(err.value)
    assert "--config 'tiny/sft_dtf' is neither a file nor a packaged recipe name" in message
    assert "Did you mean: tiny/sft_dft" in message and "hfweight recipes" in message
    with pytest.raises(resources.UnknownResourceError, match="Did you mean: .*tiny/pretrain_mixture_odm"):
        resources.resolve("pretrain_mixture_odm", "recipes")  # the folder forgotten
    with pytest.raises(resources.UnknownResourceError) as err:
        resources.resolve("qqqqqqqq", "recipes")
    assert "Did you mean" not in str(err.value)


def test_accelerate_config_names_resolve_and_unknown_ones_list_near_matches():
    for path in CONFIG_FILES:
        assert Path(resources.resolve(path.stem, "accelerate_configs")) == path
    assert set(resources.packaged_names("accelerate_configs")) >= {"ddp", "ddp_cpu", "fsdp2", "zero2", "zero3"}
    with pytest.raises(resources.UnknownResourceError, match="--accelerate_config 'zero4'.*Did you mean: zero3, zero2"):
        resources.resolve("zero4", "accelerate_configs")


def test_main_prints_a_clean_error_for_an_unknown_recipe(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sft", "--config", "tiny/sft_dtf", "--max_steps", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hfweight sft: error: --config 'tiny/sft_dtf'") and "Traceback" not in err


def documented_commands() -> list[tuple[str, str]]:
    """``(file, command line)`` of every ``hfweight <command> ...`` the user-facing text shows: the README, docs/,
    accelerate_configs/README.md, recipe headers, the entry points' docstrings."""
    import re

    files = [ROOT / "README.md", ROOT / "accelerate_configs" / "README.md", *ROOT.glob("docs/*.md"), *RECIPE_FILES,
             *CONFIG_FILES, *(ROOT / "hfweight" / "commands").glob("*.py"), ROOT / "hfweight" / "cli.py"]
    return [(path.name, match) for path in files
            for match in re.findall(r"hfweight (?:[a-z][\w-]*)(?: [^\s`|(),]+)*", path.read_text())]


def test_every_documented_command_names_a_command_recipe_and_config_that_exist():
    commands = documented_commands()
    assert len(commands) > 50
    for where, line in commands:
        words = line.split()
        if words[1] not in cli.COMMANDS or "<" in line:  # prose ("hfweight command"), a placeholder
            continue
        for flag, kind in (("--config", "recipes"), ("--accelerate_config", "accelerate_configs")):
            if flag in words[:-1] and words[1] != "search-mixture":
                value = words[words.index(flag) + 1]
                if "my_" in value:  # the README's example of a user's own file
                    continue
                try:
                    resources.resolve(value, kind)
                except resources.UnknownResourceError as err:
                    raise AssertionError(f"{where}: `{line}`: {err}") from err
    named = {line.split()[1] for _, line in commands}
    assert set(cli.TRAINING_COMMANDS) | {"demo", "recipes", "score-reference"} <= named, named


# ---- recipes, --version, --help ----------------------------------------------------------------------------------


def test_header_summary_joins_the_leading_comment_paragraph(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# First line of the description,\n# continued here.\n#   hfweight sft --config r\n"
                      "# not part of it\nmax_steps: 1\n")
    assert resources.header_summary(recipe) == "First line of the description, continued here."
    (tmp_path / "bare.yaml").write_text("max_steps: 1\n")
    assert resources.header_summary(tmp_path / "bare.yaml") == ""


def test_recipes_lists_every_recipe_and_accelerate_config_once_with_its_description(capsys):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for folder, files in (("recipes", RECIPE_FILES), ("accelerate_configs", CONFIG_FILES)):
        for path in files:
            name = path.relative_to(ROOT / folder).with_suffix("").as_posix()
            matching = [line for line in lines if line.split()[:1] == [name]]
            assert len(matching) == 1, name
            summary = resources.header_summary(path)
            assert summary and matching[0].split(None, 1)[1] == summary, name
    assert len([line for line in lines if line.startswith("  ")]) == len(RECIPE_FILES) + len(CONFIG_FILES)
    # Within a family the descriptions tell the recipes apart (they are what a user picks from).
    summaries = [resources.header_summary(p) for p in RECIPE_FILES]
    assert len(set(summaries)) == len(summaries), [s for s in summaries if summaries.count(s) > 1]


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"hfweight {version('hfweight')}"


@pytest.mark.parametrize("command", cli.TRAINING_COMMANDS)
def test_training_command_help_lists_every_config_field(command, capsys):
    """``--help`` of each training command lists every field of every config class it fills (a ``%`` in a field's
    help text once made argparse's help crash)."""
    import importlib

    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hfweight {command}")
    for dataclass in importlib.import_module(f"hfweight.commands.{command}").DATACLASSES:
        fields = [name for name, f in dataclass.__dataclass_fields__.items() if f.init]
        missing = [name for name in fields if f"--{name} " not in out and f"--{name}\n" not in out]
        assert not missing, (dataclass.__name__, missing)
    assert "--accelerate_config" in out and "--config" in out


# ---- accelerate launch ---------------------------------------------------------------------------------------------


def test_accelerate_launch_arguments():
    ddp_cpu = str(ROOT / "accelerate_configs" / "ddp_cpu.yaml")
    argv = ["--config", "tiny/pretrain", "--accelerate_config", "ddp_cpu", "--max_steps", "3", "--num_processes", "2"]
    assert cli.accelerate_launch_arguments("pretrain", argv) == [
        "--config_file", ddp_cpu, "--num_processes", "2",
        "-m", "hfweight", "pretrain", "--config", "tiny/pretrain", "--max_steps", "3",
    ]
    # `--flag=value`, a file path, no --num_processes: the config's own process count
    custom = ROOT / "accelerate_configs" / "zero3.yaml"
    assert cli.accelerate_launch_arguments("sft", [f"--accelerate_config={custom}", "--max_steps", "1"]) == [
        "--config_file", str(custom), "-m", "hfweight", "sft", "--max_steps", "1",
    ]
    assert cli.accelerate_launch_arguments("sft", ["--config", "tiny/sft_dft"]) is None  # in this process
    with pytest.raises(cli.CommandLineError, match="--num_processes needs --accelerate_config"):
        cli.accelerate_launch_arguments("sft", ["--num_processes", "2"])
    with pytest.raises(cli.CommandLineError, match="expected a positive integer"):
        cli.accelerate_launch_arguments("sft", ["--accelerate_config", "ddp", "--num_processes", "two"])
    with pytest.raises(cli.CommandLineError, match="--accelerate_config needs a value"):
        cli.accelerate_launch_arguments("sft", ["--accelerate_config"])


def test_cpu_configs_tell_the_launched_processes_to_stay_on_the_cpu():
    assert cli.launch_environment(resources.resolve("ddp_cpu", "accelerate_configs")) == {"ACCELERATE_USE_CPU": "1"}
    assert cli.launch_environment(resources.resolve("zero3", "accelerate_configs")) == {}


def test_a_launched_process_never_launches_again(monkeypatch, capsys):
    """Inside a launcher's process (LOCAL_RANK set), --accelerate_config is refused before anything starts."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pretrain", "--config", "tiny/pretrain", "--accelerate_config", "ddp_cpu"])
    assert exit_.value.code == 2
    assert "already decides the processes" in capsys.readouterr().err


def test_demo_and_score_reference_refuse_accelerate_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["demo", "--accelerate_config", "ddp"])
    assert exit_.value.code == 2 and "runs in one process" in capsys.readouterr().err


# ---- search-mixture ------------------------------------------------------------------------------------------------


def test_search_mixture_without_its_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hfweight.search.cli", None)  # as if the module were not installed
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search-mixture", "--help"])
    assert exit_.value.code == 2
    assert "needs the module hfweight.search.cli" in capsys.readouterr().err


def test_search_mixture_hands_its_arguments_to_the_module(monkeypatch):
    seen = []
    stub = types.ModuleType("hfweight.search.cli")
    stub.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "hfweight.search.cli", stub)
    assert cli.main(["search-mixture", "--budget", "3", "--config", "x"]) == 7
    assert seen == [["--budget", "3", "--config", "x"]]


# ---- pipelines: a stage's recipe -----------------------------------------------------------------------------------


def test_pipeline_stages_resolve_to_packaged_recipes_from_any_directory(tmp_path, monkeypatch):
    from hfweight.commands.demo import read_pipeline

    monkeypatch.chdir(tmp_path)
    stages = read_pipeline(resources.resolve("tiny/demo", "recipes"))["stages"]
    assert [Path(s["config"]) for s in stages] == [
        ROOT / "recipes" / "tiny" / f"demo_{name}.yaml" for name in ("pretrain", "sft", "grpo")
    ]
    # A user's pipeline: a stage's path is relative to the pipeline's own folder, before any packaged name.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_sft.yaml").write_text("max_steps: 1\n")
    (tmp_path / "mine" / "pipe.yaml").write_text(
        "stages:\n  - {name: a, script: pretrain, config: tiny/pretrain}\n  - {name: b, script: sft, config: my_sft.yaml}\n"
    )
    stages = read_pipeline(str(tmp_path / "mine" / "pipe.yaml"))["stages"]
    assert Path(stages[0]["config"]) == ROOT / "recipes" / "tiny" / "pretrain.yaml"
    assert Path(stages[1]["config"]) == tmp_path / "mine" / "my_sft.yaml"
    (tmp_path / "mine" / "bad.yaml").write_text("stages:\n  - {name: a, script: sft, config: tiny/sft_dtf}\n")
    with pytest.raises(resources.UnknownResourceError, match="Did you mean: tiny/sft_dft"):
        read_pipeline(str(tmp_path / "mine" / "bad.yaml"))


# ---- real runs -----------------------------------------------------------------------------------------------------

TINY = ["--max_eval_samples_per_domain", "4", "--per_device_train_batch_size", "4", "--max_length", "64",
        "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none"]


def run_hfweight(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m hfweight ARGS`` in ``cwd`` (not the repository), with this checkout's package."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "hfweight", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_packaged_recipe_by_name_runs_through_python_m_hfweight(tmp_path):
    out = tmp_path / "run"
    proc = run_hfweight(tmp_path, "pretrain", "--config", "tiny/pretrain_mixture_odm", "--max_steps", "3",
                        "--save_strategy", "no", "--output_dir", str(out), *TINY)
    assert (out / "model.safetensors").exists() and (out / "mixture_weights.json").exists()
    import json

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["weighting"]["mixture"] == "odm"
    assert f"[pretrain] model: {out}" in proc.stdout


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_config_relaunches_the_command_on_two_processes(tmp_path):
    """``--accelerate_config ddp_cpu --num_processes 2``: the command runs again under ``accelerate launch`` on two
    ranks (without the launch flags, so the ranks do not launch again); the checkpoint holds both ranks' state.
    ``--use_cpu false`` overrides the recipe's ``use_cpu: true``: the ranks find the CPU through the
    ``ACCELERATE_USE_CPU=1`` the relaunch sets for a ``use_cpu: true`` accelerate config (without it, each process of
    a machine without CUDA trains alone: world size 1, no rank-1 state)."""
    from hfweight.state import checkpoint_problem, read_state, state_file

    out = tmp_path / "run"
    proc = run_hfweight(tmp_path, "pretrain", "--config", "tiny/pretrain_mixture_odm", "--max_steps", "2",
                        "--save_steps", "2", "--output_dir", str(out), *TINY,
                        "--use_cpu", "false", "--accelerate_config", "ddp_cpu", "--num_processes", "2")
    assert "accelerate launch --config_file " in proc.stderr and " -m hfweight pretrain " in proc.stderr
    checkpoint = str(out / "checkpoint-2")
    assert checkpoint_problem(checkpoint) is None
    assert [read_state(state_file(checkpoint, rank))["world_size"] for rank in (0, 1)] == [2, 2]


def test_package_imports_lazily_and_exports_every_public_name():
    """`import hfweight` (what `hfweight --version` / `recipes` pay) loads no torch; every public name resolves."""
    code = (
        "import sys, hfweight\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'eager import'\n"
        "assert sorted(hfweight.__all__) == sorted(hfweight._EXPORTS), 'export lists disagree'\n"
        "for name in hfweight.__all__:\n"
        "    assert callable(getattr(hfweight, name)), name\n"
        "from hfweight import WeightedSFTTrainer\n"
        "import trl\n"
        "assert issubclass(WeightedSFTTrainer, trl.SFTTrainer)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_training_command_leaves_the_process_group_it_ran_in(tmp_path, monkeypatch):
    """After a training command's run, the process group is destroyed (a barrier, then ``destroy_process_group``), so
    a launched rank does not abort at exit on gloo's threads; with no process group it is a no-op."""
    import torch.distributed as dist

    calls = []
    fake = types.ModuleType("hfweight.commands.pretrain_stub")
    fake.DATACLASSES = []
    fake.main = lambda *args: calls.append(dist.is_initialized())
    monkeypatch.setitem(sys.modules, "hfweight.commands.pretrain_stub", fake)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        import trl

        monkeypatch.setattr(trl, "TrlParser", lambda *a, **k: types.SimpleNamespace(parse_args_and_config=lambda argv: ()))
        assert cli.run_training("pretrain-stub", []) == 0
        assert calls == [True] and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    cli.leave_process_group()  # nothing to leave: no error
