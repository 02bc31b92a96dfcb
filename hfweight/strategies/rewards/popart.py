"""PopArt-style per-reward normalization by running statistics (van Hasselt et al., NeurIPS 2016; multi-task use:
Hessel et al., AAAI 2019) (docs/methods.md#popart).

``w_k = w0_k / σ_k`` with EMA, debiased per-reward statistics ``μ_k``, ``ν_k`` (``σ_k = sqrt(ν̂_k − μ̂_k²)``). Defaults:
``beta`` 3e-4, ``min_std`` 1e-4, ``max_std`` 1e6, ``fixed_sum`` False.
"""

from __future__ import annotations

import torch

from ...registry import register_reward_weighting
from ..checks import flag, number
from .base import F64, Weighter, column_stats, floats, keep_total, kwarg


@register_reward_weighting("popart")
class PopArtWeighting(Weighter):
    """PopArt-style per-reward normalization by running statistics (van Hasselt et al., NeurIPS 2016; multi-task use:
    Hessel et al., AAAI 2019).

    Per reward k, once per generation batch (NaN entries ignored; a column with no valid entry is not updated):
    ``μ_k ← (1−β)μ_k + β·mean_batch(r_k)``, ``ν_k ← (1−β)ν_k + β·mean_batch(r_k²)``; debiased like Adam
    (``μ̂ = μ/(1 − (1−β)^{t_k})``, ``t_k`` the number of updates of column k) so the statistics start at the data's
    scale rather than 0; ``σ_k = sqrt(max(ν̂_k − μ̂_k², 0))``, at most ``max_std``.

    Weights: ``w_k = w0_k / σ_k``, so ``Σ_k w_k r_k = Σ_k w0_k (r_k / σ_k)``; ``offset()`` returns ``Σ_k w_k μ̂_k``, so
    ``rewards @ w − offset() = Σ_k w0_k (r_k − μ̂_k)/σ_k`` (the fully normalized reward). The shift cancels in GRPO's
    group baseline and in RLOO's leave-one-out baseline, which is why the weights alone are enough.

    - A reward whose running std is below ``min_std`` (it has been constant so far) gets weight 0: it carries no
      signal, and ``1/σ`` would blow up the float32 reward sum. If every reward is below it, the initial weights.
    - ``fixed_sum=True`` rescales the weights so ``Σ|w_k| = Σ|w0_k|``: the *ratios* are PopArt's, the absolute scale is
      the configured one. GRPO (std-normalized advantages) only sees ratios; RLOO (no normalization by default, KL
      penalty folded into the reward) is sensitive to the absolute scale, so ``fixed_sum=True`` keeps the
      reward-vs-KL trade-off of the configured weights. Off by default (pure PopArt: rewards in σ units).

    Args:
        beta: EMA step size β, default ``3e-4``: the statistics step size attributed to multi-task PopArt
            (Hessel et al. 2019) and the default of public PopArt reimplementations (not re-checked against the
            paper's table here; van Hasselt et al. 2016 tune β per domain). Here it is applied once per generation
            batch, not per learner step, so with debiasing the statistics stay close to the cumulative mean over the
            first ~``1/β`` batches; raise it (e.g. ``0.01``) to track a drifting reward faster.
        min_std: ``1e-4`` (the lower clip of σ in public PopArt implementations); below it the weight is 0.
        max_std: ``1e6`` (upper clip of σ).
        fixed_sum: see above.
    """

    def __init__(self, weights=None, beta: float = 3e-4, min_std: float = 1e-4, max_std: float = 1e6,
                 fixed_sum: bool = False):
        super().__init__(weights)
        self.beta = number(beta, kwarg("beta"), low=0.0, low_open=True, high=1.0)
        self.min_std = number(min_std, kwarg("min_std"), low=0.0)
        self.max_std = number(max_std, kwarg("max_std"), low=0.0, low_open=True)
        if self.max_std <= self.min_std:
            raise ValueError(f"{kwarg('max_std')} ({max_std}) must be larger than {kwarg('min_std')} ({min_std}).")
        self.fixed_sum = flag(fixed_sum, kwarg("fixed_sum"))

    def _reset(self):
        k = len(self.reward_names)
        self._mu = torch.zeros(k, dtype=F64)
        self._nu = torch.zeros(k, dtype=F64)
        self._t = torch.zeros(k, dtype=F64)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Debiased running ``(mean, std)`` per reward (0 for a reward never observed)."""
        self._require_bound()
        corr = 1.0 - (1.0 - self.beta) ** self._t
        safe = torch.where(self._t > 0, corr, torch.ones_like(corr))
        mu = torch.where(self._t > 0, self._mu / safe, torch.zeros_like(self._mu))
        nu = torch.where(self._t > 0, self._nu / safe, torch.zeros_like(self._nu))
        std = (nu - mu * mu).clamp(min=0).sqrt().clamp(max=self.max_std)
        return mu, std

    def offset(self) -> float:
        """``Σ_k w_k μ̂_k`` for the last weights: subtract it from ``rewards @ w`` to get the fully normalized reward."""
        mu, _ = self.statistics()
        return float((self._last * mu).sum())

    def _single_is_initial(self) -> bool:
        return False  # keep the statistics up to date; the weight of a single reward is still w0/σ

    def _compute(self, rewards, step):
        count, mean, var = column_stats(rewards)
        seen = count > 0
        sq = var + mean * mean  # batch mean of r²
        b = self.beta
        self._mu = torch.where(seen, (1 - b) * self._mu + b * mean, self._mu)
        self._nu = torch.where(seen, (1 - b) * self._nu + b * sq, self._nu)
        self._t = self._t + seen.to(F64)
        _, std = self.statistics()
        w0 = self.initial_weights
        usable = std >= self.min_std
        if self.min_std == 0:
            usable = std > 0
        w = torch.where(usable, w0 / torch.where(usable, std, torch.ones_like(std)), torch.zeros_like(w0))
        if not (w != 0).any():
            return w0.clone()
        return keep_total(w0, w) if self.fixed_sum else w

    def metrics(self):
        out = super().metrics()
        mu, std = self.statistics()
        for n, m, s in zip(self.reward_names, mu.tolist(), std.tolist()):
            out[f"reward_mean/{n}"] = m
            out[f"reward_std/{n}"] = s
        return out

    def _state(self):
        return {"mu": floats(self._mu), "nu": floats(self._nu), "t": floats(self._t)}

    def _load(self, state):
        self._mu = torch.tensor(state["mu"], dtype=F64)
        self._nu = torch.tensor(state["nu"], dtype=F64)
        self._t = torch.tensor(state["t"], dtype=F64)
