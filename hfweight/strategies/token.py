"""Per-token weighting strategies (docs/methods.md, "Per-token weights").

Each strategy turns a :class:`~hfweight.strategies.base.TokenContext` into detached per-token weights. The static
column, when the dataset carries one, multiplies every strategy's weights (so ``token_weighting="dft"`` on a dataset
with ``token_weights`` trains on ``column · p_t · ℓ_t``).
"""

from __future__ import annotations

import math

import torch

from ..registry import register_token_weighting
from .base import TokenContext, TokenWeighting
from .checks import in_range, number, required_column, strategy_field


def _arg(strategy: str, name: str) -> str:
    """How the argument ``name`` of ``token_weighting=strategy`` is named in errors."""
    return strategy_field("token_weighting", strategy, name)


@register_token_weighting("static")
class StaticTokenWeighting(TokenWeighting):
    """Weights read from the dataset's ``token_weights`` column (docs/methods.md#static-token).

    The column is aligned with ``input_ids``: entry ``j`` weighs the loss of predicting token ``j`` (entry 0 is never
    used, since nothing predicts the first token). The weights enter both the numerator and the normalizer, so the
    step loss is ``Σ w_t ℓ_t / Σ w_t``: a weighted token mean that equals the plain mean when every weight is 1.
    """

    column_required = True

    def denominator_weights(self, ctx: TokenContext):
        holds = "a list of floats aligned with `input_ids`"
        return required_column(ctx.column, "token_weighting", "token_weights", holds)


def _times_column(weights: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
    """Compose with the static ``token_weights`` column when the dataset has one."""
    return weights if ctx.column is None else weights * ctx.column


def _require_logps(ctx: TokenContext, name: str) -> torch.Tensor:
    if ctx.logps is None:
        raise RuntimeError(f"token_weighting={name!r} needs the current log-probabilities (called before the forward).")
    return ctx.logps


def _require_reference(ctx: TokenContext, name: str) -> torch.Tensor:
    if ctx.ref_logps is None:
        raise ValueError(
            f"token_weighting={name!r} needs reference log-probabilities: set `reference_model` (a path/hub id, or "
            "'base' for a PEFT model's base) or add a precomputed `ref_logps` column (`hfweight score-reference`)."
        )
    return ctx.ref_logps


def dft_weights(logps: torch.Tensor) -> torch.Tensor:
    """DFT (Wu et al., "On the Generalization of SFT", arXiv 2508.05629; code ``yongliang-wu/DFT``):
    ``ℓ'_t = sg(p_t) · ℓ_t``, i.e. the weight is the detached probability of the label."""
    return logps.detach().exp()


def focal_weights(logps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017, "Focal Loss for Dense Object Detection"): ``(1 − p_t)^γ · ℓ_t``, the mirror
    image of DFT (up-weights tokens the model finds hard). γ = 2 in the original paper."""
    return (1.0 - logps.detach().exp()).clamp(min=0.0) ** gamma


def prior_weights(ref_logps: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """PRIOR-style reference-probability weights (arXiv 2505.08971; no public code; docs/methods.md#prior):
    ``w_t = (1 − p_ref,t)^α``, renormalized to mean 1 over each sequence's valid tokens, so tokens a reference
    (lacking the information to learn) already predicts well count less.

    Rows without a valid token get weight 0. Normalization is per row of the batch: in a packed row the mean is
    taken over the whole packed row (documented simplification; with ``packing=False`` it is exactly per sequence).
    """
    maskf = mask.to(ref_logps.dtype)
    raw = (1.0 - ref_logps.exp()).clamp(min=0.0) ** alpha * maskf
    count = maskf.sum(dim=1, keepdim=True)
    total = raw.sum(dim=1, keepdim=True)
    # A row whose raw weights are all 0 (the reference is certain everywhere) falls back to uniform weights.
    uniform = total == 0
    raw = torch.where(uniform, maskf, raw)
    total = torch.where(uniform, count, total)
    return raw * count / total.clamp(min=torch.finfo(raw.dtype).tiny)


def rho1_selection(excess_loss: torch.Tensor, mask: torch.Tensor, keep_percent: float) -> torch.Tensor:
    """Rho-1 selective language modeling (Lin et al., "Not All Tokens Are What You Need", arXiv 2404.07965; no public
    training code): keep the top ``k%`` of valid tokens by excess loss ``Δ_t = ℓ_t − ℓ_ref,t`` (weight 1), drop the
    rest (weight 0). Returns the 0/1 selection ``(B, T-1)``; exactly ``ceil(k% · n_valid)`` tokens are kept (ties are
    broken by position, deterministically)."""
    n_valid = int(mask.sum())
    n_keep = rho1_keep_count(n_valid, keep_percent)
    selection = torch.zeros_like(excess_loss)
    if n_keep == 0:
        return selection
    scores = excess_loss.masked_fill(~mask, float("-inf")).flatten()
    top = torch.topk(scores, n_keep, sorted=False).indices
    selection.view(-1)[top] = 1.0
    return selection


def rho1_keep_count(n_valid: int, keep_percent: float) -> int:
    return min(n_valid, math.ceil(n_valid * keep_percent / 100.0))


@register_token_weighting("dft")
class DFTWeighting(TokenWeighting):
    """DFT: each token's loss times its detached probability; normalized by the token count (not by Σ p), as in the
    paper and in TRL's ``SFTConfig(loss_type="dft")`` — so the two give the same loss."""

    def denominator_weights(self, ctx):
        return ctx.column

    def loss_weights(self, ctx):
        return _times_column(dft_weights(_require_logps(ctx, "dft")), ctx)


@register_token_weighting("focal")
class FocalWeighting(TokenWeighting):
    """Focal loss ``(1 − p_t)^γ ℓ_t`` normalized by the token count. Args: ``gamma`` (≥ 0, default 2; 0 = plain NLL)."""

    def __init__(self, gamma: float = 2.0):
        self.gamma = number(gamma, _arg("focal", "gamma"), low=0)

    def denominator_weights(self, ctx):
        return ctx.column

    def loss_weights(self, ctx):
        return _times_column(focal_weights(_require_logps(ctx, "focal"), self.gamma), ctx)


@register_token_weighting("prior")
class PriorWeighting(TokenWeighting):
    """``(1 − p_ref)^α`` renormalized to mean 1 per sequence. Args: ``alpha`` (≥ 0, default 1).

    The weights depend only on the reference, so they are known before the forward pass and enter both the numerator
    and the step denominator: gradient accumulation and rank invariance are exact.
    """

    needs_reference = True

    def __init__(self, alpha: float = 1.0):
        self.alpha = number(alpha, _arg("prior", "alpha"), low=0)

    def denominator_weights(self, ctx):
        return _times_column(prior_weights(_require_reference(ctx, "prior"), ctx.mask, self.alpha), ctx)


@register_token_weighting("rho1")
class Rho1Weighting(TokenWeighting):
    """Rho-1 selective LM: train only on the top ``keep_percent`` % tokens by excess loss over a reference.

    Over which batch the top-k is taken: each **micro-batch** on each rank (the paper's "in a batch"); *which* tokens
    are kept depends on how the step's rows are split into micro-batches, so Rho-1's gradient is not exactly invariant
    to GA or the number of ranks (a step-wide top-k would need an extra scoring forward pass). The drift is measured in
    ``tests/test_token_strategies.py``.

    The normalizer is over the kept tokens only: token mode ``Σ_kept c_t ℓ_t / Σ_kept c_t`` over the step (``c`` the
    ``token_weights`` column, 1 without one); sample mode ``Σ_i v_i ℓ_i / Σ_i v_i`` over the samples with a kept token,
    ``ℓ_i = Σ_{kept in i} c ℓ / Σ_{kept in i} c``. Only in token mode without a column is it known before the forward
    (``ceil(k% · n_valid)`` per micro-batch, from the mask): the planned denominator is ``k% ·`` the column over all
    valid tokens, and the exact one (:meth:`denominator_weights_after`, the selection times the column) corrects the
    step's gradients before clipping (``denominator_needs_logps``).

    Args: ``keep_percent`` in (0, 100] (default 60, the value the paper's math runs use).
    """

    needs_reference = True
    denominator_needs_logps = True

    def __init__(self, keep_percent: float = 60.0):
        self.keep_percent = in_range(keep_percent, _arg("rho1", "keep_percent"), 0, 100, low_open=True)

    def denominator_weights(self, ctx):
        n_valid = int(ctx.mask.sum())
        keep = rho1_keep_count(n_valid, self.keep_percent)
        share = keep / n_valid if n_valid else 0.0
        return _times_column(ctx.mask.to(torch.float32) * share, ctx)

    def denominator_weights_after(self, ctx):
        return self.loss_weights(ctx)

    def loss_weights(self, ctx):
        excess = -_require_logps(ctx, "rho1") + _require_reference(ctx, "rho1")
        return _times_column(rho1_selection(excess, ctx.mask, self.keep_percent), ctx)


@register_token_weighting("asft")
class ASFTWeighting(DFTWeighting):
    """Anchored SFT (Zhu et al., arXiv 2509.23753; code ``zhuchichi56/ASFT``, ``train_v2.py``):
    ``ℓ'_t = sg(p_t) · ℓ_t + λ · KL(π_ref(·|ctx) ‖ π_θ(·|ctx))``, the KL over the full vocabulary.

    The trainer computes the KL tile by tile from both models' hidden states (no full logits), inside the policy's
    forward (so ZeRO-3/FSDP2 have the LM head gathered and reduce its gradient as usual), and passes it as
    ``ctx.kl``. The reference is ``reference_model`` (a path, ``"base"`` for a PEFT model, or a model object), and by
    default a frozen copy of the initial model, as in the authors' code. Divergence from that code: their trainer
    divides by the micro-batch token count and ignores ``num_items_in_batch`` (so their loss depends on gradient
    accumulation); here the KL term is normalized over the whole optimizer step like every other term
    (docs/methods.md#normalization).

    Args: ``kl_weight`` λ ≥ 0 (default 0.1, the authors' code; their README says 0.05).
    """

    needs_reference_model = True

    def __init__(self, kl_weight: float = 0.1):
        self.kl_weight = number(kl_weight, _arg("asft", "kl_weight"), low=0)

    def extra_token_loss(self, ctx: TokenContext):
        if ctx.kl is None:
            raise RuntimeError("token_weighting='asft' needs the per-token KL from the trainer.")
        return self.kl_weight * _times_column(ctx.kl, ctx)
