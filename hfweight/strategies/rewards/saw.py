"""``saw``: variance-aware reward weights from the current batch, optionally saturation-aware
(docs/methods.md#saw).

``w_k = c · w0_k · s_k`` with ``s_k`` the batch's coefficient of variation ``σ_k / |μ_k|`` (default), its std, or 1,
times ``(1 − sat_k)^γ`` with ``saturation_gamma``; ``c`` keeps ``Σ|w| = Σ|w0|``. Stateless.
"""

from __future__ import annotations

import torch

from ...registry import register_reward_weighting
from ..checks import choice, number
from .base import F64, Weighter, column_stats, keep_total, kwarg, per_reward_spec, resolve_per_reward, valid_rewards


@register_reward_weighting("saw")
class SAWWeighting(Weighter):
    """Variance-aware weights from the current batch (stateless), optionally saturation-aware.

    Per reward k over the batch's valid entries (population statistics): ``s_k = CV_k = σ_k / max(|μ_k|, eps)``
    (``statistic="cv"``), or ``s_k = σ_k`` (``"std"``), or ``s_k = 1`` (``"none"``). Then
    ``w_k = c · w0_k · s_k`` with ``c`` such that ``Σ|w| = Σ|w0|`` (:func:`keep_total`: the total of the initial
    weights is kept, which RLOO's reward scale needs); with the default ``w0 = 1`` this is ``K·CV_k/Σ CV``.

    - A constant reward (σ = 0) or one with no valid entry gets ``s_k = 0``, hence weight 0; when every reward is
      constant the initial weights are returned. Never NaN.
    - The CV of a reward whose mean is near 0 is huge (``eps`` only prevents a division by zero): prefer
      ``statistic="std"`` for rewards centred on 0.
    - ``saturation_gamma=γ`` multiplies by ``(1 − sat_k)^γ`` (saturation-aware GDPO), ``sat_k`` = fraction of valid
      entries at the reward's maximum (``r ≥ max_k − saturation_tol``), where ``max_k`` is ``reward_max[k]`` when given
      (a list, or a ``{reward name: max}`` dict; missing names use the batch maximum) and the batch maximum otherwise.
      With ``statistic="none"`` this is the saturation factor alone, meant for ``normalize_then_sum``. The total
      ``Σ|w| = Σ|w0|`` is restored after the factor too.
    - If every weight comes out 0 (e.g. every reward saturated), the initial weights are returned.
    """

    def __init__(self, weights=None, statistic: str = "cv", eps: float = 1e-8, saturation_gamma: float | None = None,
                 reward_max=None, saturation_tol: float = 0.0):
        super().__init__(weights)
        self.statistic = choice(statistic, kwarg("statistic"), ("cv", "std", "none"))
        self.eps = number(eps, kwarg("eps"), low=0.0, low_open=True)
        self.saturation_gamma = None if saturation_gamma is None else number(saturation_gamma, kwarg("saturation_gamma"),
                                                                                low=0.0)
        if reward_max is not None:
            per_reward_spec(reward_max, "reward_max", allow_none=True)
            if self.saturation_gamma is None:
                raise ValueError(f"{kwarg('reward_max')} only matters with {kwarg('saturation_gamma')}; set it too.")
        self._reward_max_spec = reward_max
        self.saturation_tol = number(saturation_tol, kwarg("saturation_tol"), low=0.0)

    def _reset(self):
        if self._reward_max_spec is None:
            self._reward_max = [None] * len(self.reward_names)
        else:
            self._reward_max = resolve_per_reward(self._reward_max_spec, self.reward_names, "reward_max",
                                                   allow_none=True)

    def saturation(self, rewards: torch.Tensor) -> torch.Tensor:
        """Fraction of valid entries at each reward's maximum, float64 ``(K,)`` (0 for a column without entries)."""
        r = valid_rewards(rewards, len(self.reward_names))
        valid = ~torch.isnan(r)
        count = valid.sum(dim=0).to(F64)
        out = torch.zeros(r.shape[1], dtype=F64)
        for k in range(r.shape[1]):
            if count[k] == 0:
                continue
            col = r[valid[:, k], k]
            top = self._reward_max[k] if self._reward_max[k] is not None else float(col.max())
            out[k] = (col >= top - self.saturation_tol).sum().to(F64) / count[k]
        return out

    def _compute(self, rewards, step):
        count, mean, var = column_stats(rewards)
        std = var.sqrt()
        if self.statistic == "cv":
            s = std / mean.abs().clamp(min=self.eps)
        elif self.statistic == "std":
            s = std
        else:
            s = (count > 0).to(F64)
        s = torch.where(count > 0, s, torch.zeros_like(s))
        w0 = self.initial_weights
        if s.sum() <= 0:
            s = torch.ones_like(s)  # every reward constant: the initial weights (before any saturation factor)
        if self.saturation_gamma is not None:
            s = s * (1.0 - self.saturation(rewards)).clamp(min=0) ** self.saturation_gamma
        return keep_total(w0, w0 * s)
