"""The Trainer glue: a small core shared by all four trainers (:mod:`.core`), the supervised step
(:mod:`.supervised`, :mod:`.step`) and one driver per capability (:mod:`.drivers`). The GRPO/RLOO glue composing the
core lives in :mod:`hfweight.rl`."""

from .core import WeightingCore
from .supervised import WeightingMixin

__all__ = ["WeightingCore", "WeightingMixin"]
