"""Sample weights that depend on the step's own losses (``needs_losses``: Sow et al.'s ``loss``, loss truncation,
STORM), in the two exact modes of docs/methods.md#exact-modes (:data:`hfweight.strategies.sample.SAMPLE_MODES`).

- ``score``: a no-grad scoring forward of the current model over the step's prefetched micro-batches gives every
  sample's mean token loss; the losses of all micro-batches of all ranks are gathered in a fixed order (micro-batch,
  then rank), the strategy weighs that global batch once, and each rank keeps its own slice by *global* rank. The
  weights are known before the first backward, so the step denominator is exact. Cost: one extra forward per
  micro-batch (~+33% FLOPs).
- ``rescale`` (the default where the gradients can be rescaled): each micro-batch is weighed from its own training
  forward with the strategy's *unnormalized* weights ``u`` (the plan's ``Z`` counts ``u = 1``); after the last
  backward every sample's row is gathered, the true ``Z = Σ u · static · den`` computed and the gradients multiplied
  by ``Z_planned / Z`` before clipping. No extra forward.

Both are invariant to gradient accumulation and the number of ranks. ``trainer.last_sample_weights`` holds this
rank's weights and losses of the last step (``{"losses", "weights"}``: the strategy's weights up to a per-step factor,
times the column). The step's global batch is left in ``plan.notes["global_batch"]`` as ``(SampleContext, this rank's
offset, its sample count)`` for the meta step.
"""

from __future__ import annotations

import torch

from ...columns import BATCH_DOMAIN, BATCH_SAMPLE_WEIGHT
from ...loss import per_sample_values, sample_segments, token_log_probs, weighted_numerator
from ...stats import summarize_weights, weight_extremes, weight_moments
from ...strategies.base import SampleContext
from ..step import BATCH_SAMPLE_DOMAIN, checked, model_inputs, rescale_step
from .base import Driver

# Columns of the per-sample rows a rescale-mode micro-batch records: its training-forward mean token loss, the
# strategy's unnormalized weight u, the static part of v (column × domain factor; 1 if none), u's share of the step
# denominator, the domain index (−1: none) and the `sample_weight` column (NaN: none).
RESCALE_ROWS = ("loss", "u", "static", "den", "domain", "column")


def resolve_mode(trainer) -> str:
    """The strategy's ``mode`` made concrete: ``"auto"`` is rescale unless DeepSpeed owns the gradients; errors where
    the chosen mode cannot run. Writes the resolved mode back to the strategy."""
    strategy, args = trainer.sample_weighting, trainer.args
    name = args.sample_weighting if isinstance(args.sample_weighting, str) else type(strategy).__name__
    deepspeed = getattr(trainer, "is_deepspeed_enabled", False)
    mode = strategy.mode
    if mode == "auto":
        mode = "rescale" if strategy.supports_rescale and not deepspeed else "score"
    if mode == "rescale" and not strategy.supports_rescale:
        raise ValueError(
            f"sample_weighting={name!r} does not implement the rescale protocol (begin_step/local_weights/"
            "end_step); set sample_weighting_kwargs['mode'] = 'score'."
        )
    if mode == "rescale" and deepspeed:
        raise ValueError(
            f"sample_weighting={name!r} with mode='rescale' rescales `param.grad` before clipping, but DeepSpeed "
            "keeps the gradients in its engine; set sample_weighting_kwargs['mode'] = 'score' (or 'auto')."
        )
    strategy.mode = mode
    return mode


class LossModes(Driver):
    supplies_sample_weights = True

    def __init__(self, trainer):
        super().__init__(trainer)
        self.mode = resolve_mode(trainer)
        self.rows: list[torch.Tensor] = []  # rescale: this step's per-sample rows (RESCALE_ROWS)
        self.step_weights: list[torch.Tensor] | None = None  # score: this rank's weights per micro-batch
        self.score: tuple | None = None  # score: (global SampleContext, this rank's offset)
        trainer.last_sample_weights = None

    # ---- plan --------------------------------------------------------------------------------------------------------

    def before_step(self, plan, batch_samples: list[dict]) -> None:
        if self.mode == "rescale":  # weights come per micro-batch from its own forward (after_forward)
            plan.weights_known = False
            self.rows = []
            self.trainer.sample_weighting.begin_step(self.trainer.state.global_step)
        else:
            self.step_weights = self.scored_weights(batch_samples)

    def sample_weights(self, plan, index: int, batch: dict, segments, num_samples: int):
        if self.mode == "rescale":  # the static part of v (the column); u_i joins it after the forward
            return per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
        return self.step_weights[index]

    def scored_weights(self, batch_samples: list[dict]) -> list[torch.Tensor]:
        """Score mode: the scoring pass, the global batch's weights, this rank's slice per micro-batch."""
        t = self.trainer
        local = []
        model = t.model
        was_training = model.training
        model.eval()  # no dropout in the scoring pass: the same losses the training forward will see
        try:
            with torch.no_grad():
                for batch in batch_samples:
                    logps, mask = token_log_probs(model, model_inputs(batch), t._fused, t.fused_min_logits)
                    segments, num_samples = sample_segments(batch)
                    _, losses = weighted_numerator(-logps, mask, None, None, None, "sample", segments, num_samples)
                    column = per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
                    domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
                    local.append(torch.stack([
                        losses.double(),
                        torch.full_like(losses, float("nan")).double() if column is None else column.double(),
                        torch.full_like(losses, -1).double() if domains is None else domains.double(),
                    ], dim=1))
        finally:
            model.train(was_training)
        sizes = [len(x) for x in local]
        table, offset = t._all_gather_rows(torch.cat(local).to(t.args.device))
        has_column = not torch.isnan(table[:, 1]).all()
        ctx = SampleContext(
            column=table[:, 1].float() if has_column else None,
            losses=table[:, 0].float(),
            domains=table[:, 2].long() if bool((table[:, 2] >= 0).all()) else None,
            step=t.state.global_step,
        )
        weights = checked(t.sample_weighting.weights(ctx), "sample weights")
        mine = weights[offset : offset + sum(sizes)]
        self.score = (ctx, offset)
        t.last_sample_weights = {"losses": ctx.losses[offset : offset + sum(sizes)].detach().cpu(), "weights": mine.detach().cpu()}
        return list(torch.split(mine.to(t.args.device), sizes))

    # ---- rescale: per micro-batch ---------------------------------------------------------------------------------------

    def after_forward(self, plan, micro) -> None:
        """Rescale mode: the strategy's unnormalized ``u`` from this micro-batch's own losses; ``v ← v · u``; record
        what the end of the step needs."""
        if self.mode != "rescale":
            return
        t = self.trainer
        losses = weighted_numerator(micro.token_loss, micro.mask, None, None, None, "sample", micro.segments, micro.num_samples)[1]
        domains = micro.extras.get(BATCH_SAMPLE_DOMAIN)
        ctx = SampleContext(losses=losses.float(), domains=domains, step=t.state.global_step)
        u = checked(t.sample_weighting.local_weights(ctx), "sample weights").to(micro.token_loss.device).to(torch.float64)
        static = torch.ones_like(u) if micro.v is None else micro.v.to(torch.float64)
        den_w = 1.0 if micro.den_w is None else micro.den_w.to(torch.float64)
        den = torch.zeros_like(u).index_add_(0, micro.segments.flatten(), (micro.mask.to(torch.float64) * den_w).flatten())
        if t.args.loss_normalization == "sample":
            den = (den != 0).to(torch.float64)
        column = per_sample_values(micro.extras.get(BATCH_SAMPLE_WEIGHT), micro.extras, micro.segments, micro.num_samples)
        self.rows.append(torch.stack([
            losses.to(torch.float64),
            u,
            static,
            u * static * den,
            torch.full_like(u, -1) if domains is None else domains.to(u),
            torch.full_like(u, float("nan")) if column is None else column.to(u),
        ], dim=1))
        micro.v = (u * static).to(torch.float32)

    # ---- end of step ------------------------------------------------------------------------------------------------

    def close_step(self, plan, loss: torch.Tensor) -> torch.Tensor:
        """Rescale mode: the true ``Z`` and the gradient correction. Both modes: the global batch for later drivers."""
        if self.mode == "rescale":
            loss, ctx, offset, count = self.rescale_gradients(plan, loss)
        else:
            ctx, offset = self.score
            count = sum(len(w) for w in self.step_weights)  # this rank's samples
        plan.notes["global_batch"] = (ctx, offset, count)
        return loss

    def end_step(self, plan) -> None:
        if self.mode == "rescale":
            self.trainer.sample_weighting.end_step(plan.notes["global_batch"][0])

    def rescale_gradients(self, plan, loss: torch.Tensor):
        """Gather every sample's row (all ranks, rank-major: the order of the score mode), compute the true
        ``Z = Σ u · static · den``, rescale the gradients and the logged loss to it (:func:`rescale_step`), log the
        weights. Returns ``(loss, global ctx, this rank's offset, its sample count)``."""
        t = self.trainer
        rows = torch.cat(self.rows) if self.rows else torch.zeros((0, len(RESCALE_ROWS)), dtype=torch.float64)
        count = rows.shape[0]
        table, offset = t._all_gather_rows(rows.to(t.args.device, torch.float64))
        table = table.cpu()
        loss = rescale_step(t, plan, loss, float(table[:, 3].sum()))
        losses, u, static = table[:, 0], table[:, 1], table[:, 2]
        valid = torch.isfinite(losses)
        mean_u = float(u[valid].mean()) if bool(valid.any()) else 0.0
        normalized = u / mean_u if mean_u > 0 else torch.zeros_like(u)
        column = torch.where(torch.isnan(table[:, 5]), torch.ones_like(u), table[:, 5])
        strategy_weights = normalized * column  # what the score mode's strategy returns: mean 1, times the column
        logged = normalized * static
        for key, value in summarize_weights(weight_moments(logged), weight_extremes(logged)).items():
            t._record(f"weights/{key}", value)
        t.last_sample_weights = {
            "losses": losses[offset : offset + count].float(),
            "weights": strategy_weights[offset : offset + count].float(),
        }
        domains = table[:, 4]
        ctx = SampleContext(
            losses=losses.float(),
            domains=domains.long() if bool((domains >= 0).all()) and domains.numel() else None,
            step=t.state.global_step,
        )
        return loss, ctx, offset, count
