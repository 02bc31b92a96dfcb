"""`python trainers/grpo.py ARGS` (also under `accelerate launch`) from a clone: the same as `hfweight grpo ARGS`.

The entry point lives in the package (`hfweight/commands/grpo.py`); this file keeps the clone's commands working.
"""

from hfweight.commands.grpo import DATACLASSES, main  # noqa: F401  (what tests and scripts import from here)

if __name__ == "__main__":
    from hfweight.cli import run_script

    run_script("grpo")
