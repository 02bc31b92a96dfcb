"""Multi-objective reward weighting for GRPO / RLOO (``reward_weighting=...``), one module per method; importing this
package registers them all. The common rules and the protocol the glue implements are in :mod:`.base`.

- ``static`` (:mod:`.static`): the configured weights, unchanged.
- ``popart`` (:mod:`.popart`): ``w_k / σ_k`` with running (EMA, debiased) per-reward statistics (PopArt).
- ``saw`` (:mod:`.saw`): variance-aware ``w0_k·CV_k`` per batch (× saturation factor ``(1 − sat_k)^γ``), ``Σ|w0|``
  kept.
- ``hypervolume`` (:mod:`.hypervolume`): Lu et al. 2025, validation-driven: exact hypervolume gain over a Pareto
  archive.
- ``gradient`` (:mod:`.gradient`): Lu et al. 2025, ``w ← softmax(log w + (lr/reg)·Σ_j S_kj)`` from the per-reward
  gradient Gram ``S``.
- ``constrained`` (:mod:`.constrained`, with :mod:`.nelder_mead`): Moskovitz et al., ICLR 2024, Lagrange multipliers
  on reward thresholds; task weight ``n − Σλ``.
"""

from .base import column_stats, keep_total
from .constrained import ConstrainedWeighting
from .gradient import GradientWeighting, clip_gram, gram_from_gradients
from .hypervolume import HypervolumeWeighting
from .nelder_mead import NelderMead
from .popart import PopArtWeighting
from .saw import SAWWeighting
from .static import StaticWeighting

__all__ = [
    "ConstrainedWeighting",
    "GradientWeighting",
    "HypervolumeWeighting",
    "NelderMead",
    "PopArtWeighting",
    "SAWWeighting",
    "StaticWeighting",
    "clip_gram",
    "column_stats",
    "gram_from_gradients",
    "keep_total",
]
