"""Domain gradient alignment (``needs_target``: DGA): each domain's gradient over the whole step, its inner product
with a target set's gradient (and the target gradient's norm), handed to the mixture as its signal (:func:`hfweight.strategies.mixture.alignment_signal`).

The target set comes from ``eval_dataset`` (``mixture_kwargs['target']``: dict keys, domain values, or ``'eval'``);
its batches are taken in a seeded shuffled order, cycling (:func:`target_rows`), and the position is checkpointed. ``trainer.last_alignment`` holds the last
step's inner products, squared norms and signal.
"""

from __future__ import annotations

import contextlib
import math

import datasets
import torch

from ...columns import BATCH_DOMAIN, BATCH_PREFIX
from ...gradalign import complete_products, partial_products, snapshot_gradients
from ...loss import per_sample_values, sample_segments, shifted_labels, token_log_probs
from ...strategies.mixture import alignment_signal
from ..data import is_map_dataset, split_by_domain
from .base import Driver


def target_rows(call: int, size: int, n: int, seed: int) -> list[int]:
    """The target-set rows of the ``call``-th target batch of ``size`` rows: consecutive positions in a stream that
    visits the ``n`` rows once per cycle, each cycle in its own fixed shuffled order (``torch.randperm`` seeded with
    ``seed`` and the cycle). Shuffled because a target set is usually several held-out sets concatenated: rows taken
    in file order make each batch one domain's, and DGA then aligns with whichever domain's turn it is instead of with
    the whole target (seen on the built-in data: a cosine of 0.9 with arithmetic at one update, 0.4 with prose at the
    next). Pure: every rank computes the same rows, and a resumed run continues from ``call``."""
    rows, perms = [], {}
    for position in range(call * size, (call + 1) * size):
        cycle, offset = divmod(position, n)
        if cycle not in perms:
            perms[cycle] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + cycle)).tolist()
        rows.append(perms[cycle][offset])
    return rows


class _AlignmentPosition:
    """How many target batches DGA has taken (the next one continues the cycle through the target set)."""

    def __init__(self, driver):
        self.driver = driver

    def state_dict(self) -> dict:
        return {"calls": self.driver.calls}

    def load_state_dict(self, state: dict) -> None:
        self.driver.calls = int(state["calls"])


class GradientAlignment(Driver):
    def __init__(self, trainer):
        """Resolve DGA's target set (``mixture_kwargs['target']``) from ``eval_dataset`` and check the setup."""
        super().__init__(trainer)
        t = trainer
        name = t.args.mixture
        target = t.mixture.target
        how = (
            "set mixture_kwargs['target'] to a key of the `eval_dataset` dict, a domain of `eval_dataset`'s domain "
            "column (e.g. {'target': 'arithmetic'}), a list of those, or 'eval' for the whole `eval_dataset`"
        )
        if not target:
            raise ValueError(f"mixture={name!r} aligns each domain's gradient with a target set's and has none: {how}.")
        if getattr(t, "is_deepspeed_enabled", False) or t.get_tp_size() > 1:
            raise ValueError(
                f"mixture={name!r} computes per-domain gradients with extra backward passes, which DeepSpeed's engine "
                "and tensor parallelism do not allow outside its step; train with DDP or FSDP2 "
                "(accelerate_configs/ddp.yaml, fsdp2.yaml) or pick another mixture."
            )
        sets = split_by_domain(t.eval_dataset, t.args.domain_column, dict(zip(t._domain_values, t.domain_names)))
        if list(target) == ["eval"]:
            chosen = list(sets.values()) if isinstance(t.eval_dataset, dict) else [t.eval_dataset]
            if not chosen or chosen[0] is None:
                raise ValueError(f"mixture={name!r} with target 'eval' needs an `eval_dataset`.")
        else:
            missing = [x for x in target if str(x) not in sets]
            if missing:
                raise ValueError(
                    f"mixture_kwargs['target'] names {missing}, not found in `eval_dataset` (it offers {sorted(sets)}): "
                    f"{how}."
                )
            chosen = [sets[str(x)] for x in target]
        if len(chosen) > 1:
            common = set.intersection(*(set(d.column_names) for d in chosen))
            chosen = [d.select_columns([c for c in d.column_names if c in common]) for d in chosen]
        target_set = datasets.concatenate_datasets(chosen) if len(chosen) > 1 else chosen[0]
        if len(target_set) == 0:
            raise ValueError(f"mixture={name!r}: the target set {target} has no rows.")
        self.target_set = target_set  # unused columns are dropped at first use (the signature is known then)
        self.target_ready = False
        self.calls = 0
        t.last_alignment = None

    def before_step(self, plan, batch_samples: list[dict]) -> None:
        if self.trainer.mixture.gradients_requested():
            self.align(batch_samples)

    def state_parts(self) -> dict:
        return {"gradient_alignment": _AlignmentPosition(self)}

    def target_batch(self) -> dict | None:
        """This rank's slice of the next global target batch (:func:`target_rows`: the target set in a seeded shuffled
        order, cycling)."""
        t = self.trainer
        if not self.target_ready:
            if is_map_dataset(self.target_set):
                self.target_set = t._remove_unused_columns(self.target_set, description="dga target")
            self.target_ready = True
        target = self.target_set
        world, rank = t._data_parallel_size(), t.args.process_index
        size = t.mixture.target_batch_size or t.args.per_device_train_batch_size * world
        seed = t.args.data_seed if t.args.data_seed is not None else t.args.seed
        rows = target_rows(self.calls, size, len(target), seed)
        self.calls += 1
        per_rank = -(-size // world)
        mine = rows[rank * per_rank : (rank + 1) * per_rank]
        if not mine:
            return None
        weighting_columns = set(t._column_spec.names)  # a plain token-mean loss: no weights, no domain lookup
        batch = t.data_collator([{c: v for c, v in target[i].items() if c not in weighting_columns} for i in mine])
        return {k: v.to(t.args.device) if hasattr(v, "to") else v for k, v in batch.items()}

    def align(self, batch_samples: list[dict]) -> None:
        """DGA's signal for this step, from the step's prefetched micro-batches and a target batch.

        Runs at the start of the optimizer step, before any backward of it. Per domain ``d`` (and the target) the
        gradient of the token-mean loss over the *whole* step — all micro-batches, all ranks — is built by backward
        passes through the data-parallel wrapper (``no_sync`` until the last micro-batch), so DDP averages it and FSDP2
        reduce-scatters it exactly as for training (each loss is a local sum over the global count, times the
        data-parallel size that the wrapper's mean divides out). Inner products with the target gradient and squared
        norms come from per-shard partial sums and one all-reduce (:mod:`hfweight.gradalign`). Every rank runs the
        same number of forward/backward passes (a zero-weighted row where it has no row of a domain), because
        FSDP's all-gathers and DDP's buffer broadcasts are collective. The optimizer's gradients are set aside and put
        back untouched. Cost: one forward+backward of the step's rows plus one of the target batch, every
        ``update_every`` steps.
        """
        t = self.trainer

        model = t.model_wrapped if t.model_wrapped is not None else t.model
        params = [p for p in t.model.parameters() if p.requires_grad]
        world = t._data_parallel_size()
        k = len(t.domain_names)
        pieces = []  # per micro-batch: (model inputs, per-position domain (B, T-1) or -1, label mask)
        counts = torch.zeros(k + 1, dtype=torch.float64, device=t.args.device)
        for batch in batch_samples:
            mask = shifted_labels(batch) != -100
            segments, num_samples = sample_segments(batch)
            domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
            where = torch.full_like(segments, -1) if domains is None else domains.to(segments.device)[segments]
            where = torch.where(mask, where, torch.full_like(where, -1))
            counts[:k] += torch.bincount(where[where >= 0].flatten(), minlength=k)[:k].to(counts)
            pieces.append(({key: v for key, v in batch.items() if not key.startswith(BATCH_PREFIX)}, where))
        target = self.target_batch()
        if target is not None:
            target = {key: v for key, v in target.items() if not key.startswith(BATCH_PREFIX)}
            counts[k] = (shifted_labels(target) != -100).sum()
        counts = t._all_reduce(counts)

        def backward(inputs: dict, select, total: float, sync: bool) -> None:
            """Backward of Σ_selected ℓ / total · W (W undoes the wrapper's mean over ranks)."""
            context = contextlib.nullcontext() if sync else t.accelerator.no_sync(model)
            with context, t.compute_loss_context_manager():
                logps, mask = token_log_probs(model, inputs, t._fused, t.fused_min_logits)
                keep = mask if select is None else mask & select
                loss = -(logps * keep).sum() / max(total, 1.0) * world
                if not bool(keep.any()):
                    loss = loss * 0.0
            loss.backward()

        def rows_of(inputs: dict, where: torch.Tensor, d: int):
            """The rows of ``inputs`` holding a token of domain ``d`` (one zero-weighted row if none)."""
            rows = (where == d).any(dim=1)
            if not bool(rows.any()):
                rows = torch.zeros_like(rows)
                rows[0] = True
            width = where.shape[0]
            sub = {key: v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == width else v for key, v in inputs.items()}
            return sub, where[rows] == d

        saved = [p.grad for p in params]
        was_training = model.training
        model.train()
        try:
            for p in params:
                p.grad = None
            if target is None:  # this rank has no target row: a zero-weighted pass keeps the collectives in step
                backward(pieces[0][0], torch.zeros_like(pieces[0][1], dtype=torch.bool), 1.0, sync=True)
            else:
                backward(target, None, float(counts[k]), sync=True)
            target_grad = snapshot_gradients(params)
            sums = torch.full((2, k), float("nan"), dtype=torch.float64)
            target_partial, _ = partial_products(params, [target_grad], world)  # the grads are g_target now: ‖g_t‖²
            partials = [(None, target_partial)]
            for d in range(k):
                if float(counts[d]) == 0:  # absent from the whole step on every rank: no gradient, NaN signal
                    continue
                for p in params:
                    p.grad = None
                for j, (inputs, where) in enumerate(pieces):
                    sub, select = rows_of(inputs, where, d)
                    backward(sub, select, float(counts[d]), sync=j == len(pieces) - 1)
                partial, _ = partial_products(params, [target_grad], world)
                partials.append((d, partial))
            sharded = t._parameters_sharded()
            stacked = torch.stack([p for _, p in partials])
            reduced = complete_products(stacked, sharded, world, lambda x: t._all_reduce(x).cpu())
            target_sq = reduced[0, 1]
            for row, (d, _) in enumerate(partials[1:], start=1):
                sums[0, d], sums[1, d] = reduced[row, 0], reduced[row, 1]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            model.train(was_training)
        signal = alignment_signal(sums[0], sums[1], float(target_sq), normalize=getattr(t.mixture, "normalize", "doge"))
        t.last_alignment = {"step": t.state.global_step, "inner_products": sums[0], "squared_norms": sums[1],
                            "target_squared_norm": float(target_sq), "signal": signal}
        for name, value in zip(t.domain_names, signal.tolist()):
            if not math.isnan(value):
                t._record(f"dga_alignment/{name}", value)
        t.mixture.observe_gradients(signal, t.state.global_step)
