"""Resample mode over a stream: per-domain streams interleaved with the controller's ``α``.

``train_dataset`` may be an :class:`hfweight.sampling.MixtureIterableDataset` (one stream per domain: the efficient
form, e.g. one hub config or data file per domain) or a ``datasets.IterableDataset`` with the domain column, whose
domains must be listed in ``mixture_kwargs['domains']``; it is then split into one filtered stream per domain (each
filter reads the whole stream, so rare domains cost reading). New weights are written into the stream at every
optimizer-step boundary; DataLoader workers see them through shared memory. The stream's position is checkpointed at
the last consumed step and restored on resume, so Trainer does not skip batches on top of it; with
``dataloader_num_workers=0`` the resumed run yields the same rows in the same order as an uninterrupted one (see
``MixtureIterableDataset``).
"""

from __future__ import annotations

from ...sampling import MixtureIterableDataset
from ..data import data_seed, is_hf_stream, is_mixture_stream
from .base import Driver


class _StreamAtStep:
    """The streaming mixture's position at the last consumed optimizer step (the loader reads ahead of training)."""

    def __init__(self, stream, state, rows_per_step: int):
        self.stream, self.state, self.rows_per_step = stream, state, rows_per_step

    def state_dict(self) -> dict:
        return self.stream.state_dict(consumed_draws=self.state.global_step * self.rows_per_step)

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class StreamResampling(Driver):
    def __init__(self, trainer):
        super().__init__(trainer)
        t, args = trainer, trainer.args
        dataset = t.train_dataset
        column = args.domain_column
        if is_hf_stream(dataset):
            by_name = {str(v): v for v in (args.mixture_kwargs or {}).get("domains")}
            sources = {name: dataset.filter(lambda row, v=value: row[column] == v) for name, value in by_name.items()}
            dataset = MixtureIterableDataset(sources, seed=data_seed(args))
            t._domain_values = [by_name[n] for n in dataset.domain_names]
            t.train_dataset = dataset
        elif not is_mixture_stream(dataset):
            raise ValueError(
                "mixture_mode='resample' needs a map-style `datasets.Dataset`, an `hfweight.sampling."
                f"MixtureIterableDataset` or a `datasets.IterableDataset`; got {type(dataset).__name__}. Use "
                "mixture_mode='upweight' for other datasets."
            )
        if dataset.domain_column is None:
            dataset.domain_column = column  # rows carry their domain name: per-domain statistics need it
        if dataset.domain_column != column:
            raise ValueError(
                f"The MixtureIterableDataset labels rows with domain_column={dataset.domain_column!r} but the trainer "
                f"reads `domain_column={column!r}`; use the same name."
            )
        if list(dataset.domain_names) != t.domain_names:
            raise ValueError(f"The stream's domains {dataset.domain_names} differ from the mixture's {t.domain_names}.")
        if getattr(args, "packing", False):
            raise ValueError("mixture_mode='resample' over a stream cannot pack rows of several domains; drop packing.")
        # Every process that iterates the stream reads the whole global batch (accelerate dispatches it from rank 0
        # or shards it after reading), so one optimizer step consumes this many draws.
        self.rows_per_step = t._global_batch_size()
        dataset.track_steps(self.rows_per_step)
        dataset.set_probabilities(t.mixture.probabilities())
        self.stream = dataset
        t._mixture_stream = dataset

    def on_train_begin(self, state) -> None:
        self.stream.set_probabilities(self.trainer.mixture.probabilities())

    def on_step_end(self, state) -> None:
        self.stream.set_probabilities(self.trainer.mixture.probabilities())

    def state_parts(self) -> dict:
        return {"mixture_stream": _StreamAtStep(self.stream, self.trainer.state, self.rows_per_step)}
