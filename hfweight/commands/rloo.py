"""Weighted RLOO: the GRPO entry point with TRL's RLOO trainer (same arguments, same data, same reward functions).

    hfweight rloo --config tiny/rloo_gradient

RLOO does not standardize advantages by default, so the reward weights' absolute scale matters: the dynamic weighters
keep the total of the initial weights fixed (see hfweight.rl.WeightedRLOOTrainer).
"""

from __future__ import annotations

from trl import ModelConfig

from .. import WeightedRLOOConfig, WeightedRLOOTrainer
from ..entrypoints import RLScriptArguments, run_rl

DATACLASSES = (RLScriptArguments, WeightedRLOOConfig, ModelConfig)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: RLScriptArguments, training_args: WeightedRLOOConfig, model_args: ModelConfig) -> dict:
    return run_rl(WeightedRLOOTrainer, script_args, training_args, model_args, stage="rloo")
