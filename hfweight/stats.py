"""Summary statistics of weights, computed from sums so they reduce across ranks with one all-reduce."""

from __future__ import annotations

import math

import torch


def weight_moments(v: torch.Tensor) -> torch.Tensor:
    """``[n, Σv, Σv², Σ v log v]`` of the weights ``v`` (float64), summable across micro-batches and ranks."""
    v = v.detach().to(torch.float64).flatten()
    vlogv = torch.where(v > 0, v * torch.log(v.clamp(min=1e-300)), torch.zeros_like(v))
    return torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64, device=v.device), v.sum(), (v * v).sum(), vlogv.sum()])


def weight_extremes(v: torch.Tensor) -> torch.Tensor:
    """``[max v, −min v]`` (so both reduce with MAX); ``−inf`` for an empty set."""
    v = v.detach().to(torch.float64).flatten()
    if v.numel() == 0:
        return torch.full((2,), -math.inf, dtype=torch.float64, device=v.device)
    return torch.stack([v.max(), -v.min()])


def summarize_weights(moments: torch.Tensor, extremes: torch.Tensor) -> dict[str, float]:
    """Effective sample size (Kish: ``(Σv)²/Σv²``), its fraction of n, min, max and the entropy of ``v/Σv`` in nats
    (``log S − Σ v log v / S``; ``log n`` when uniform)."""
    n, s, s2, slogs = (float(x) for x in moments)
    if n == 0:
        return {}
    out = {"min": -float(extremes[1]), "max": float(extremes[0])}
    if s > 0:
        ess = s * s / s2
        out.update(ess=ess, ess_fraction=ess / n, entropy=math.log(s) - slogs / s)
    else:
        out.update(ess=0.0, ess_fraction=0.0, entropy=0.0)
    return out
