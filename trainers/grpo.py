"""Weighted GRPO: argument parsing, model and data loading, and the trainer. No weighting logic here.

    python trainers/grpo.py --config recipes/tiny/grpo_popart.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml trainers/grpo.py --config recipes/real/grpo_qwen2.5-0.5b-instruct_constrained.yaml

`model_name_or_path` may be `builtin:tiny` (random init), a directory written by `trainers/sft.py`, or a hub id.
`dataset_name: builtin` uses the embedded arithmetic prompts (domains add, sub, mul; an `answer` column); anything
else goes to `datasets.load_dataset` and needs a `prompt` column plus whatever its reward functions read.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl import ModelConfig, TrlParser  # noqa: E402

from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer  # noqa: E402
from hfweight.entrypoints import RLScriptArguments, run_rl  # noqa: E402

DATACLASSES = (RLScriptArguments, WeightedGRPOConfig, ModelConfig)
"""What the recipe YAML and the command line fill, in the order ``main`` takes them."""


def main(script_args: RLScriptArguments, training_args: WeightedGRPOConfig, model_args: ModelConfig) -> dict:
    return run_rl(WeightedGRPOTrainer, script_args, training_args, model_args, stage="grpo")


if __name__ == "__main__":
    main(*TrlParser(DATACLASSES).parse_args_and_config())
