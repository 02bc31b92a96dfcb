"""Counter-based randomness and probability checks shared by :class:`~hfweight.sampling.DomainSampler` and
:class:`~hfweight.sampling.MixtureIterableDataset`.

Seeds are derived by chaining splitmix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014; the mixing constants of Vigna's ``splitmix64.c`` and Java's ``SplittableRandom.mix64``), so every draw depends only on integers (seed, worker,
counter) and a sampler's "generator state" is a counter. Seeded identically on every rank, never by rank
(docs/methods.md#cross-rank).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

F64 = torch.float64
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained): independent streams from one user seed."""
    h = 0
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h & ((1 << 63) - 1)


def counter_uniform(*parts: int) -> float:
    """A uniform in [0, 1) that depends only on ``parts`` (counter-based: no generator state to carry)."""
    return (derive_seed(*parts) >> 10) / float(1 << 53)


def checked_probabilities(p: Any, k: int, names: Sequence[str] | None, who: str) -> torch.Tensor:
    """``p`` (a list/tensor in domain order, or a ``{name: weight}`` dict, missing names 0) as a float64 tensor that
    sums to 1; a clear error naming ``who`` when it has the wrong length, unknown names, or negative/non-finite/all-zero
    entries."""
    if isinstance(p, Mapping):
        if names is None:
            raise ValueError(f"{who}: got a dict of weights but the domain names are unknown; pass a list.")
        unknown = sorted(set(map(str, p)) - set(names))
        if unknown:
            raise ValueError(f"{who}: unknown domain(s) {unknown}; the domains are {list(names)}.")
        p = [float({str(n): v for n, v in p.items()}.get(n, 0.0)) for n in names]
    p = torch.as_tensor(p, dtype=F64).flatten().clone()
    if p.numel() != k:
        raise ValueError(f"{who}: {p.numel()} probabilities for {k} domains.")
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{who}: probabilities must be finite, ≥ 0 and not all 0, got {p.tolist()}.")
    return p / p.sum()
