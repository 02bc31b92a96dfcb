"""Per-token weighting strategies (METHODS §2).

Each strategy turns a :class:`~hfweight.strategies.base.TokenContext` into detached per-token weights. The static
column, when the dataset carries one, multiplies every strategy's weights (so ``token_weighting="dft"`` on a dataset
with ``token_weights`` trains on ``column · p_t · ℓ_t``).
"""

from __future__ import annotations

from ..registry import register_token_weighting
from .base import TokenContext, TokenWeighting


@register_token_weighting("static")
class StaticTokenWeighting(TokenWeighting):
    """Weights read from the dataset's ``token_weights`` column (METHODS §2.6).

    The column is aligned with ``input_ids``: entry ``j`` weighs the loss of predicting token ``j`` (entry 0 is never
    used, since nothing predicts the first token). The weights enter both the numerator and the normalizer, so the
    step loss is ``Σ w_t ℓ_t / Σ w_t``: a weighted token mean that equals the plain mean when every weight is 1.
    """

    column_required = True

    def denominator_weights(self, ctx: TokenContext):
        if ctx.column is None:
            raise ValueError(
                "token_weighting='static' needs a `token_weights` column (a list of floats aligned with `input_ids`) "
                "in the training dataset; add it or choose another token_weighting."
            )
        return ctx.column
