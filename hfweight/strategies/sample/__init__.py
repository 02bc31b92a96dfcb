"""Per-sample weighting strategies (``sample_weighting=...``), one module per method; importing this package registers
them all (docs/methods.md, "Per-sample weights").

- ``static`` (:mod:`.static`): the dataset's ``sample_weight`` column.
- ``loss`` (:mod:`.loss`): Sow et al., ICLR 2025 — :func:`normalize_losses`, :func:`loss_strategy_scores`,
  :func:`softmax_weights` and :class:`LossReweighting`.
- ``truncation`` (:mod:`.truncation`): Kang & Hashimoto, ACL 2020 — :class:`LossTruncation`.
- ``storm`` (:mod:`.storm`): after Heck et al., AAAI 2025 — :class:`MetaRescaler`, with :class:`RescalerNet`,
  :func:`sample_features`, :func:`meta_objective` and :func:`lookahead_surrogate`.

:mod:`.base` holds what the loss-based ones share: the two exact modes (:data:`SAMPLE_MODES`), the global losses of
the step and the final weights.
"""

from .base import SAMPLE_MODES
from .loss import (
    LOSS_STRATEGIES,
    LOSS_STRATEGY_ALIASES,
    LossReweighting,
    loss_strategy_scores,
    normalize_losses,
    normalize_losses_in_range,
    softmax_weights,
    unnormalized_softmax_weights,
)
from .static import StaticSampleWeighting
from .storm import (
    STORM_FEATURES,
    MetaRescaler,
    RescalerNet,
    lookahead_surrogate,
    meta_objective,
    sample_features,
    scales_kl_to_uniform,
)
from .truncation import TRUNCATION_AUTHORS_WINDOW, LossTruncation, truncation_window

__all__ = [
    "LOSS_STRATEGIES",
    "LOSS_STRATEGY_ALIASES",
    "SAMPLE_MODES",
    "STORM_FEATURES",
    "TRUNCATION_AUTHORS_WINDOW",
    "LossReweighting",
    "LossTruncation",
    "MetaRescaler",
    "RescalerNet",
    "StaticSampleWeighting",
    "lookahead_surrogate",
    "loss_strategy_scores",
    "meta_objective",
    "normalize_losses",
    "normalize_losses_in_range",
    "sample_features",
    "scales_kl_to_uniform",
    "softmax_weights",
    "truncation_window",
    "unnormalized_softmax_weights",
]
