"""STORM's meta step (``needs_meta_step``; :class:`hfweight.strategies.sample.MetaRescaler`, steps 1-5 of its
docstring), run after the step's gradient corrections, before clipping and the optimizer step.

Each step keeps its micro-batches as the next step's meta batch V (:class:`_MetaBatch`); every ``meta_every`` steps an
SGD look-ahead ``θ' = θ − η g``, a forward + backward of V at θ', central differences of this step's per-sample
numerators along ``g_val`` and one Adam step of the rescaler. θ and ``.grad`` are left exactly as found. Every tensor
handed to the rescaler is global (all-gathered), so the rescaler stays identical on every rank.

The meta term is exact (up to the finite difference) for the step's real loss, including the static weights
(``sample_weight`` column, domain upweighting) and both normalizations; token weights are not part of it (the
differences use plain per-sample cross-entropy), an approximation when a token weighting is also on.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ...columns import BATCH_PREFIX
from ...gradalign import complete_products, local_piece, partial_gram, register_sharded_parameters
from ...loss import sample_segments, token_log_probs
from ...strategies.sample import lookahead_surrogate, meta_objective, scales_kl_to_uniform
from ..step import BATCH_V, sample_counts
from .base import Driver


class _MetaBatch:
    """The previous optimizer step's micro-batches on this rank (model inputs only) with the features its weights were
    computed from (global, all ranks), so the meta step can run on it and a resumed run has it back. Per-rank state
    (each rank keeps its own micro-batches), saved in each rank's state file."""

    per_rank_state = True  # a checkpoint of it resumes only with the same number of processes

    def __init__(self):
        self.batches: list[dict] | None = None
        self.features: torch.Tensor | None = None  # (N_global, F) standardized features of the batch's samples
        self.valid: torch.Tensor | None = None  # (N_global,) bool: sample has a finite loss (a valid token)
        self.offset = 0  # where this rank's samples start in the global order
        self.count = 0  # this rank's samples

    def keep(self, batches: list[dict], features: torch.Tensor, valid: torch.Tensor, offset: int, count: int) -> None:
        self.batches = [{k: v.detach() for k, v in b.items() if not k.startswith(BATCH_PREFIX)} for b in batches]
        self.features, self.valid = features.detach(), valid.detach().cpu()
        self.offset, self.count = offset, count

    def state_dict(self) -> dict:
        if self.batches is None:
            return {"batches": None}
        return {
            "batches": [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()} for b in self.batches],
            "features": self.features.cpu(),
            "valid": self.valid.cpu(),
            "offset": self.offset,
            "count": self.count,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("batches") is None:
            self.batches = None
            return
        self.batches = state["batches"]  # moved to the device when used
        self.features, self.valid = state["features"], state["valid"].to(torch.bool)
        self.offset, self.count = int(state["offset"]), int(state["count"])


class MetaStep(Driver):
    def __init__(self, trainer, loss_modes):
        super().__init__(trainer)
        if getattr(trainer, "is_deepspeed_enabled", False):
            args = trainer.args
            name = args.sample_weighting if isinstance(args.sample_weighting, str) else type(trainer.sample_weighting).__name__
            raise ValueError(
                f"sample_weighting={name!r}: the meta step moves the parameters along their gradients in "
                "`param.grad` and back, which DeepSpeed keeps in its engine (partitioned under ZeRO-2/3); train it "
                "on one process, with DDP or with FSDP2 (accelerate_configs/ddp.yaml, fsdp2.yaml), not with "
                "DeepSpeed."
            )
        self.loss_modes = loss_modes  # the step's global batch and its mode come from there
        self.meta = _MetaBatch()
        self.features: torch.Tensor | None = None

    def state_parts(self) -> dict:
        return {"storm_meta_batch": self.meta}

    def close_step(self, plan, loss: torch.Tensor) -> torch.Tensor:
        """The features this step's weights came from (before the strategy's end-of-step update changes them)."""
        ctx = plan.notes["global_batch"][0]
        self.features = self.trainer.sample_weighting.step_features(ctx, self.loss_modes.mode)
        return loss

    def end_step(self, plan) -> None:
        ctx, offset, count = plan.notes["global_batch"]
        t = self.trainer
        if self.meta.batches is not None and t.sample_weighting.should_meta_step(t.state.global_step):
            self.meta_step(plan, ctx, offset, count)
        self.meta.keep(plan.batches, self.features, torch.isfinite(ctx.losses), offset, count)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward of one micro-batch through the (unwrapped) model: each sample's token-loss sum (with graph) and
        its number of valid tokens, plain cross-entropy (no token weights)."""
        t = self.trainer
        inputs = {k: v.to(t.args.device) if torch.is_tensor(v) else v for k, v in batch.items() if not k.startswith(BATCH_PREFIX)}
        logps, mask = token_log_probs(t.model, inputs, t._fused, t.fused_min_logits)
        segments, num_samples = sample_segments(inputs)
        sums = torch.zeros(num_samples, dtype=logps.dtype, device=logps.device)
        sums = sums.index_add(0, segments.flatten(), (-logps * mask).flatten())
        counts = torch.zeros(num_samples, dtype=torch.float64, device=logps.device)
        counts = counts.index_add(0, segments.flatten(), mask.flatten().to(torch.float64))
        return sums + 0.0 * logps.sum(), counts

    def meta_step(self, plan, ctx, offset: int, count: int) -> None:
        """One meta step: look-ahead, V's gradient at θ', central differences along it, one Adam step of ω."""
        t = self.trainer
        storm, meta, model, features = t.sample_weighting, self.meta, t.model, self.features
        token_mode = t.args.loss_normalization == "token"
        # FSDP2: every update below is elementwise, so it runs on each rank's shards of θ and .grad as is; only the
        # norm of g_val needs the shards' partial sums. The root module's real (sharded) parameters are registered
        # again after each forward/backward, which leaves its temporary unsharded ones in place.
        fsdp = getattr(t, "is_fsdp_enabled", False)
        if fsdp:
            register_sharded_parameters(model)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = float(t.optimizer.param_groups[0]["lr"])
        theta = [p.detach().clone() for p in params]
        g_train = [None if p.grad is None else p.grad.detach().clone() for p in params]
        device = t.args.device
        with torch.no_grad():
            s_val = storm.scales(meta.features).detach().to(device, torch.float64)
            s_train = storm.scales(features).detach().to(device, torch.float64)
        total = float(s_val[meta.valid.to(s_val.device)].sum())
        local_s = s_val[meta.offset : meta.offset + meta.count]
        was_training = model.training
        model.train()
        val_losses, plus, minus = [], [], []
        delta = 0.0
        try:
            with torch.no_grad():  # 2. look-ahead
                for p, g in zip(params, g_train):
                    if g is not None:
                        p.sub_(g, alpha=lr)
            for p in params:
                p.grad = None
            start = 0  # 3. meta batch at θ': g_val = ∇ Σ_global s ℓ(θ') / Σ_global s
            for batch in meta.batches:
                with t.compute_loss_context_manager():
                    sums, counts = self.forward(batch)
                n = counts.numel()
                valid = counts > 0
                means = sums / counts.clamp(min=1).to(sums.dtype)
                weights = torch.where(valid, local_s[start : start + n], torch.zeros_like(local_s[start : start + n]))
                start += n
                numerator = (weights.to(means.dtype) * torch.where(valid, means, torch.zeros_like(means))).sum()
                numerator = numerator + 0.0 * sums.sum()
                (numerator / total if total > 0 else numerator * 0.0).backward()
                nan = torch.full_like(means, float("nan"))
                val_losses.append(torch.where(valid, means, nan).detach().to(torch.float64))
            if fsdp:
                register_sharded_parameters(model)
            g_val = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
            world = t._data_parallel_size()
            if fsdp:  # FSDP reduce-scattered the mean over ranks; the step's gradient is their sum
                g_val = [g * world for g in g_val]
            elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for g in g_val:
                    dist.all_reduce(g)
            partial, sharded = partial_gram([[local_piece(g) for g in g_val]], world)
            norm = float(complete_products(partial, sharded, world, lambda x: t._all_reduce(x).cpu())[0, 0].sqrt())
            delta = 0.01 / norm if norm > 0 and math.isfinite(norm) else 0.0
            with torch.no_grad():  # 4. central differences of this step's numerators along g_val
                for sign, out in ((1.0, plus), (-1.0, minus)):
                    if fsdp:  # drop the root's gathered copy of the previous θ, or the forward would reuse it
                        register_sharded_parameters(model)
                    for p, th, g in zip(params, theta, g_val):
                        p.copy_(th).add_(g, alpha=sign * delta)
                    for batch in plan.batches:
                        sums, counts = self.forward(batch)
                        sums = sums.to(torch.float64)
                        out.append(sums if token_mode else sums / counts.clamp(min=1))
        finally:
            if fsdp:
                register_sharded_parameters(model)
            with torch.no_grad():
                for p, th, g in zip(params, theta, g_train):
                    p.copy_(th)
                    p.grad = g
            model.train(was_training)
        # Per local sample of B: [d_i, D_i, c_i] (D: denominator share; c: static part of the weight).
        counts = torch.cat([sample_counts(b) for b in plan.batches]).to(device, torch.float64)
        d_local = (torch.cat(plus) - torch.cat(minus)) / (2.0 * delta) if delta > 0 else torch.zeros_like(counts)
        d_local = torch.where(counts > 0, d_local, torch.full_like(d_local, float("nan")))
        den_local = counts if token_mode else torch.ones_like(counts)
        v_local = torch.cat([
            torch.ones(c, dtype=torch.float64, device=device) if b.get(BATCH_V) is None else b[BATCH_V].to(device, torch.float64)
            for b, c in zip(plan.batches, (sample_counts(b).numel() for b in plan.batches))
        ])
        if self.loss_modes.mode == "score":  # BATCH_V = s/mean(s) × static there: divide the strategy's part out
            s_mine = s_train[offset : offset + count]
            valid = torch.isfinite(torch.as_tensor(ctx.losses[offset : offset + count], device=device))
            mean_s = s_train[torch.isfinite(ctx.losses.to(device))].mean()
            v_local = torch.where(valid, v_local * mean_s / s_mine, torch.zeros_like(v_local))
        rows = torch.stack([d_local, den_local, v_local], dim=1)
        table = t._all_gather_rows(rows)[0].cpu()
        ell_v = torch.cat(val_losses) if val_losses else torch.zeros(0, dtype=torch.float64, device=device)
        ell_v = t._all_gather_rows(ell_v.view(-1, 1).to(device, torch.float64))[0][:, 0].cpu()
        # 5. ω ← Adam(∇_ω [outer term + look-ahead term])
        train_scales = storm.scales(features)
        objective = meta_objective(storm.scales(meta.features), ell_v) + lookahead_surrogate(
            train_scales, table[:, 0], lr, static=table[:, 2], denominators=table[:, 1]
        )
        if storm.kl_weight > 0:
            objective = objective + storm.kl_weight * scales_kl_to_uniform(train_scales)
        grad_norm = storm.meta_update(objective)
        t._record("storm/meta_objective", float(objective.detach()))
        t._record("storm/meta_grad_norm", grad_norm)
