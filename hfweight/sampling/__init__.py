"""The ``resample`` application mode: draw each training example's domain from the mixture ``α``.

Two pieces, both seeded identically on every rank (never by rank; docs/methods.md#cross-rank):

- :class:`DomainSampler` — a ``Sampler[int]`` for map-style datasets. Every rank iterates the *same global sequence*
  of row indices and accelerate's ``BatchSamplerShard`` (or any batch-level sharding) hands each rank its batches, so
  shards are disjoint and complete by construction. ``α`` is read once per *global batch* (set ``batch_size`` to the
  samples of one optimizer step: per-device batch × gradient accumulation × data-parallel world size), so mixture
  updates land on step boundaries. State is small and exact: a resumed run yields the same rows in the same order.
- :class:`MixtureIterableDataset` — an ``IterableDataset`` for streaming: interleaves per-domain iterables by drawing a
  domain from ``α`` for every row; ``α`` lives in a shared-memory tensor so updates reach DataLoader workers.

Layout: :mod:`.draws` (counter-based seeds and uniforms, probability checks shared by both), :mod:`.domain_sampler`
(:class:`DomainSampler`) and :mod:`.streaming` (:class:`MixtureIterableDataset`).
"""

from .domain_sampler import DomainSampler
from .draws import derive_seed
from .streaming import MixtureIterableDataset

__all__ = ["DomainSampler", "MixtureIterableDataset", "derive_seed"]
