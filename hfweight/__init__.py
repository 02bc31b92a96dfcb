"""hfweight: weight what LLM training learns from — per token, per sample, per domain and per reward — in the
Hugging Face trainers you already use.

The public names are imported on first use (PEP 562), so ``import hfweight`` — and with it ``hfweight --version`` or
``hfweight recipes`` — does not pay for importing torch, transformers and TRL until a trainer or config is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "WeightedTrainingArguments": ".config",
    "WeightingArguments": ".config",
    "register_mixture": ".registry",
    "register_reward_weighting": ".registry",
    "register_sample_weighting": ".registry",
    "register_token_weighting": ".registry",
    "WeightedGRPOConfig": ".rl",
    "WeightedGRPOTrainer": ".rl",
    "WeightedRLOOConfig": ".rl",
    "WeightedRLOOTrainer": ".rl",
    "WeightedSFTConfig": ".sft",
    "WeightedSFTTrainer": ".sft",
    "WeightedTrainer": ".trainer",
    "search_mixture": ".search",
}

__all__ = [  # the names of _EXPORTS (tests/test_cli.py checks they agree)
    "WeightedGRPOConfig",
    "WeightedGRPOTrainer",
    "WeightedRLOOConfig",
    "WeightedRLOOTrainer",
    "WeightedSFTConfig",
    "WeightedSFTTrainer",
    "WeightedTrainer",
    "WeightedTrainingArguments",
    "WeightingArguments",
    "register_mixture",
    "register_reward_weighting",
    "register_sample_weighting",
    "register_token_weighting",
    "search_mixture",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hfweight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .config import WeightedTrainingArguments, WeightingArguments
    from .registry import (
        register_mixture,
        register_reward_weighting,
        register_sample_weighting,
        register_token_weighting,
    )
    from .rl import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer
    from .search import search_mixture
    from .sft import WeightedSFTConfig, WeightedSFTTrainer
    from .trainer import WeightedTrainer
