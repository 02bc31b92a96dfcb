"""One proxy run: a fresh model trained with :class:`~hfweight.WeightedTrainer` on a static mixture (``mixture="static"``,
``mixture_mode="resample"``), then evaluated on every named held-out set. Also the data checks the search needs before
anything runs: the domains, their token counts, the named eval sets and the target names."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SINGLE_EVAL_NAME = "eval"  # the name of an eval_dataset given as one dataset rather than a dict


def domain_token_counts(train_dataset, domain_column: str, domains: Sequence[str] | None = None) -> dict[str, float]:
    """``{domain: tokens}`` of the training set (``len(input_ids)`` per row; rows when there is no ``input_ids``
    column), in sorted-domain order. Errors name the column, or the listed domains that have no rows."""
    columns = getattr(train_dataset, "column_names", None) or []
    if domain_column not in columns:
        raise ValueError(f"train_dataset has no domain column {domain_column!r} (args.domain_column); its columns "
                         f"are {columns}. The search mixes domains: give every row a domain.")
    labels = [str(d) for d in train_dataset[domain_column]]
    if "input_ids" in columns:
        counts: Counter = Counter()
        for label, ids in zip(labels, train_dataset["input_ids"]):
            counts[label] += len(ids)
    else:
        counts = Counter(labels)
    names = sorted(counts) if domains is None else sorted(map(str, domains))
    empty = [d for d in names if counts.get(d, 0) <= 0]
    if empty:
        raise ValueError(f"Domain(s) {empty} have no rows (or no tokens) in train_dataset's {domain_column!r} column; "
                         "a mixture cannot give them a share. Drop them from `domains` or add their data.")
    unlisted = sorted(set(counts) - set(names))
    if unlisted:
        raise ValueError(f"train_dataset has rows of domain(s) {unlisted} not in `domains` {names}; list every domain "
                         "of the training set or filter the dataset.")
    if len(names) < 2:
        raise ValueError(f"train_dataset has {len(names)} domain(s) {names}; a mixture search needs at least 2.")
    return {d: float(counts[d]) for d in names}


def named_eval_sets(eval_dataset, domain_column: str, target: str | Sequence[str] | None) -> tuple[dict, list[str]]:
    """``({name: dataset}, target names)``. ``eval_dataset`` is a dataset (named ``"eval"``) or a dict of named
    datasets (as ``Trainer`` accepts). A target that is not a name but a domain of the eval data's domain column gets
    its own set: the rows of that domain (from every eval set). ``target=None`` means every name."""
    if eval_dataset is None:
        raise ValueError("eval_dataset is required: the search minimizes held-out loss on it.")
    sets = dict(eval_dataset) if isinstance(eval_dataset, Mapping) else {SINGLE_EVAL_NAME: eval_dataset}
    for name, dataset in sets.items():
        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError(f"eval_dataset[{name!r}] is empty (or not a map-style dataset).")
    if target is None:
        return sets, list(sets)
    targets = [target] if isinstance(target, str) else [str(t) for t in target]
    if not targets:
        raise ValueError("target is empty; give eval names or domains, or None for all eval sets.")
    eval_domains = {str(d) for ds in sets.values() if domain_column in ds.column_names for d in ds[domain_column]}
    unknown = [t for t in targets if t not in sets and t not in eval_domains]
    if unknown:
        raise ValueError(f"target {unknown} is not among the eval names {sorted(sets)} nor the domains of the eval "
                         f"data's {domain_column!r} column {sorted(eval_domains)}.")
    for name in targets:
        if name not in sets:
            sets[name] = rows_of_domain(sets, domain_column, name)
    return sets, targets


def rows_of_domain(sets: dict, domain_column: str, domain: str):
    """The rows of ``domain`` from every eval set that has the domain column, as one dataset."""
    import datasets

    parts = []
    for dataset in list(sets.values()):
        if domain_column in dataset.column_names:
            rows = [i for i, d in enumerate(dataset[domain_column]) if str(d) == domain]
            if rows:
                parts.append(dataset.select(rows))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def proxy_budget_tokens(args, token_counts: Mapping[str, float], n_rows: int) -> float:
    """Tokens one proxy run reads: optimizer steps × global batch × mean tokens per row (``max_steps``; without it,
    ``num_train_epochs`` passes over the data)."""
    total = float(sum(token_counts.values()))
    if args.max_steps and args.max_steps > 0:
        rows = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return rows * total / max(1, n_rows)
    return float(args.num_train_epochs) * total


def proxy_arguments(args, weights: Mapping[str, float], output_dir: str):
    """``args`` for one proxy: the trial's static mixture in resample mode, its own output dir, no checkpoints (a
    killed proxy is retried from scratch) and no evaluation during training (the search evaluates at the end)."""
    return dataclasses.replace(
        args, output_dir=output_dir, mixture="static", mixture_mode="resample",
        mixture_kwargs={"weights": dict(weights)}, save_strategy="no", eval_strategy="no", load_best_model_at_end=False,
        push_to_hub=False,
    )


def train_proxy(weights: Mapping[str, float], *, model_init: Callable[[], Any], args, train_dataset, eval_sets: dict,
                data_collator=None, processing_class=None, run_name: str = "proxy") -> dict[str, float]:
    """Train one proxy on ``weights`` and return ``{eval name: loss}`` (``Trainer.evaluate``'s mean loss)."""
    from ..trainer import WeightedTrainer

    proxy_args = proxy_arguments(args, weights, os.path.join(args.output_dir, run_name))
    trainer = WeightedTrainer(model=model_init(), args=proxy_args, train_dataset=train_dataset,
                              data_collator=data_collator, processing_class=processing_class)
    trainer.train()
    losses = {}
    for name, dataset in eval_sets.items():
        metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="search")
        losses[name] = float(metrics["search_loss"])
    bad = {k: v for k, v in losses.items() if not np.isfinite(v)}
    if bad:
        raise FloatingPointError(f"proxy {run_name} on mixture {dict(weights)} gave non-finite eval losses {bad}.")
    return losses
