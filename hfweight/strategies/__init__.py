"""Weighting strategies; importing this package registers every built-in strategy."""

from . import mixture, rewards, sample, token  # noqa: F401  (registration side effects)
from .base import (
    DomainStats,
    MixtureController,
    RewardWeighting,
    SampleContext,
    SampleWeighting,
    Stateful,
    TokenContext,
    TokenWeighting,
)

__all__ = [
    "DomainStats",
    "MixtureController",
    "RewardWeighting",
    "SampleContext",
    "SampleWeighting",
    "Stateful",
    "TokenContext",
    "TokenWeighting",
]
