"""Weighting strategies; importing this package registers every built-in strategy.

One module per method (or small family): :mod:`.token` (per-token weights), and the packages :mod:`.sample`,
:mod:`.mixture` and :mod:`.rewards`, each with a ``base`` module for what its methods share. :mod:`.base` declares the
interfaces every strategy implements; :mod:`.checks` the argument checks their constructors use.
"""

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

# Each exported class keeps its package as its module: checkpoints record ``module.qualname`` of every stateful part
# (hfweight.state.fingerprint), and pickles record it too, so what was saved before the packages were split into
# one module per method (``hfweight.strategies.sample.LossReweighting``) still loads.
for _package in (mixture, rewards, sample):
    for _name in _package.__all__:
        _obj = getattr(_package, _name)
        if isinstance(_obj, type):
            _obj.__module__ = _package.__name__
del _package, _name, _obj
