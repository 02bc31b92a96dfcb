"""The weighted loss: per-token log-probabilities and the METHODS §0 numerator/denominator.

Pure functions of tensors; the Trainer glue (:mod:`hfweight.mixin`) decides what the denominator of a step is and
when it is reduced across ranks.

Normalization contract (METHODS §0), over one optimizer step (all micro-batches, all ranks)::

    token:   L = Σ v_i w_t ℓ_t / Σ v_i w'_t          (w  = loss weights, w' = denominator weights)
    sample:  L = Σ v_i ℓ_i / Σ_{i: n_i>0} v_i,       ℓ_i = Σ_t w_t ℓ_t / Σ_t w'_t

With every weight 1 the token form is exactly ``transformers.Trainer``'s loss (label tokens of the whole step).
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def shift_token_column(column: torch.Tensor | None) -> torch.Tensor | None:
    """Align a per-token column given per ``input_ids`` position with the shifted labels: drop position 0."""
    return None if column is None else column[:, 1:]


def shifted_labels(inputs: dict) -> torch.Tensor:
    """The next-token targets ``(B, T-1)``."""
    return inputs["labels"][:, 1:]


# ---- per-token log-probabilities ----------------------------------------------------------------------------------


def enable_fused_log_probs(model: nn.Module) -> bool:
    """Patch ``model`` with TRL's fused LM head so that ``model(..., fused_lm_head=True)`` returns per-token
    log-probabilities without materializing the ``(batch, seq, vocab)`` logits (DESIGN.md, "One pipeline").

    Returns False (and leaves the model untouched) when the model has no LM head TRL can drive; the caller then uses
    :func:`log_probs_from_logits`. The plain forward (no ``fused_lm_head``) stays the original, so evaluation and
    generation are unchanged. Idempotent.
    """
    from trl.trainer.utils import add_fused_lm_head

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(target, "_hfweight_fused", False):
        return True
    if getattr(target, "get_output_embeddings", None) is None or target.get_output_embeddings() is None:
        return False
    if not hasattr(target, "base_model") or not hasattr(target, "config"):
        return False
    import inspect

    if "fused_lm_head" not in inspect.signature(target.forward).parameters:
        add_fused_lm_head(target)
    target._hfweight_fused = True
    return True


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """``log p(label)`` per position from full logits ``(B, T, V)`` and targets ``(B, T)``; 0 where ignored.

    The fallback for models the fused head cannot patch. Computes ``logit[label] − logsumexp(logits)`` row-chunk by
    row-chunk so no second full-vocab tensor is created (the model itself has materialized the logits already, as the
    parent Trainer's forward does).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1)
    safe = target.clamp(min=0)
    pieces = []
    for start in range(0, flat.shape[0], chunk_rows):
        rows = flat[start : start + chunk_rows].float()
        picked = rows.gather(-1, safe[start : start + chunk_rows, None]).squeeze(-1)
        pieces.append(picked - torch.logsumexp(rows, dim=-1))
    logps = torch.cat(pieces) if pieces else flat.new_zeros(0)
    return logps.masked_fill(target == IGNORE_INDEX, 0.0).view(labels.shape)


def token_log_probs(model: nn.Module, inputs: dict, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model and return ``(log_probs, mask)``, both ``(B, T-1)`` aligned with the shifted labels.

    ``log_probs`` is 0 on ignored positions and stays connected to the graph even when no label is valid (so an
    all-ignored micro-batch still backpropagates a zero, which DDP/FSDP need to avoid hanging).
    """
    if fused:
        out = model(**inputs, fused_lm_head=True)
        return out.log_probs, out.label_mask
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward_inputs).logits[:, :-1]
    target = shifted_labels(inputs)
    return log_probs_from_logits(logits, target), target != IGNORE_INDEX


# ---- weighted sums --------------------------------------------------------------------------------------------------


def _ones_if_none(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if weights is None else weights.to(like.dtype)


def weighted_denominator(
    mask: torch.Tensor,
    denominator_weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    normalization: str,
) -> torch.Tensor:
    """This micro-batch's share of the step denominator (a float64 scalar).

    token: ``Σ_i v_i Σ_t w'_it`` over valid tokens. sample: ``Σ_i v_i`` over samples with at least one valid token
    of positive denominator weight.
    """
    maskf = mask.to(torch.float64)
    w = _ones_if_none(denominator_weights, maskf).to(torch.float64) * maskf
    v = torch.ones(mask.shape[0], dtype=torch.float64, device=mask.device) if sample_weights is None else sample_weights.to(torch.float64)
    if normalization == "token":
        return (v * w.sum(dim=1)).sum()
    has_tokens = (w.sum(dim=1) != 0).to(torch.float64)
    return (v * has_tokens).sum()


def weighted_numerator(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_weights: torch.Tensor | None,
    denominator_weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    normalization: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's unnormalized weighted loss and each sample's weighted mean token loss.

    Args:
        token_loss: ``ℓ_t`` ``(B, T-1)``, 0 where ignored, connected to the graph.
        mask: valid positions ``(B, T-1)``.
        loss_weights: ``w_t`` on each token's loss, or None (= ``denominator_weights``).
        denominator_weights: ``w'_t`` (used by the sample form to average within a sample), or None (= 1).
        sample_weights: ``v_i`` ``(B,)`` or None (= 1).
        normalization: ``"token"`` or ``"sample"``.

    Returns:
        ``(numerator, per_sample_loss)``: the numerator keeps the graph (``0 * Σ ℓ`` when nothing is valid);
        ``per_sample_loss`` ``(B,)`` is detached, the weighted token mean of each sample (0 for an empty sample).
    """
    maskf = mask.to(token_loss.dtype)
    den_w = _ones_if_none(denominator_weights, token_loss) * maskf
    loss_w = den_w if loss_weights is None else loss_weights.to(token_loss.dtype) * maskf
    per_sample_sum = (loss_w * token_loss).sum(dim=1)
    per_sample_den = den_w.sum(dim=1)
    safe_den = torch.where(per_sample_den != 0, per_sample_den, torch.ones_like(per_sample_den))
    per_sample_loss = per_sample_sum / safe_den
    v = torch.ones_like(per_sample_sum) if sample_weights is None else sample_weights.to(token_loss.dtype)
    if normalization == "token":
        numerator = (v * per_sample_sum).sum()
    else:
        numerator = (v * per_sample_loss * (per_sample_den != 0)).sum()
    # Keep every parameter that produced `token_loss` in the graph even if all weights are 0.
    numerator = numerator + 0.0 * token_loss.sum()
    return numerator, per_sample_loss.detach()
