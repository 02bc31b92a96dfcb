"""Domain-mixture controllers (METHODS §3)."""

from __future__ import annotations

import math

import torch

from ..registry import register_mixture
from .base import MixtureController


def normalize_domain_weights(weights, domain_names: list[str], field: str = "mixture_kwargs['weights']") -> torch.Tensor:
    """Turn user weights (a ``{domain: weight}`` dict or a list in domain order) into probabilities ``(k,)``.

    Domains missing from a dict get weight 0. Errors name the offending domain and what would fix it.
    """
    k = len(domain_names)
    if isinstance(weights, dict):
        unknown = sorted(set(map(str, weights)) - set(domain_names))
        if unknown:
            raise ValueError(
                f"{field} names unknown domain(s) {unknown}; the dataset's domains are {domain_names}. "
                "Fix the names or the dataset's domain column."
            )
        values = [float(weights.get(name, 0.0)) for name in domain_names]
    else:
        values = [float(w) for w in weights]
        if len(values) != k:
            raise ValueError(
                f"{field} has {len(values)} entries but the dataset has {k} domains {domain_names}; "
                "give one weight per domain or use a {domain: weight} dict."
            )
    for name, value in zip(domain_names, values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{field} gives domain {name!r} the weight {value}; weights must be finite and ≥ 0.")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"{field} gives every domain weight 0; at least one weight must be positive.")
    return torch.tensor(values, dtype=torch.float64) / total


@register_mixture("static")
class StaticMixture(MixtureController):
    """A fixed mixture ``α`` given as ``weights`` (normalized to probabilities).

    Args:
        weights: ``{domain: weight}`` or a list in sorted-domain order. ``None`` means the natural mixture
            (proportional to domain sizes), which in ``upweight`` mode changes nothing.
    """

    def __init__(self, weights=None):
        if isinstance(weights, dict):
            for name, value in weights.items():
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ValueError(
                        f"mixture_kwargs['weights'] gives domain {name!r} the weight {value!r}; weights must be "
                        "finite numbers ≥ 0."
                    )
        self.weights = weights
        self._probs: torch.Tensor | None = None

    def bind(self, domain_names, domain_sizes=None):
        super().bind(domain_names, domain_sizes)
        if self.weights is None:
            if domain_sizes is None:
                raise ValueError("mixture='static' without weights needs the domain sizes of a map-style dataset.")
            self._probs = domain_sizes.double() / domain_sizes.sum()
        else:
            self._probs = normalize_domain_weights(self.weights, self.domain_names)

    def probabilities(self) -> torch.Tensor:
        if self._probs is None:
            raise RuntimeError("StaticMixture.probabilities() called before bind().")
        return self._probs
