"""Run an entry script of ``trainers/`` with test-only fault hooks (the library carries none).

Usage: python tests/scripts/fault_entry.py SCRIPT [entry-script arguments...]   (SCRIPT: pretrain, sft, grpo, rloo)

Environment:
  HFW_STEPS_LOG=path      append each optimizer step this process trains (``global_step`` after it) to ``path``.
  HFW_KILL_AT_STEP=k      SIGKILL this process at the start of optimizer step k+1 (mid-training, between checkpoints).
  HFW_KILL_IN_SAVE=k      SIGKILL this process inside the save of ``checkpoint-k``: after the model, optimizer and
                          scheduler files are written, in the middle of writing the weighting state (its temporary file
                          holds half of the bytes), before the RNG state and ``trainer_state.json``.
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402


def kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Faults(transformers.TrainerCallback):
    def __init__(self, steps_log: str | None, kill_at_step: int | None):
        self.steps_log, self.kill_at_step = steps_log, kill_at_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.kill_at_step is not None and state.global_step == self.kill_at_step:
            kill_self()

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps_log:
            with open(self.steps_log, "a") as f:
                f.write(f"{state.global_step}\n")


def install_hooks() -> None:
    steps_log = os.environ.get("HFW_STEPS_LOG")
    kill_at_step = int(os.environ["HFW_KILL_AT_STEP"]) if os.environ.get("HFW_KILL_AT_STEP") else None
    kill_in_save = os.environ.get("HFW_KILL_IN_SAVE")

    parent_train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        self.add_callback(Faults(steps_log, kill_at_step))
        return parent_train(self, *args, **kwargs)

    transformers.Trainer.train = train

    if kill_in_save:
        import hfweight.glue.core

        parent_save_state = hfweight.glue.core.save_state

        def save_state(checkpoint_dir, *args, **kwargs):
            path = parent_save_state(checkpoint_dir, *args, **kwargs)
            if os.path.basename(checkpoint_dir) == f"checkpoint-{kill_in_save}":
                # What a death inside torch.save leaves: half of the temporary file, no state file, no trainer state.
                partial = f"{path}.tmp-{os.getpid()}"
                os.replace(path, partial)
                with open(partial, "r+b") as f:
                    f.truncate(os.path.getsize(partial) // 2)
                kill_self()
            return path

        hfweight.glue.core.save_state = save_state


if __name__ == "__main__":
    script = sys.argv[1]
    install_hooks()
    sys.argv = [os.path.join(ROOT, "trainers", f"{script}.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
