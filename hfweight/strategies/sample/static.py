"""``static`` sample weighting: the dataset's ``sample_weight`` column (docs/methods.md#static-sample)."""

from __future__ import annotations

from ...registry import register_sample_weighting
from ..base import SampleContext, SampleWeighting
from ..checks import required_column


@register_sample_weighting("static")
class StaticSampleWeighting(SampleWeighting):
    """Weights read from the dataset's ``sample_weight`` column (docs/methods.md#static-sample).

    In token normalization every token of sample ``i`` carries ``v_i``; in sample normalization the step loss is
    ``Σ v_i ℓ_i / Σ v_i``.
    """

    column_required = True

    def weights(self, ctx: SampleContext):
        return required_column(ctx.column, "sample_weighting", "sample_weight", "one float ≥ 0 per row")

