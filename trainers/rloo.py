"""Weighted RLOO: the GRPO entry point with TRL's RLOO trainer (same arguments, same data, same reward functions).

    python trainers/rloo.py --config recipes/tiny/rloo_gradient.yaml

RLOO does not standardize advantages by default, so the reward weights' absolute scale matters: the dynamic weighters
keep the total of the initial weights fixed (see hfweight.rl.WeightedRLOOTrainer).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl import ModelConfig, TrlParser  # noqa: E402

from hfweight import WeightedRLOOConfig, WeightedRLOOTrainer  # noqa: E402
from hfweight.entrypoints import RLScriptArguments, run_rl  # noqa: E402

DATACLASSES = (RLScriptArguments, WeightedRLOOConfig, ModelConfig)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: RLScriptArguments, training_args: WeightedRLOOConfig, model_args: ModelConfig) -> dict:
    return run_rl(WeightedRLOOTrainer, script_args, training_args, model_args, stage="rloo")


if __name__ == "__main__":
    main(*TrlParser(DATACLASSES).parse_args_and_config())
