"""Per-sample weighting strategies: what they share (docs/methods.md, "Per-sample weights").

Every strategy returns one weight per sample of the set it is given; the Trainer glue turns them into the step
objective of docs/methods.md#normalization (``Σ v_i ℓ_i / Σ v_i`` in sample mode, ``Σ v_i w_t ℓ_t / Σ v_i w_t`` in
token mode). The loss-based strategies (``loss``, ``truncation``, ``storm``) declare ``needs_losses = True``: the glue
then passes ``ctx.losses``, the per-sample mean token loss of the **global batch** of the optimizer step (all
micro-batches of the accumulation, all ranks, concatenated in a fixed order; NaN for a sample without a valid token).
Because the input is global and the computation deterministic, every rank computes the same weights and the same state
updates, with no communication inside the strategy; each rank then keeps its own slice (by *global* rank).
"""

from __future__ import annotations

import torch

from ..base import SampleContext
from ..checks import choice, strategy_field


def arg(strategy: str, name: str) -> str:
    """How the argument ``name`` of ``sample_weighting=strategy`` is named in errors."""
    return strategy_field("sample_weighting", strategy, name)


SAMPLE_MODES = ("auto", "rescale", "score")
"""How the glue obtains loss-dependent weights before normalizing the step (``mode`` kwarg of the loss-based
strategies). Both are exact, i.e. the step's gradient does not depend on GA or on the number of ranks:

- ``"rescale"``: each micro-batch is weighted from the losses of its own training forward (no extra pass) with
  *unnormalized* weights ``u_i``; it backpropagates ``Σ u_i ℓ_i`` and, after the step's last micro-batch, the glue
  all-reduces ``Σ u_j`` (all micro-batches, all ranks) and rescales the gradients by it before clipping. Batch
  statistics a strategy needs (Sow et al.'s min/max, the truncation cutoff, STORM's feature standardization) come from
  the steps before.
- ``"score"``: a no-grad scoring forward over the step's prefetched micro-batches gives every loss first; the strategy
  then weighs the whole global batch with its own statistics. One extra forward per micro-batch (~1.3x the step).
- ``"auto"`` (default): ``"rescale"`` wherever the gradients live in ``param.grad`` (single process, DDP, FSDP);
  ``"score"`` under DeepSpeed, whose engine keeps (and clips) the gradients itself.
"""


def check_mode(mode, strategy: str) -> str:
    """``mode`` of a loss-based strategy: one of :data:`SAMPLE_MODES`."""
    return choice(mode, arg(strategy, "mode"), SAMPLE_MODES, hint=" ('rescale': weights from each micro-batch's own "
                  "forward, gradients rescaled by the global sum; 'score': a scoring pass first)")


def global_losses(ctx: SampleContext, strategy: str) -> torch.Tensor:
    """``ctx.losses`` as a detached 1-D float64 CPU tensor (the strategies' arithmetic is done there)."""
    if ctx.losses is None:
        raise ValueError(
            f"sample_weighting={strategy!r} needs the per-sample losses of the step (`ctx.losses`); the trainer glue "
            "provides them for strategies with `needs_losses = True`."
        )
    losses = ctx.losses.detach()
    if losses.dim() != 1:
        raise ValueError(
            f"sample_weighting={strategy!r}: `ctx.losses` must be 1-D (one mean token loss per sample), got shape "
            f"{tuple(losses.shape)}."
        )
    # float64 on the CPU: B floats per step, so the cost is nil; it keeps min/max/softmax/quantiles exact enough that
    # every rank (and a resumed run) gets bit-identical weights, and works on devices without float64 (MPS).
    return losses.to(device="cpu", dtype=torch.float64)


def finish_weights(weights: torch.Tensor, ctx: SampleContext) -> torch.Tensor:
    """float32 weights on the device of ``ctx.losses``, multiplied by the static column when there is one."""
    device = ctx.losses.device
    out = weights.to(dtype=torch.float32)
    if ctx.column is not None:
        out = out * ctx.column.detach().to(device="cpu", dtype=torch.float32)
    return out.to(device)

