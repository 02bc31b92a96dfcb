"""The supervised weighted step: from the step's prefetched micro-batches to a weighted loss to the mixture update.

One optimizer step, with weighting on (docs/methods.md#normalization):

1. **Plan** (:meth:`WeightedStep.prepare`, when the Trainer prefetches the step's micro-batches, before any
   backward): per micro-batch, the sample weights ``v`` and the denominator token weights ``w'`` known before the
   forward; their sum over all micro-batches and ranks is the step denominator ``Z`` (one all-reduce).
2. **Loss** (:meth:`WeightedStep.loss`, once per micro-batch): per-token log-probs (TRL's fused LM head where it
   applies), loss weights ``w``, the local numerator ``Σ v w ℓ``; the loss handed back is ``numerator / Z · W``
   (``W`` cancels the data-parallel mean), and the Trainer does not divide it by the accumulation steps again.
3. **Close** (:meth:`WeightedStep.close`, after the step's last backward, before clipping): the drivers' end-of-step
   work (gradient rescaling, a meta step), then per-domain statistics are all-reduced once and handed to the mixture.

Drivers (:mod:`hfweight.glue.drivers`) hook into these three phases; the step itself knows only static weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..columns import BATCH_DOMAIN, BATCH_PREFIX, BATCH_REF_LOGPS, BATCH_SAMPLE_WEIGHT, BATCH_TOKEN_WEIGHTS
from ..loss import (
    chunked_forward_kl,
    lm_head_of,
    per_sample_values,
    sample_segments,
    shift_token_column,
    shifted_labels,
    token_log_probs,
    token_log_probs_with,
    weighted_denominator,
    weighted_numerator,
)
from ..reference import reference_hidden_states, reference_log_probs
from ..stats import summarize_weights, weight_extremes, weight_moments
from ..strategies.base import DomainStats, SampleContext, TokenContext
from .data import check_labels

logger = logging.getLogger(__name__)

# Keys the plan adds to each micro-batch (stripped with the other hfw_* keys before the forward).
BATCH_V = "hfw_v"  # per-sample weights (S,)
BATCH_DEN_W = "hfw_den_w"  # denominator token weights (B, T-1)
BATCH_SEGMENTS = "hfw_segments"  # sample index of each shifted position (B, T-1)
BATCH_SAMPLE_DOMAIN = "hfw_sample_domain"  # domain index per sample (S,)


@dataclass
class StepPlan:
    """What the plan phase decided for the optimizer step in progress."""

    denominator: torch.Tensor
    """``Z``: the step's denominator summed over all micro-batches and ranks (float64 scalar)."""
    remaining: int
    """Micro-batches of this step not yet through the loss."""
    batches: list
    """The step's micro-batches (the meta step reruns them)."""
    domain_sums: torch.Tensor | None
    """Local ``[loss_sum; token_count; sample_count; excess_sum; ref_loss_sum]`` per domain ``(5, k)``, over the
    micro-batches."""
    weights_known: bool = True
    """Whether ``v`` is final before the forward (False in the rescale mode: the weights come after it)."""
    returned: torch.Tensor | float = 0.0
    """Sum of this rank's losses handed to the Trainer so far in this step (a gradient correction fixes the logged
    loss with it, :func:`rescale_step`)."""
    closed: bool = False
    """Set once the step's end-of-step work has run."""
    notes: dict = field(default_factory=dict)
    """Per-step facts a driver leaves for a later one (e.g. the global batch's losses for the meta step)."""


@dataclass
class MicroBatch:
    """One micro-batch inside the loss, as the drivers see it after the forward."""

    extras: dict
    """The hfw_* entries of the batch (weights, segments, domains, columns)."""
    token_loss: torch.Tensor
    """Detached per-token cross-entropy ``(B, T-1)``."""
    mask: torch.Tensor
    """Valid label positions ``(B, T-1)``."""
    v: torch.Tensor | None
    """Per-sample weights ``(S,)`` (None: ones); a driver may replace them."""
    den_w: torch.Tensor | None
    """Denominator token weights ``(B, T-1)`` (None: ones)."""
    segments: torch.Tensor
    num_samples: int


def checked(weights: torch.Tensor | None, what: str) -> torch.Tensor | None:
    """Strategies must never hand NaN/inf weights to the loss: fail loudly instead of training on garbage."""
    if weights is not None and not torch.isfinite(weights).all():
        raise FloatingPointError(f"hfweight: the {what} contain NaN or inf; refusing to train on them.")
    return weights


def model_inputs(batch: dict) -> dict:
    """The entries of a batch the model takes (without the glue's hfw_* keys)."""
    return {k: v for k, v in batch.items() if not k.startswith(BATCH_PREFIX)}


def sample_counts(batch: dict) -> torch.Tensor:
    """Valid label tokens of each sample of a micro-batch ``(S,)`` (float64), samples as in :func:`sample_segments`."""
    segments, num_samples = sample_segments(batch)
    mask = (shifted_labels(batch) != -100).to(torch.float64)
    return torch.zeros(num_samples, dtype=torch.float64, device=mask.device).index_add_(0, segments.flatten(), mask.flatten())


def warn_zero_step(trainer) -> None:
    """Say that the optimizer step in progress has only zero weights (its gradient is zero)."""
    logger.warning(
        "hfweight: every weight of optimizer step %d is zero; the step contributes a zero gradient.",
        trainer.state.global_step + 1,
    )


def rescale_step(trainer, plan: StepPlan, loss: torch.Tensor, z: float) -> torch.Tensor:
    """The micro-batches divided their numerators by the planned ``plan.denominator``; the step's true denominator is
    ``z``: multiply every gradient by ``planned / z`` (before clipping) and correct the loss handed to the Trainer (the
    last micro-batch's carries the difference, so the logged loss is the true one)."""
    planned = float(plan.denominator)
    factor = planned / z if z > 0 else 0.0
    if factor != 1.0:
        for p in trainer.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
    if z == 0.0 and planned > 0.0:
        warn_zero_step(trainer)
    return (loss + plan.returned * (factor - 1.0)).to(loss.dtype)


class WeightedStep:
    """Plans, computes and closes the weighted loss of each optimizer step for one trainer (see the module doc)."""

    def __init__(self, trainer, drivers: list):
        self.trainer = trainer
        self.drivers = drivers
        self.plan: StepPlan | None = None

    # ---- 1. plan ---------------------------------------------------------------------------------------------------

    def prepare(self, batch_samples: list[dict]) -> None:
        """Compute each micro-batch's pre-forward weights and the step denominator ``Z``."""
        t = self.trainer
        for batch in batch_samples:
            check_labels(batch)
        k = len(t.domain_names)
        plan = StepPlan(
            denominator=torch.zeros((), dtype=torch.float64),
            remaining=len(batch_samples),
            batches=batch_samples,
            domain_sums=torch.zeros((5, k), dtype=torch.float64, device=t.args.device) if k else None,
        )
        for driver in self.drivers:
            driver.before_step(plan, batch_samples)
        local_den = torch.zeros((), dtype=torch.float64, device=t.args.device)
        moments = torch.zeros(4, dtype=torch.float64, device=t.args.device)
        extremes = []
        for index, batch in enumerate(batch_samples):
            if "shift_labels" in batch:
                raise ValueError(
                    "Weighted losses do not support pre-shifted labels (`shift_labels`, used by context/sequence "
                    "parallelism) yet."
                )
            mask = shifted_labels(batch) != -100
            if t.reference is not None and BATCH_REF_LOGPS not in batch:
                batch[BATCH_REF_LOGPS] = reference_log_probs(t.reference, t.model, model_inputs(batch))
            segments, num_samples = sample_segments(batch)
            domains = per_sample_values(batch.get(BATCH_DOMAIN), batch, segments, num_samples)
            v = self.times_domain_factor(self.sample_weights(plan, index, batch, segments, num_samples, domains), domains)
            den_w = None
            if t.token_weighting is not None:
                den_w = checked(t.token_weighting.denominator_weights(self.token_context(batch, mask)), "token denominator weights")
            batch[BATCH_V], batch[BATCH_DEN_W] = v, den_w
            batch[BATCH_SEGMENTS], batch[BATCH_SAMPLE_DOMAIN] = segments, domains
            den = weighted_denominator(mask, den_w, v, t.args.loss_normalization, segments, num_samples)
            local_den = local_den + den.to(local_den.device)
            v_eff = torch.ones(num_samples, dtype=torch.float64) if v is None else v
            moments += weight_moments(v_eff).to(moments.device)
            extremes.append(weight_extremes(v_eff).to(moments.device))
        reduced = t._all_reduce(torch.cat([local_den.view(1) / t._replica_factor(), moments]))
        extremes = t._all_reduce(torch.stack(extremes).amax(dim=0), op=dist.ReduceOp.MAX)
        plan.denominator = reduced[0]
        if plan.weights_known:  # otherwise the driver that sets the weights logs them at the end of the step
            for key, value in summarize_weights(reduced[1:], extremes).items():
                t._record(f"weights/{key}", value)
        if float(reduced[0]) == 0.0:
            warn_zero_step(t)
        self.plan = plan

    def sample_weights(self, plan: StepPlan, index: int, batch: dict, segments, num_samples: int, domains):
        """``v_i`` of micro-batch ``index`` before the domain factor: a driver's (loss-based weights) or the sample
        strategy's static ones."""
        for driver in self.drivers:
            if driver.supplies_sample_weights:
                return driver.sample_weights(plan, index, batch, segments, num_samples)
        t = self.trainer
        if t.sample_weighting is None:
            return None
        column = per_sample_values(batch.get(BATCH_SAMPLE_WEIGHT), batch, segments, num_samples)
        ctx = SampleContext(column=column, domains=domains, step=t.state.global_step)
        return checked(t.sample_weighting.weights(ctx), "sample weights")

    def times_domain_factor(self, v: torch.Tensor | None, domains) -> torch.Tensor | None:
        """Multiply by the upweight factor ``α_d / q_d`` when a mixture is applied by loss upweighting."""
        t = self.trainer
        if t.mixture is None or t.args.mixture_mode != "upweight":
            return v
        factor = (t.mixture.probabilities() / t._natural_mixture).to(torch.float32)
        domain_v = factor.to(domains.device)[domains]
        return domain_v if v is None else v.to(domain_v.dtype) * domain_v

    def token_context(self, batch: dict, mask: torch.Tensor, logps: torch.Tensor | None = None) -> TokenContext:
        return TokenContext(
            mask=mask,
            column=shift_token_column(batch.get(BATCH_TOKEN_WEIGHTS)),
            ref_logps=shift_token_column(batch.get(BATCH_REF_LOGPS)),
            logps=logps,
        )

    # ---- 2. loss ---------------------------------------------------------------------------------------------------

    def loss(self, model, inputs: dict, extras: dict) -> torch.Tensor:
        """The weighted loss of one micro-batch, ``Σ v w ℓ / Z · W``."""
        t, plan = self.trainer, self.plan
        kl = None
        outputs = {}
        if t._needs_reference_model:
            ref_hidden = reference_hidden_states(t.reference, t.model, inputs)
            policy_head, ref_head = lm_head_of(model), lm_head_of(t._reference_module())
            # Inside the policy's forward: under ZeRO-3/FSDP2 the LM head is gathered there (token_log_probs_with).
            logps, mask, kl = token_log_probs_with(
                model, inputs, t._fused, t.fused_min_logits,
                lambda hidden: chunked_forward_kl(hidden, policy_head, ref_hidden, ref_head), outputs,
            )
        else:
            logps, mask = token_log_probs(model, inputs, t._fused, t.fused_min_logits, outputs)
        t._log_forward_metrics(inputs, outputs.get("fused"))
        token_loss = -logps
        segments = extras[BATCH_SEGMENTS]
        micro = MicroBatch(
            extras=extras, token_loss=token_loss.detach(), mask=mask, v=extras.get(BATCH_V),
            den_w=extras.get(BATCH_DEN_W), segments=segments, num_samples=int(segments.max()) + 1 if segments.numel() else 0,
        )
        loss_w = extra = None
        if t.token_weighting is not None:
            ctx = self.token_context(extras, mask, logps.detach())
            ctx.kl = kl
            loss_w = checked(t.token_weighting.loss_weights(ctx), "token loss weights")
            extra = t.token_weighting.extra_token_loss(ctx)
            if t.token_weighting.denominator_needs_logps:
                # The exact normalizer weights (e.g. Rho-1: the kept tokens times the column), also for the per-sample
                # means of the sample normalization; the step's Z is corrected at the end of the step.
                micro.den_w = checked(t.token_weighting.denominator_weights_after(ctx), "token denominator weights")
        for driver in self.drivers:
            driver.after_forward(plan, micro)
        numerator, _ = weighted_numerator(
            token_loss, mask, loss_w, micro.den_w, micro.v, t.args.loss_normalization, segments, micro.num_samples, extra
        )
        z = plan.denominator.to(numerator.device, numerator.dtype)
        loss = numerator * 0.0 if float(z) == 0.0 else numerator / z * t._data_parallel_size()
        self.accumulate_domain_stats(plan, micro)
        plan.remaining -= 1
        if plan.remaining == 0:
            self.finish(plan)
        return loss

    def accumulate_domain_stats(self, plan: StepPlan, micro: MicroBatch) -> None:
        """Add the micro-batch's per-domain loss, token, sample (and excess-loss) sums to the step's."""
        domains = micro.extras.get(BATCH_SAMPLE_DOMAIN)
        if plan.domain_sums is None or domains is None:
            return
        segments, token_loss, mask = micro.segments.flatten(), micro.token_loss, micro.mask
        per_sample = torch.zeros((5, micro.num_samples), dtype=torch.float64, device=token_loss.device)
        per_sample[0].index_add_(0, segments, (token_loss * mask).flatten().to(torch.float64))
        per_sample[1].index_add_(0, segments, mask.flatten().to(torch.float64))
        per_sample[2] = 1.0
        ref_logps = shift_token_column(micro.extras.get(BATCH_REF_LOGPS))
        if ref_logps is not None:  # DoReMi's excess loss max(ℓ − ℓ_ref, 0) and the reference's loss ℓ_ref, over tokens
            ref_loss = torch.where(mask > 0, -ref_logps.to(token_loss.dtype), 0.0)  # padding's ref_logps may be anything
            excess = (token_loss - ref_loss).clamp(min=0) * mask
            per_sample[3].index_add_(0, segments, excess.flatten().to(torch.float64))
            per_sample[4].index_add_(0, segments, ref_loss.flatten().to(torch.float64))
        plan.domain_sums.index_add_(1, domains.to(plan.domain_sums.device), per_sample.to(plan.domain_sums))

    def finish(self, plan: StepPlan) -> None:
        """After the step's last forward, on every rank: all-reduce the per-domain sums, log them, feed the mixture."""
        t = self.trainer
        if plan.domain_sums is None:
            return
        sums = t._all_reduce(plan.domain_sums)
        stats = DomainStats(
            loss_sum=sums[0],
            token_count=sums[1],
            sample_count=sums[2],
            step=t.state.global_step,
            excess_sum=sums[3] if t._column_spec.ref_logps else None,
            ref_loss_sum=sums[4] if t._column_spec.ref_logps else None,
        )
        for name, value in zip(t.domain_names, stats.mean_loss.tolist()):
            if not math.isnan(value):
                t._record(f"domain_loss/{name}", value)
        if t.mixture is not None:  # a domain column without a mixture: the per-domain losses are only logged
            t.mixture.observe(stats)

    # ---- 3. close --------------------------------------------------------------------------------------------------

    def after_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """After each micro-batch's backward: count the loss handed back; after the step's last one (DDP has synced,
        clipping comes next), run the drivers' end-of-step work."""
        plan = self.plan
        if plan is None or plan.closed:
            return loss
        plan.returned = loss.detach().to(torch.float64) + plan.returned
        if plan.remaining == 0:
            plan.closed = True
            for driver in self.drivers:
                loss = driver.close_step(plan, loss)
            for driver in self.drivers:
                driver.end_step(plan)
        return loss
