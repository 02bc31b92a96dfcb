"""The ``resample`` application mode: draw each training example's domain from the mixture ``α``.

Two pieces, both seeded identically on every rank (never by rank; docs/methods.md#cross-rank):

- :class:`DomainSampler` — a ``Sampler[int]`` for map-style datasets. Every rank iterates the *same global sequence*
  of row indices and accelerate's ``BatchSamplerShard`` (or any batch-level sharding) hands each rank its batches, so
  shards are disjoint and complete by construction. ``α`` is read once per *global batch* (set ``batch_size`` to the
  samples of one optimizer step: per-device batch × gradient accumulation × data-parallel world size), so mixture
  updates land on step boundaries. State is small and exact: a resumed run yields the same rows in the same order.
- :class:`MixtureIterableDataset` — an ``IterableDataset`` for streaming: interleaves per-domain iterables by drawing a
  domain from ``α`` for every row; ``α`` lives in a shared-memory tensor so updates reach DataLoader workers.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler, get_worker_info

from .strategies.base import Stateful

_F64 = torch.float64
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


def _uniform(*parts: int) -> float:
    """A uniform in [0, 1) that depends only on ``parts`` (counter-based: no generator state to carry)."""
    return (derive_seed(*parts) >> 10) / float(1 << 53)


def _check_probabilities(p: Any, k: int, names: Sequence[str] | None, who: str) -> torch.Tensor:
    if isinstance(p, Mapping):
        if names is None:
            raise ValueError(f"{who}: got a dict of weights but the domain names are unknown; pass a list.")
        unknown = sorted(set(map(str, p)) - set(names))
        if unknown:
            raise ValueError(f"{who}: unknown domain(s) {unknown}; the domains are {list(names)}.")
        p = [float({str(n): v for n, v in p.items()}.get(n, 0.0)) for n in names]
    p = torch.as_tensor(p, dtype=_F64).flatten().clone()
    if p.numel() != k:
        raise ValueError(f"{who}: {p.numel()} probabilities for {k} domains.")
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"{who}: probabilities must be finite, ≥ 0 and not all 0, got {p.tolist()}.")
    return p / p.sum()


# ---- map-style ----------------------------------------------------------------------------------------------------


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
            self._source = _check_probabilities(probabilities, self.k, self.domain_names, "DomainSampler")
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
        self._source = _check_probabilities(probabilities, self.k, self.domain_names, "DomainSampler.set_probabilities")

    def set_probability_source(self, source: Callable[[], Any]) -> None:
        """Read ``α`` from ``source()`` at the start of every following global batch."""
        self._source = source

    def _read_source(self) -> torch.Tensor:
        src = self._source
        if isinstance(src, torch.Tensor):
            return src
        value = src.probabilities() if hasattr(src, "probabilities") else src()
        return _check_probabilities(value, self.k, self.domain_names, "DomainSampler (probability source)")

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
        self._queued = deque(a.clone().to(_F64) for a in state["replay_probabilities"])
        self.epoch = int(state.get("epoch", 0))
        offset = int(state["offset"])
        if offset:
            self._draw_batch()
            self._buffer_pos = offset
            self._stream_pos += offset
        done = self._stream_pos - self._epoch_start
        self._resume_remaining = self.num_samples - done if 0 < done < self.num_samples else None


# ---- streaming ----------------------------------------------------------------------------------------------------


def _is_hf_iterable(source: Any) -> bool:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        return False
    return isinstance(source, datasets.IterableDataset)


class MixtureIterableDataset(IterableDataset):
    """Interleave per-domain streams, drawing each row's domain from ``α``.

    Domains are the sorted names of ``sources`` (the glue's order). For every row the dataset draws
    ``u = U(seed, worker, draw)`` — a counter-based uniform, so the "generator state" is one integer per worker — and
    picks the domain by inverse CDF on the current ``α``, then the next row of that domain's stream.

    Weights reach DataLoader workers through shared memory: ``α`` is a ``torch.zeros(k).share_memory_()`` tensor that
    :meth:`set_probabilities` (called in the main process) overwrites in place; workers read it at every draw. Caveat:
    workers run ahead of training by their prefetch, so a new ``α`` shows up after the batches already produced.

    Workers. Each worker draws its own domain sequence (seeded by ``seed`` and its worker id, identical across ranks).
    A Hugging Face ``datasets.IterableDataset`` source already splits its shards among workers; any other source is
    split by row index modulo the number of workers (``worker_split="auto"``). Sources may be re-iterable objects or
    zero-argument callables returning a fresh iterator; a source with ``set_epoch`` gets the pass number.

    Exhausted streams (``on_exhausted``): ``"restart"`` (default) starts a new pass of that domain; ``"stop"`` ends the
    iteration at the first exhausted domain; ``"drop"`` removes the domain and renormalizes ``α`` over the others until
    all are exhausted.

    Resume (:meth:`state_dict` / :meth:`load_state_dict`): per worker, the draw counter and per domain the pass number
    and the rows consumed in the current pass, kept in shared memory; a resumed iterator reopens each stream at its
    pass and skips the consumed rows. Resume with the same number of workers.

    Exact resume under a reading-ahead loader (the trainer's case). Loaders draw rows before training consumes them
    (accelerate fetches one batch ahead; the Trainer prefetches a step's micro-batches), and those rows were drawn with
    the ``α`` of their time. With :meth:`track_steps` (the glue calls it with the rows of one optimizer step) the
    dataset keeps, in the process that iterates it with ``num_workers=0``, the position at the start of each of the
    last ``snapshots`` steps and a log of the ``α`` used from each draw on; ``state_dict(consumed_draws=n)`` then saves
    the position at draw ``n`` (what training consumed) plus the ``α`` of the draws already made after it, and a
    resumed iterator replays those draws with their recorded ``α`` before following :meth:`set_probabilities` again:
    the same rows in the same order as the uninterrupted run. With DataLoader workers the state is the workers' live
    position (rows prefetched but not trained on are skipped).

    Args:
        sources: ``{domain: iterable}``.
        probabilities: Initial ``α`` (list/tensor in sorted-domain order, or dict); default uniform.
        seed: Identical on every rank.
        on_exhausted: ``"restart"``, ``"stop"`` or ``"drop"``.
        domain_column: If set, each (dict) row gets ``{domain_column: name}`` added.
        num_samples: Rows per ``__iter__`` over all workers (``None``: until the streams stop).
        worker_split: ``"auto"``, ``"modulo"`` or ``"none"``.
        max_workers: Capacity of the shared progress table (default 64).
    """

    def __init__(
        self,
        sources: Mapping[str, Iterable | Callable[[], Iterable]],
        probabilities=None,
        *,
        seed: int = 0,
        on_exhausted: str = "restart",
        domain_column: str | None = None,
        num_samples: int | None = None,
        worker_split: str = "auto",
        max_workers: int = 64,
    ):
        if not sources:
            raise ValueError("MixtureIterableDataset needs at least one domain source.")
        if on_exhausted not in ("restart", "stop", "drop"):
            raise ValueError(f"on_exhausted must be 'restart', 'stop' or 'drop', got {on_exhausted!r}.")
        if worker_split not in ("auto", "modulo", "none"):
            raise ValueError(f"worker_split must be 'auto', 'modulo' or 'none', got {worker_split!r}.")
        self.domain_names = sorted(map(str, sources))
        by_name = {str(n): s for n, s in sources.items()}
        self.sources = [by_name[n] for n in self.domain_names]
        self.k = len(self.sources)
        self.seed = int(seed)
        self.on_exhausted = on_exhausted
        self.domain_column = domain_column
        self.num_samples = None if num_samples is None else int(num_samples)
        self.worker_split = worker_split
        self.max_workers = int(max_workers)
        self._weights = torch.zeros(self.k, dtype=_F64).share_memory_()
        self._version = torch.zeros(1, dtype=torch.long).share_memory_()  # bumped by every set_probabilities
        # step-boundary tracking (main process, num_workers=0): see track_steps()
        self.rows_per_step: int | None = None
        self.snapshots = 16
        self._ring: OrderedDict[int, torch.Tensor] = OrderedDict()  # draw index → progress row at that draw
        self._alpha_log: list[tuple[int, torch.Tensor]] = []  # (first draw, α used from it on)
        self._replay: list[tuple[int, torch.Tensor]] = []  # restored α log for already-made draws
        self._replay_end = 0
        self._iterated = False
        # per worker: [draws, pos_0..pos_{k-1}, passes_0..passes_{k-1}, dead_0..dead_{k-1}]
        self._progress = torch.zeros(self.max_workers, 1 + 3 * self.k, dtype=torch.long).share_memory_()
        self.set_probabilities(torch.full((self.k,), 1.0 / self.k, dtype=_F64) if probabilities is None else probabilities)

    def set_probabilities(self, probabilities) -> None:
        """Overwrite the shared ``α`` in place (workers see it at their next draw)."""
        self._weights.copy_(_check_probabilities(probabilities, self.k, self.domain_names, "MixtureIterableDataset"))
        self._version += 1

    def track_steps(self, rows_per_step: int, snapshots: int = 16) -> None:
        """Keep the position at every ``rows_per_step``-th draw (the last ``snapshots`` of them) and a log of the ``α``
        used by each draw, so :meth:`state_dict` can save the position at a step boundary behind the read-ahead."""
        if int(rows_per_step) < 1 or int(snapshots) < 1:
            raise ValueError("MixtureIterableDataset.track_steps: rows_per_step and snapshots must be ≥ 1.")
        self.rows_per_step, self.snapshots = int(rows_per_step), int(snapshots)

    def _replayed_alpha(self, draw: int):
        """The recorded ``α`` of an already-made draw (after a resume), or None past the replayed range."""
        if draw >= self._replay_end or not self._replay:
            return None
        chosen = None
        for start, alpha in self._replay:
            if start > draw:
                break
            chosen = alpha
        return chosen

    def probabilities(self) -> torch.Tensor:
        return self._weights.clone()

    def _open(self, d: int, passes: int, skip: int, worker: int, workers: int) -> Iterator:
        source = self.sources[d]
        if hasattr(source, "set_epoch"):
            source.set_epoch(passes)
        iterable = source() if callable(source) and not hasattr(source, "__iter__") else source
        split = self.worker_split
        if split == "auto":
            split = "none" if _is_hf_iterable(source) else "modulo"
        raw = iter(iterable)
        for _ in range(skip):  # rows of this pass already consumed (raw count)
            next(raw, None)
        return _RawCounter(raw, skip, worker if split == "modulo" else 0, workers if split == "modulo" else 1)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if worker >= self.max_workers:
            raise RuntimeError(f"MixtureIterableDataset: worker {worker} ≥ max_workers={self.max_workers}.")
        k = self.k
        # NumPy views of the shared-memory tensors: the main process's writes to α are seen at every draw, and the
        # progress written here is seen by state_dict() (cheap element access on the per-row path).
        progress = self._progress[worker].numpy()
        weights = self._weights.numpy()
        version = self._version.numpy()
        pos, passes, dead = 1, 1 + k, 1 + 2 * k
        tracking = self.rows_per_step is not None and info is None
        self._iterated = self._iterated or info is None
        logged = None  # identity of the α last written to the log: ("replay", start) or ("live", version)
        if self.on_exhausted == "stop" and progress[dead:].any():
            return
        iterators: list[_RawCounter | None] = [None] * k
        quota = None
        if self.num_samples is not None:
            quota = self.num_samples // workers + (1 if worker < self.num_samples % workers else 0)
        produced = 0
        while quota is None or produced < quota:
            draw = int(progress[0])
            source, identity = weights, None
            if tracking:
                if draw % self.rows_per_step == 0:
                    self._ring[draw] = self._progress[worker].clone()
                    while len(self._ring) > self.snapshots:
                        self._ring.popitem(last=False)
                replayed = self._replayed_alpha(draw)
                if replayed is not None:
                    source, identity = replayed.numpy(), ("replay", id(replayed))
                else:
                    identity = ("live", int(version[0]))
                if identity != logged:
                    self._alpha_log.append((draw, torch.tensor(source, dtype=_F64)))
                    logged = identity
                    if len(self._alpha_log) > 4 * self.snapshots + 4:
                        oldest = next(iter(self._ring), draw)
                        keep = [i for i, (start, _) in enumerate(self._alpha_log) if start <= oldest]
                        del self._alpha_log[: keep[-1] if keep else 0]
            alpha = [0.0 if progress[dead + d] else float(source[d]) for d in range(k)]
            total = sum(alpha)
            if total <= 0:
                return
            progress[0] = draw + 1
            u = _uniform(self.seed, worker, draw) * total
            d, acc = k - 1, 0.0
            for j, a in enumerate(alpha):  # inverse CDF
                acc += a
                if u < acc and a > 0:
                    d = j
                    break
            while alpha[d] <= 0:  # rounding at the top of the CDF
                d -= 1
            row = self._next(d, iterators, progress, worker, workers)
            if row is _END:
                empty = iterators[d].start == 0 and iterators[d].yielded == 0
                if self.on_exhausted in ("stop", "drop"):
                    progress[dead + d] = 1
                    if self.on_exhausted == "stop":
                        return
                    continue
                if empty:
                    raise RuntimeError(
                        f"MixtureIterableDataset: the stream of domain {self.domain_names[d]!r} yields no rows for "
                        f"worker {worker} of {workers}."
                    )
                progress[passes + d] += 1  # restart: a new pass of this domain
                progress[pos + d] = 0
                iterators[d] = None
                row = self._next(d, iterators, progress, worker, workers)
                if row is _END:
                    raise RuntimeError(
                        f"MixtureIterableDataset: the stream of domain {self.domain_names[d]!r} yields no rows for "
                        f"worker {worker} of {workers}."
                    )
            produced += 1
            if self.domain_column is not None and isinstance(row, Mapping):
                row = {**row, self.domain_column: self.domain_names[d]}
            yield row

    def _next(self, d: int, iterators: list, progress, worker: int, workers: int):
        k = self.k
        if iterators[d] is None:
            iterators[d] = self._open(d, int(progress[1 + k + d]), int(progress[1 + d]), worker, workers)
        it = iterators[d]
        row = it.next_mine()
        progress[1 + d] = it.consumed
        return row

    def state_dict(self, consumed_draws: int | None = None) -> dict:
        """The stream position.

        Args:
            consumed_draws: Draws (rows over all domains) training has consumed, counted over the stream's life; with
                :meth:`track_steps` on and a multiple of ``rows_per_step``, the state is taken at that draw and the
                draws already made after it are recorded for replay. ``None`` (or a process that never iterated the
                dataset, e.g. a non-zero rank whose batches are dispatched from rank 0): the live position.
        """
        progress = self._progress.clone()
        replay: list[tuple[int, torch.Tensor]] = []
        replay_end = 0
        if consumed_draws is not None and self.rows_per_step is not None and self._iterated:
            n, drawn = int(consumed_draws), int(self._progress[0, 0])
            if n != drawn:
                if n not in self._ring:
                    raise ValueError(
                        f"MixtureIterableDataset.state_dict(consumed_draws={n}): draw {n} is not among the retained "
                        f"step snapshots {list(self._ring)} (drawn: {drawn}); raise `snapshots` above the read-ahead."
                    )
                progress[0] = self._ring[n]
                log = self._alpha_log + [(drawn, None)]
                for (start, alpha), (end, _) in zip(log, log[1:]):
                    if end > n and start < drawn:
                        replay.append((max(start, n), alpha.clone()))
                replay_end = drawn
        return {"seed": self.seed, "domain_names": list(self.domain_names), "progress": progress,
                "probabilities": self._weights.clone(), "replay": replay, "replay_end": replay_end}

    def load_state_dict(self, state: dict) -> None:
        if state["domain_names"] != self.domain_names or state["seed"] != self.seed:
            raise ValueError(
                f"MixtureIterableDataset.load_state_dict: saved domains {state['domain_names']} / seed {state['seed']} "
                f"but this dataset has {self.domain_names} / {self.seed}."
            )
        saved = state["progress"]
        if saved.shape[1] != self._progress.shape[1]:
            raise ValueError("MixtureIterableDataset.load_state_dict: the saved progress table has the wrong shape.")
        self._progress.zero_()
        rows = min(saved.shape[0], self._progress.shape[0])
        self._progress[:rows].copy_(saved[:rows])
        self._weights.copy_(state["probabilities"])
        self._version += 1
        self._replay = [(int(start), alpha.clone().to(_F64)) for start, alpha in state.get("replay", [])]
        self._replay_end = int(state.get("replay_end", 0))
        self._ring.clear()
        self._alpha_log = []


_END = object()


class _RawCounter:
    """Iterates a stream, counting raw rows consumed, yielding only rows ``i`` with ``i % workers == worker``."""

    def __init__(self, it: Iterator, consumed: int, worker: int, workers: int):
        self.it, self.consumed, self.worker, self.workers = it, consumed, worker, workers
        self.start = consumed
        self.yielded = 0

    def next_mine(self):
        while True:
            try:
                row = next(self.it)
            except StopIteration:
                return _END
            index = self.consumed
            self.consumed += 1
            if index % self.workers == self.worker:
                self.yielded += 1
                return row


__all__ = ["DomainSampler", "MixtureIterableDataset", "derive_seed"]
