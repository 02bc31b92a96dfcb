"""Weighted GRPO: argument parsing, model and data loading, and the trainer. No weighting logic here.

    hfweight grpo --config tiny/grpo_popart
    hfweight grpo --config real/grpo_qwen2.5-0.5b-instruct_constrained --accelerate_config zero2

`model_name_or_path` may be `builtin:tiny` (random init), a directory written by `hfweight sft`, or a hub id.
`dataset_name: builtin` uses the embedded arithmetic prompts (domains add, sub, mul; an `answer` column); anything
else goes to `datasets.load_dataset` and needs a `prompt` column plus whatever its reward functions read.
"""

from __future__ import annotations

from trl import ModelConfig

from .. import WeightedGRPOConfig, WeightedGRPOTrainer
from ..entrypoints import RLScriptArguments, run_rl

DATACLASSES = (RLScriptArguments, WeightedGRPOConfig, ModelConfig)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: RLScriptArguments, training_args: WeightedGRPOConfig, model_args: ModelConfig) -> dict:
    return run_rl(WeightedGRPOTrainer, script_args, training_args, model_args, stage="grpo")
