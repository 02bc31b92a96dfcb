"""What the glue asks of the data: which kind of dataset it was given, which domains it has, and held-out sets split
by domain. Shared by the supervised and the RL glue."""

from __future__ import annotations

import logging

from ..columns import BATCH_PREFIX

logger = logging.getLogger(__name__)


def data_seed(args) -> int:
    """The seed of every data order hfweight draws (domain samplers, mixture streams, RL prompt draws): ``data_seed``
    when set, else ``seed`` — as Trainer seeds its own sampler."""
    return args.data_seed if args.data_seed is not None else args.seed


def is_map_dataset(dataset) -> bool:
    """A map-style ``datasets.Dataset`` (random access, column reads)."""
    try:
        import datasets

        return isinstance(dataset, datasets.Dataset)
    except ImportError:  # pragma: no cover
        return False


def is_hf_stream(dataset) -> bool:
    """A ``datasets.IterableDataset``."""
    try:
        import datasets

        return isinstance(dataset, datasets.IterableDataset)
    except ImportError:  # pragma: no cover
        return False


def is_mixture_stream(dataset) -> bool:
    """hfweight's own one-stream-per-domain :class:`~hfweight.sampling.MixtureIterableDataset`."""
    from ..sampling import MixtureIterableDataset

    return isinstance(dataset, MixtureIterableDataset)


def check_labels(batch: dict) -> None:
    """Every weighted loss is a weighted next-token cross-entropy over ``labels``: say so when a batch has none (the
    parent Trainer would explain that the model returned no loss; a bare ``KeyError`` deep in the loss would not)."""
    if "labels" not in batch:
        keys = sorted(k for k in batch if not k.startswith(BATCH_PREFIX))
        raise ValueError(
            f"The weighted loss needs `labels` (next-token targets, -100 where ignored) in every batch; this batch has "
            f"only {keys}. Use a data collator that adds them, e.g. transformers.DataCollatorForLanguageModeling("
            "tokenizer, mlm=False) (labels = input_ids with padding ignored), or add a `labels` column."
        )


def check_declared_domains(args, found: list, source: str) -> None:
    """``mixture_kwargs['domains']`` is read only when the data cannot tell its domains (a ``datasets.IterableDataset``
    or no domain column). Where the domains come from ``source`` instead, a different list is an error (the user's
    list would be silently replaced) and the same list a warning (it has no effect)."""
    declared = (args.mixture_kwargs or {}).get("domains") if args.mixture is not None else None
    if not declared:
        return
    if sorted(map(str, declared)) != sorted(map(str, found)):
        raise ValueError(
            f"mixture_kwargs['domains']={list(declared)} differs from the domains {sorted(map(str, found))} read from "
            f"{source}, which is where this run takes its domains from (the declared list is only read for a "
            "`datasets.IterableDataset` or a dataset without a domain column). Fix the list or drop it."
        )
    logger.warning(
        "hfweight: mixture_kwargs['domains'] has no effect: the domains are read from %s (it is only read for a "
        "`datasets.IterableDataset` or a dataset without a domain column).", source,
    )


def evaluated_domains(eval_dataset, column: str, names: dict | None = None) -> list[str]:
    """The domain names an ``eval_dataset`` measures separately: a dict's keys, or the values of a map-style
    dataset's ``column`` named by ``names`` (value → name); ``[]`` for anything else (None, a stream, no column)."""
    if isinstance(eval_dataset, dict):
        return [str(k) for k in eval_dataset]
    if not (is_map_dataset(eval_dataset) and column in eval_dataset.column_names):
        return []
    names = names or {}
    return sorted({names.get(v, str(v)) for v in eval_dataset.unique(column)})


def split_by_domain(eval_dataset, column: str, names: dict | None = None) -> dict:
    """``{name: held-out dataset}``: the entries of a dict ``eval_dataset`` (keys as strings), or the rows of a
    map-style dataset grouped by their ``column`` value, named by ``names`` (value → name; the value as a string
    where ``names`` has none), in sorted order. Anything else (None, a stream, no such column) gives ``{}``."""
    if isinstance(eval_dataset, dict):
        return {str(k): v for k, v in eval_dataset.items()}
    if not (is_map_dataset(eval_dataset) and column in eval_dataset.column_names):
        return {}
    names = names or {}
    rows_of: dict = {}
    for row, value in enumerate(eval_dataset[column]):
        rows_of.setdefault(value, []).append(row)
    return {names.get(v, str(v)): eval_dataset.select(rows_of[v]) for v in sorted(rows_of, key=str)}
