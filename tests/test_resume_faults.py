"""Entry scripts honour ``--resume_from_checkpoint`` and survive real faults (issue 14: defect 0 and "Faults").

Every run here is a real subprocess of ``trainers/<script>.py`` (through ``tests/scripts/fault_entry.py``, which adds
the test-only hooks: a log of the steps trained, a SIGKILL at a given step or inside the save of a checkpoint). A
run that is killed and resumed must train only the remaining steps and end with exactly the parameters (saved
safetensors, compared bit for bit) and weighting state of the uninterrupted run.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_state
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "scripts", "fault_entry.py")

COMMON = ["--use_cpu", "true", "--report_to", "none", "--seed", "0", "--logging_steps", "1", "--save_strategy", "steps",
          "--save_steps", "2", "--dataloader_num_workers", "0"]
SCRIPT_ARGS = {
    # A stateful sample weighting and an online mixture: both must continue exactly.
    "pretrain": ["--model_name_or_path", "builtin:tiny", "--max_train_samples", "64", "--max_length", "32",
                 "--per_device_train_batch_size", "4", "--dataset_eval_split", "None", "--sample_weighting", "loss",
                 "--mixture", "odm", "--mixture_kwargs", '{"warmup_steps": 1}'],
    "sft": ["--model_name_or_path", "builtin:tiny", "--builtin_rows", "80", "--max_length", "32",
            "--per_device_train_batch_size", "4", "--dataset_eval_split", "None", "--sample_weighting", "loss"],
    "grpo": ["--model_name_or_path", "builtin:tiny", "--builtin_rows", "40", "--dataset_eval_split", "None",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4",
             "--beta", "0.0", "--reward_weighting", "popart"],
}
SCRIPT_ARGS["rloo"] = SCRIPT_ARGS["grpo"]


def run(script: str, out, *extra: str, steps_log=None, kill_at_step=None, kill_in_save=None, max_steps=4, expect="ok"):
    """Run ``trainers/<script>.py`` in a subprocess; return the optimizer steps it trained (``global_step`` after each)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": ROOT}
    steps_log = steps_log or f"{out}.steps-{os.urandom(4).hex()}"
    env.update(HFW_STEPS_LOG=steps_log, HFW_KILL_AT_STEP=str(kill_at_step or ""), HFW_KILL_IN_SAVE=str(kill_in_save or ""))
    cmd = [sys.executable, ENTRY, script, *SCRIPT_ARGS[script], *COMMON, "--max_steps", str(max_steps),
           "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if expect == "kill":
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    elif expect == "ok":
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    else:
        assert proc.returncode not in (0, -signal.SIGKILL), proc.stderr[-3000:]
    trained = [int(s) for s in open(steps_log).read().split()] if os.path.exists(steps_log) else []
    return trained, proc


def assert_same_parameters(a_dir, b_dir):
    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"




def weighting_state(checkpoint_dir):
    return torch.load(os.path.join(checkpoint_dir, "hfweight_state.pt"), weights_only=False)["objects"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["sft", "grpo", "rloo"])
def test_killed_entry_script_resumes_exactly(tmp_path, script):
    """SIGKILL mid-training (after checkpoint-2 and step 3), then ``--resume_from_checkpoint <path>``: the resumed
    process trains steps 3 and 4 only and ends with the uninterrupted run's parameters and weighting state."""
    straight, _ = run(script, tmp_path / "straight")
    assert straight == [1, 2, 3, 4]
    killed, _ = run(script, tmp_path / "killed", kill_at_step=3, expect="kill")
    assert killed == [1, 2, 3]
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    resumed, _ = run(script, tmp_path / "killed", "--resume_from_checkpoint", str(checkpoint))
    assert resumed == [3, 4]
    assert_same_parameters(tmp_path / "straight", tmp_path / "killed")
    assert_same_state(weighting_state(tmp_path / "straight" / "checkpoint-4"), weighting_state(tmp_path / "killed" / "checkpoint-4"))


@pytest.mark.slow
def test_pretrain_survives_kill_in_save_and_mid_training(tmp_path):
    """pretrain.py with sample `loss` + `odm` mixture, 6 steps, a checkpoint every 2:

    1. killed inside the save of checkpoint-4 (model and optimizer written, weighting state half-written, no
       trainer_state.json): ``--resume_from_checkpoint true`` skips the incomplete checkpoint-4, with a warning, and
       resumes from checkpoint-2 (steps 3, 4 trained again);
    2. that resumed run is killed mid-training at the start of step 5: ``true`` now resumes from the rewritten,
       complete checkpoint-4 and trains steps 5 and 6 only;
    and the result equals the uninterrupted run: parameters bit for bit, strategy and mixture state exactly."""
    straight, _ = run("pretrain", tmp_path / "straight", max_steps=6)
    assert straight == [1, 2, 3, 4, 5, 6]
    out = tmp_path / "faulty"

    first, _ = run("pretrain", out, max_steps=6, kill_in_save=4, expect="kill")
    assert first == [1, 2, 3, 4]
    incomplete = out / "checkpoint-4"
    assert (incomplete / "model.safetensors").exists() and not (incomplete / "trainer_state.json").exists()
    assert not (incomplete / "hfweight_state.pt").exists() and any(p.name.startswith("hfweight_state.pt.tmp") for p in incomplete.iterdir())

    second, proc = run("pretrain", out, "--resume_from_checkpoint", "true", max_steps=6, kill_at_step=4, expect="kill")
    assert "Skipping the incomplete checkpoint" in proc.stderr and "checkpoint-4" in proc.stderr
    assert second == [3, 4]

    third, _ = run("pretrain", out, "--resume_from_checkpoint", "true", max_steps=6)
    assert third == [5, 6]

    assert_same_parameters(tmp_path / "straight", out)
    expected, got = weighting_state(tmp_path / "straight" / "checkpoint-6"), weighting_state(out / "checkpoint-6")
    assert set(expected) >= {"sample_weighting", "mixture", "domain_sampler"}
    assert_same_state(expected, got)


def test_resume_argument_errors_before_training(tmp_path):
    """A path that does not exist stops the entry script before any step, with an error naming it."""
    missing = tmp_path / "nowhere" / "checkpoint-7"
    trained, proc = run("pretrain", tmp_path / "a", "--resume_from_checkpoint", str(missing), expect="error")
    assert trained == [] and not (tmp_path / "a").exists()
    assert f"resume_from_checkpoint={str(missing)!r}: no such directory" in proc.stderr


@pytest.mark.parametrize("script", ["sft", "grpo", "rloo"])
def test_every_entry_script_checks_the_resume_path_first(tmp_path, script):
    """Each entry script's ``main`` resolves ``--resume_from_checkpoint`` before loading a model or data."""
    import importlib

    from trl import TrlParser

    module = importlib.import_module(f"hfweight.commands.{script}")
    missing = str(tmp_path / "checkpoint-3")
    configs = TrlParser(module.DATACLASSES).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--use_cpu", "true", "--resume_from_checkpoint", missing,
         "--model_name_or_path", str(tmp_path / "no-model")]
    )
    with pytest.raises(FileNotFoundError, match=f"resume_from_checkpoint={missing!r}: no such directory"):
        module.main(*configs)
