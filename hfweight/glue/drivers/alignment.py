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
from ...gradalign import complete_products, partial_gram, partial_products, snapshot_gradients
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
        if getattr(t.mixture, "target_average", "pooled") == "per_set":
            empty = [str(x) for x, d in zip(target, chosen) if len(d) == 0] if list(target) != ["eval"] else []
            if empty or any(len(d) == 0 for d in chosen):
                raise ValueError(f"mixture={name!r}: the target set(s) {empty or target} have no rows.")
            self.target_parts = chosen  # one gradient per named set; each counts equally
        else:
            pooled = datasets.concatenate_datasets(chosen) if len(chosen) > 1 else chosen[0]
            if len(pooled) == 0:
                raise ValueError(f"mixture={name!r}: the target set {target} has no rows.")
            self.target_parts = [pooled]
        # unused columns are dropped at first use (the signature is known then)
        self.target_ready = False
        self.calls = 0
        t.last_alignment = None

    def before_step(self, plan, batch_samples: list[dict]) -> None:
        if self.trainer.mixture.gradients_requested():
            self.align(batch_samples)

    def state_parts(self) -> dict:
        return {"gradient_alignment": _AlignmentPosition(self)}

    def target_batches(self) -> list[dict | None]:
        """This rank's slice of the next global target batch of every target part (:func:`target_rows`: each part in a
        seeded shuffled order, cycling); None for a part where this rank has no row. The global batch size
        (``target_batch_size``) is split evenly over the parts."""
        t = self.trainer
        if not self.target_ready:
            self.target_parts = [t._remove_unused_columns(part, description="dga target") if is_map_dataset(part) else part
                                 for part in self.target_parts]
            self.target_ready = True
        world, rank = t._data_parallel_size(), t.args.process_index
        size = t.mixture.target_batch_size or t.args.per_device_train_batch_size * world
        size = max(1, -(-size // len(self.target_parts)))
        seed = t.args.data_seed if t.args.data_seed is not None else t.args.seed
        weighting_columns = set(t._column_spec.names)  # a plain token-mean loss: no weights, no domain lookup
        batches = []
        for j, part in enumerate(self.target_parts):
            rows = target_rows(self.calls, size, len(part), seed + j)
            per_rank = -(-size // world)
            mine = rows[rank * per_rank : (rank + 1) * per_rank]
            if not mine:
                batches.append(None)
                continue
            batch = t.data_collator([{c: v for c, v in part[i].items() if c not in weighting_columns} for i in mine])
            batches.append({k: v.to(t.args.device) if hasattr(v, "to") else v for k, v in batch.items()
                            if not k.startswith(BATCH_PREFIX)})
        self.calls += 1
        return batches

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
        targets = self.target_batches()
        m = len(targets)
        counts = torch.zeros(k + m, dtype=torch.float64, device=t.args.device)
        for batch in batch_samples:
            mask = shifted_labels(batch) != -100
            segments, num_samples = sample_segments(batch)
            domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
            where = torch.full_like(segments, -1) if domains is None else domains.to(segments.device)[segments]
            where = torch.where(mask, where, torch.full_like(where, -1))
            counts[:k] += torch.bincount(where[where >= 0].flatten(), minlength=k)[:k].to(counts)
            pieces.append(({key: v for key, v in batch.items() if not key.startswith(BATCH_PREFIX)}, where))
        for j, target in enumerate(targets):
            if target is not None:
                counts[k + j] = (shifted_labels(target) != -100).sum()
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
            target_grads = []
            for j, target in enumerate(targets):
                for p in params:
                    p.grad = None
                if target is None:  # this rank has no row of this part: a zero-weighted pass keeps collectives in step
                    backward(pieces[0][0], torch.zeros_like(pieces[0][1], dtype=torch.bool), 1.0, sync=True)
                else:
                    backward(target, None, float(counts[k + j]), sync=True)
                target_grads.append(snapshot_gradients(params))
            gram, _ = partial_gram(target_grads, world)  # its diagonal: ‖g_target,j‖²
            inner = torch.full((k, m), float("nan"), dtype=torch.float64)
            squared = torch.full((k,), float("nan"), dtype=torch.float64)
            partials = []
            for d in range(k):
                if float(counts[d]) == 0:  # absent from the whole step on every rank: no gradient, NaN signal
                    continue
                for p in params:
                    p.grad = None
                for j, (inputs, where) in enumerate(pieces):
                    sub, select = rows_of(inputs, where, d)
                    backward(sub, select, float(counts[d]), sync=j == len(pieces) - 1)
                partial, _ = partial_products(params, target_grads, world)  # [⟨g_d, g_t,1⟩, …, ⟨g_d, g_t,m⟩, ‖g_d‖²]
                partials.append((d, partial))
            sharded = t._parameters_sharded()
            flat = torch.cat([gram.flatten()] + [p for _, p in partials])  # one all-reduce for everything
            reduced = complete_products(flat, sharded, world, lambda x: t._all_reduce(x).cpu())
            target_sq = reduced[: m * m].reshape(m, m).diagonal().clone()
            rows = reduced[m * m :].reshape(len(partials), m + 1)
            for row, (d, _) in enumerate(partials):
                inner[d], squared[d] = rows[row, :m], rows[row, m]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            model.train(was_training)
        signal = alignment_signal(inner, squared, target_sq, normalize=getattr(t.mixture, "normalize", "doge"))
        single = m == 1  # one target part: (k,) inner products and a scalar target norm, as before per-set targets
        t.last_alignment = {"step": t.state.global_step, "inner_products": inner[:, 0] if single else inner,
                            "squared_norms": squared, "target_squared_norm": float(target_sq[0]) if single else target_sq,
                            "signal": signal}
        for name, value in zip(t.domain_names, signal.tolist()):
            if not math.isnan(value):
                t._record(f"dga_alignment/{name}", value)
        t.mixture.observe_gradients(signal, t.state.global_step)
