"""Per-sample weighting strategies (METHODS §1)."""

from __future__ import annotations

from ..registry import register_sample_weighting
from .base import SampleContext, SampleWeighting


@register_sample_weighting("static")
class StaticSampleWeighting(SampleWeighting):
    """Weights read from the dataset's ``sample_weight`` column (METHODS §1.4).

    In token normalization every token of sample ``i`` carries ``v_i``; in sample normalization the step loss is
    ``Σ v_i ℓ_i / Σ v_i``.
    """

    column_required = True

    def weights(self, ctx: SampleContext):
        if ctx.column is None:
            raise ValueError(
                "sample_weighting='static' needs a `sample_weight` column (one float ≥ 0 per row) in the training "
                "dataset; add it or choose another sample_weighting."
            )
        return ctx.column
