"""The streaming half of the ``resample`` mode: :class:`MixtureIterableDataset` interleaves per-domain streams,
drawing each row's domain from the mixture ``α`` (see :mod:`hfweight.sampling`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .draws import F64, checked_probabilities, counter_uniform


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
        self._weights = torch.zeros(self.k, dtype=F64).share_memory_()
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
        self.set_probabilities(torch.full((self.k,), 1.0 / self.k, dtype=F64) if probabilities is None else probabilities)

    def set_probabilities(self, probabilities) -> None:
        """Overwrite the shared ``α`` in place (workers see it at their next draw)."""
        self._weights.copy_(checked_probabilities(probabilities, self.k, self.domain_names, "MixtureIterableDataset"))
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
                    self._alpha_log.append((draw, torch.tensor(source, dtype=F64)))
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
            u = counter_uniform(self.seed, worker, draw) * total
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
        self._replay = [(int(start), alpha.clone().to(F64)) for start, alpha in state.get("replay", [])]
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
