"""`python trainers/score_reference.py ARGS` (also under `accelerate launch`) from a clone: the same as `hfweight score-reference ARGS`.

The entry point lives in the package (`hfweight/commands/score_reference.py`); this file keeps the clone's commands working.
"""

from hfweight.commands.score_reference import main  # noqa: F401  (what tests and scripts import from here)

if __name__ == "__main__":
    from hfweight.cli import run_script

    run_script("score-reference")
