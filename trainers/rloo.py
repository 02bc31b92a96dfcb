"""`python trainers/rloo.py ARGS` (also under `accelerate launch`) from a clone: the same as `hfweight rloo ARGS`.

The entry point lives in the package (`hfweight/commands/rloo.py`); this file keeps the clone's commands working.
"""

from hfweight.commands.rloo import DATACLASSES, main  # noqa: F401  (what tests and scripts import from here)

if __name__ == "__main__":
    from hfweight.cli import run_script

    run_script("rloo")
