"""Run an entry script unchanged under the engine named by ``HFW_ENGINE`` (see tests/engines.py::run_entry).

Usage: HFW_ENGINE=fsdp2 torchrun --nproc_per_node 2 tests/scripts/engine_entry.py SCRIPT [ARG ...]
Applies the engine's test-only patches, appends its flags (``--deepspeed cfg.json`` / ``--fsdp true --fsdp_config
cfg.json``) to SCRIPT's arguments, and after every ``Trainer.train()`` checks that the engine really ran, printing
``ENGINE_FACTS {json}`` on each rank.
"""

import json
import os
import runpy
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import engines  # noqa: E402
from helpers import leave_process_group  # noqa: E402


def _checked_train(train, engine):
    def wrapped(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        facts = engines.assert_engine(self, engine)
        sys.stdout.write(f"ENGINE_FACTS {json.dumps(facts)}\n")
        sys.stdout.flush()
        return result

    return wrapped


def main():
    import transformers

    script, *args = sys.argv[1:]
    engine = os.environ["HFW_ENGINE"]
    engines.activate(engine)
    transformers.Trainer.train = _checked_train(transformers.Trainer.train, engine)
    with tempfile.TemporaryDirectory() as tmp:
        sys.argv = [script, *args, *engines.cli_flags(engine, tmp)]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
    leave_process_group()
