"""The map-style half of the ``resample`` mode: :class:`DomainSampler`, a ``Sampler[int]`` drawing each row's domain
from the mixture ``α`` (see :mod:`hfweight.sampling`)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from ..strategies.base import Stateful
from .draws import F64, checked_probabilities, derive_seed


class DomainSampler(Sampler[int], Stateful):
    """Domain-mixture sampler over a map-style dataset.

    Each draw picks a domain from ``α`` and then the next row of that domain. Rows of a domain are visited in a random
    permutation without replacement; a domain that runs out of rows starts a new pass with a fresh permutation
    (so a small, upweighted domain is repeated — epoch by epoch of that domain — rather than exhausted). Every rank
    must build the sampler with the same ``seed``.

    Randomness is counter-based so that the state is a few integers: the domains of global batch ``b`` come from
    ``torch.multinomial(α_b, batch_size, generator=Generator(seed ⊕ b))`` and the permutation of pass ``p`` of domain
    ``d`` from ``torch.randperm(n_d, generator=Generator(seed ⊕ d ⊕ p))`` (``⊕``: :func:`derive_seed`). The sampler's
    "generator state" is therefore the batch counter, and a permutation is stored as its (domain, pass).

    When ``α`` is read. At the start of each global batch of ``batch_size`` indices the sampler reads ``α`` from its
    source (a callable such as ``lambda: mixture.probabilities()``, a controller, or the fixed tensor last given to
    :meth:`set_probabilities`), so a change applies from the next global batch. Caveat: DataLoaders read ahead —
    accelerate's ``DataLoaderShard`` fetches one batch ahead and workers prefetch ``num_workers × prefetch_factor``
    batches — so the batch of step ``s + 1`` may already be drawn when the update of step ``s`` happens: updates then
    take effect one (or a few) steps later. All ranks read ahead identically, so their draws still agree. The ``α``
    used for each batch is recorded (:attr:`last_probabilities`, and in the state for exact replay).

    Resume. :meth:`state_dict` captures the position exactly; the glue restores it with :meth:`load_state_dict`
    *instead of* Trainer's ``skip_first_batches`` (it must not also skip, e.g. set ``ignore_data_skip`` for the
    resumed epoch). Because of read-ahead, the sampler's live position is past what training consumed: the glue passes
    ``batches_consumed`` (optimizer steps of this sampler's stream, e.g. ``state.global_step`` for a run that started
    with it) and the state is taken at that batch boundary from a small ring of snapshots; the batches that were
    already drawn after it are replayed after resume with the ``α`` they were drawn with, so the resumed run yields
    the same rows in the same order as the uninterrupted one. The resumed ``__iter__`` yields the rest of the
    interrupted epoch, the following ones full epochs.

    Args:
        domain_rows: For each domain (in the mixture's order), the dataset row indices of that domain (non-empty).
        probabilities: ``α`` source: a callable returning ``(k,)``, an object with ``.probabilities()``, or a fixed
            tensor/list/dict.
        seed: Identical on every rank.
        batch_size: Indices per global batch (= samples per optimizer step); ``α`` is read once per global batch.
        num_samples: Indices per epoch (``__len__``); default the dataset length (sum of the domain sizes). A multiple
            of ``batch_size`` keeps epochs aligned with steps.
        domain_names: Optional names (for dict probabilities and messages).
        snapshots: Global batches whose start state is kept for ``state_dict(batches_consumed=...)`` (default 16;
            must exceed the loader's read-ahead in steps).
    """

    def __init__(
        self,
        domain_rows: Sequence[Sequence[int]],
        probabilities: Callable[[], Any] | Any,
        *,
        seed: int = 0,
        batch_size: int = 1,
        num_samples: int | None = None,
        domain_names: Sequence[str] | None = None,
        snapshots: int = 16,
    ):
        self.rows = [torch.as_tensor(list(r), dtype=torch.long) for r in domain_rows]
        self.k = len(self.rows)
        self.domain_names = None if domain_names is None else [str(n) for n in domain_names]
        if self.k == 0:
            raise ValueError("DomainSampler needs at least one domain.")
        empty = [self._name(d) for d, r in enumerate(self.rows) if r.numel() == 0]
        if empty:
            raise ValueError(f"DomainSampler: domain(s) {empty} have no rows.")
        if self.domain_names is not None and len(self.domain_names) != self.k:
            raise ValueError(f"DomainSampler: {len(self.domain_names)} names for {self.k} domains.")
        if int(batch_size) < 1 or int(snapshots) < 1:
            raise ValueError("DomainSampler: batch_size and snapshots must be ≥ 1.")
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.num_samples = int(num_samples) if num_samples is not None else sum(r.numel() for r in self.rows)
        if self.num_samples < 1:
            raise ValueError("DomainSampler: num_samples must be ≥ 1.")
        self.snapshots = int(snapshots)
        self._source = probabilities
        if not callable(probabilities) and not hasattr(probabilities, "probabilities"):
            self._source = checked_probabilities(probabilities, self.k, self.domain_names, "DomainSampler")
        self.epoch = 0
        # position
        self._pos = [0] * self.k  # next index into the current permutation of each domain
        self._passes = [0] * self.k  # completed passes of each domain
        self._perm_cache: dict[int, tuple[int, torch.Tensor]] = {}
        self._next_batch = 0  # index of the next global batch to draw
        self._stream_pos = 0  # indices yielded over the sampler's life
        self._epoch_start = 0  # stream position where the current epoch began
        self._resume_remaining: int | None = None
        self._buffer: list[int] = []
        self._buffer_pos = 0
        self._ring: OrderedDict[int, dict] = OrderedDict()
        self._queued: deque[torch.Tensor] = deque()
        self.last_probabilities: torch.Tensor | None = None

    @classmethod
    def from_column(cls, values: Sequence, probabilities, *, domain_order: Sequence | None = None, **kwargs) -> DomainSampler:
        """Build from a dataset's domain column (one value per row). Domains are ``domain_order`` or the sorted
        distinct values (the glue's order); names are ``str(value)``."""
        values = list(values)
        order = list(domain_order) if domain_order is not None else sorted(set(values), key=lambda v: (str(type(v)), v))
        index = {v: i for i, v in enumerate(order)}
        rows: list[list[int]] = [[] for _ in order]
        for i, v in enumerate(values):
            if v not in index:
                raise ValueError(f"DomainSampler.from_column: row {i} has domain {v!r}, not in {order}.")
            rows[index[v]].append(i)
        kwargs.setdefault("domain_names", [str(v) for v in order])
        return cls(rows, probabilities, **kwargs)

    def _name(self, d: int) -> str:
        return self.domain_names[d] if self.domain_names else str(d)

    # probabilities ---------------------------------------------------------------------------------------------------
    def set_probabilities(self, probabilities) -> None:
        """Use this fixed mixture from the next global batch on (the current batch keeps the one it was drawn with)."""
        self._source = checked_probabilities(probabilities, self.k, self.domain_names, "DomainSampler.set_probabilities")

    def _read_source(self) -> torch.Tensor:
        src = self._source
        if isinstance(src, torch.Tensor):
            return src
        value = src.probabilities() if hasattr(src, "probabilities") else src()
        return checked_probabilities(value, self.k, self.domain_names, "DomainSampler (probability source)")

    # drawing ---------------------------------------------------------------------------------------------------------
    def _perm(self, d: int) -> torch.Tensor:
        cached = self._perm_cache.get(d)
        if cached is None or cached[0] != self._passes[d]:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 1, d, self._passes[d]))
            cached = (self._passes[d], torch.randperm(self.rows[d].numel(), generator=g))
            self._perm_cache[d] = cached
        return cached[1]

    def _next_row(self, d: int) -> int:
        if self._pos[d] >= self.rows[d].numel():  # this domain ran out of rows: start a new pass
            self._passes[d] += 1
            self._pos[d] = 0
        row = int(self.rows[d][self._perm(d)[self._pos[d]]])
        self._pos[d] += 1
        return row

    def _position(self) -> dict:
        return {"pos": list(self._pos), "passes": list(self._passes), "next_batch": self._next_batch,
                "stream_pos": self._stream_pos, "epoch_start": self._epoch_start}

    def _draw_batch(self) -> None:
        b = self._next_batch
        snapshot = self._position()
        alpha = self._queued.popleft() if self._queued else self._read_source()
        snapshot["alpha"] = alpha
        self._ring[b] = snapshot
        while len(self._ring) > self.snapshots:
            self._ring.popitem(last=False)
        g = torch.Generator().manual_seed(derive_seed(self.seed, 0, b))
        domains = torch.multinomial(alpha, self.batch_size, replacement=True, generator=g).tolist()
        self._buffer = [self._next_row(d) for d in domains]
        self._buffer_pos = 0
        self._next_batch = b + 1
        self.last_probabilities = alpha

    def _next_index(self) -> int:
        if self._buffer_pos >= len(self._buffer):
            self._draw_batch()
        index = self._buffer[self._buffer_pos]
        self._buffer_pos += 1
        self._stream_pos += 1
        return index

    def __iter__(self) -> Iterator[int]:
        if self._resume_remaining is not None:
            remaining, self._resume_remaining = self._resume_remaining, None
        else:
            self._epoch_start = self._stream_pos
            remaining = self.num_samples
        for _ in range(remaining):
            yield self._next_index()

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Accepted for compatibility (accelerate calls it); the stream continues across epochs regardless."""
        self.epoch = int(epoch)

    # state -----------------------------------------------------------------------------------------------------------
    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """The sampler's position: exact, small (a few integers per domain plus the recorded ``α`` of batches to
        replay).

        Args:
            batches_consumed: Global batches training has consumed. ``None``: everything yielded so far counts as
                consumed (no read-ahead). Otherwise the state is taken at the start of that batch, which must be one
                of the last ``snapshots`` batches drawn (or the next one).
        """
        drawn = self._next_batch  # batches drawn so far (0 … drawn−1)
        partial = 0 < self._buffer_pos < len(self._buffer)
        if batches_consumed is None:
            if partial:
                base, offset, start = self._ring[drawn - 1], self._buffer_pos, drawn - 1
            else:
                base, offset, start = self._position(), 0, drawn
        else:
            n = int(batches_consumed)
            if n == drawn and not partial:
                base, offset, start = self._position(), 0, drawn
            elif n in self._ring:
                base, offset, start = self._ring[n], 0, n
            else:
                raise ValueError(
                    f"DomainSampler.state_dict(batches_consumed={n}): batch {n} is not among the retained snapshots "
                    f"{list(self._ring)} (drawn: {drawn}); raise `snapshots` above the loader's read-ahead."
                )
        replay = [self._ring[b]["alpha"].clone() for b in range(start, drawn)] + [a.clone() for a in self._queued]
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "sizes": [r.numel() for r in self.rows],
            "pos": list(base["pos"]),
            "passes": list(base["passes"]),
            "next_batch": base["next_batch"],
            "stream_pos": base["stream_pos"],
            "epoch_start": base["epoch_start"],
            "offset": offset,
            "replay_probabilities": replay,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("batch_size", self.batch_size), ("sizes", [r.numel() for r in self.rows])):
            if state[key] != mine:
                raise ValueError(f"DomainSampler.load_state_dict: saved {key}={state[key]!r} but this sampler has {mine!r}.")
        self.num_samples = int(state["num_samples"])
        self._pos, self._passes = list(state["pos"]), list(state["passes"])
        self._perm_cache.clear()
        self._next_batch = int(state["next_batch"])
        self._stream_pos, self._epoch_start = int(state["stream_pos"]), int(state["epoch_start"])
        self._buffer, self._buffer_pos = [], 0
        self._ring.clear()
        self._queued = deque(a.clone().to(F64) for a in state["replay_probabilities"])
        self.epoch = int(state.get("epoch", 0))
        offset = int(state["offset"])
        if offset:
            self._draw_batch()
            self._buffer_pos = offset
            self._stream_pos += offset
        done = self._stream_pos - self._epoch_start
        self._resume_remaining = self.num_samples - done if 0 < done < self.num_samples else None


# ---- streaming ----------------------------------------------------------------------------------------------------
