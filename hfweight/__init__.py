"""hfweight: weight what LLM training learns from — per token, per sample, per domain and per reward — in the
Hugging Face trainers you already use."""

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

__version__ = "0.1.0"

__all__ = [
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
