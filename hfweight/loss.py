"""The weighted loss: per-token log-probabilities and the numerator/denominator of docs/methods.md#normalization.

Pure functions of tensors; the Trainer glue (:mod:`hfweight.glue`) decides what the denominator of a step is and
when it is reduced across ranks.

Normalization contract (docs/methods.md#normalization), over one optimizer step (all micro-batches, all ranks)::

    token:   L = Σ v_i w_t ℓ_t / Σ v_i w'_t          (w  = loss weights, w' = denominator weights)
    sample:  L = Σ v_i ℓ_i / Σ_{i: n_i>0} v_i,       ℓ_i = Σ_t w_t ℓ_t / Σ_t w'_t

With every weight 1 the token form is exactly ``transformers.Trainer``'s loss (label tokens of the whole step).

Where the per-token log-probabilities come from (:func:`token_log_probs`), and what that costs in memory:

- TRL's fused LM head (:func:`enable_fused_log_probs`) projects the hidden states through the LM head tile by tile
  (at most 4096 positions × 32768 vocabulary entries per tile, fp32 running statistics) and never holds the
  ``(batch, seq, vocab)`` logits. It runs inside TRL's own SFT/GRPO trainers on every device (their loss uses it: kept
  for parity), and for the other trainers on a GPU (:data:`FUSED_HEAD_DEVICES`) when a micro-batch has at least
  :data:`FUSED_MIN_LOGITS` logits.
- Everywhere else — ``WeightedTrainer`` on the CPU, small micro-batches on a GPU, models TRL cannot patch — the model's
  forward *does* materialize the full ``(batch, seq, vocab)`` logits, upcast to fp32 (a copy unless they already are
  fp32) for one per-token cross-entropy: the same tensors, time and memory as the parent Trainer's own loss
  (transformers' ``ForCausalLMLoss``), not less.
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
    log-probabilities without materializing the ``(batch, seq, vocab)`` logits (README, "Design"). Patching does not
    mean it is used: :func:`use_fused_head` decides per micro-batch (on the CPU, outside TRL's trainers, it is not).

    Returns False (and leaves the model untouched) when the model has no LM head TRL can drive; the caller then
    computes the log-probs from the model's logits as the parent Trainer computes its loss. The plain forward (no
    ``fused_lm_head``) stays the original, so evaluation and generation are unchanged. Idempotent.
    """
    from trl.trainer.utils import add_fused_lm_head

    target = _patch_target(model)
    if getattr(target, "_hfweight_fused", False):
        return True
    if getattr(target, "get_output_embeddings", None) is None or target.get_output_embeddings() is None:
        return False
    if not hasattr(target, "base_model") or not hasattr(target, "config"):
        return False
    # TRL's SFT/GRPO trainers patch the model already (an instance-level `forward`); patching twice would drop the
    # extra outputs (entropy, top-1) they ask for.
    target._hfweight_parent_fused = "forward" in vars(target)
    if not target._hfweight_parent_fused:
        add_fused_lm_head(target)
    target._hfweight_fused = True
    return True


def _patch_target(model: nn.Module) -> nn.Module:
    """The causal-LM module the fused head patches, through DDP (``.module``) and PEFT (``get_base_model``)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


FUSED_MIN_LOGITS = 1 << 24
"""On a GPU, micro-batches with fewer logits than this (``tokens × vocab``; 2^24 is 64 MiB in fp32) take the
full-logits path: below it their memory does not matter, and the fused head's tiling only adds work."""

FUSED_HEAD_DEVICES = ("cuda", "xpu")
"""Devices where TRL's fused head runs its Triton kernels. Elsewhere (the CPU) it folds each ``4096 × 32768`` tile with
plain torch ops, which costs more time *and* memory than the full logits. Measured on 2 CPU cores, vocab 32768,
batch 4 × 512 (``python benchmarks/bench_memory.py``): fused head 3.1× the step time of ``transformers.Trainer`` and
+2.1 GiB peak over the step vs +0.8 GiB; the full-logits path matches the Trainer in both."""


def _triton_device(device: torch.device) -> bool:
    import importlib.util

    return device.type in FUSED_HEAD_DEVICES and importlib.util.find_spec("triton") is not None


def _vocab_size(model: nn.Module) -> int | None:
    """The LM head's output size, through DDP/PEFT wrappers; ``None`` if it cannot be told."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "vocab_size", None)


def use_fused_head(model: nn.Module, inputs: dict, fused: bool, min_logits: int | None = None) -> bool:
    """Whether this micro-batch goes through the fused LM head.

    Always when the parent trainer itself computes its loss through it (TRL's SFT/GRPO trainers: parity). Otherwise
    it must be available (``fused``), on a device where it pays off (:data:`FUSED_HEAD_DEVICES`), and the logits it
    avoids must be large enough to matter (at least :data:`FUSED_MIN_LOGITS`). ``min_logits`` overrides both the
    device and the size test (tests use 0 to force the fused head). Both paths give the same log-probabilities up to
    float rounding; the full-logits path costs exactly what the parent ``transformers.Trainer`` costs."""
    if not fused:
        return False
    if getattr(_patch_target(model), "_hfweight_parent_fused", False):
        # The parent trainer (TRL's SFT/GRPO) computes its own loss through this head at every size: so do we, for
        # bit-for-bit parity (the two paths round differently under bf16 autocast).
        return True
    if min_logits is None and not _triton_device(inputs["input_ids"].device):
        return False
    vocab = _vocab_size(model)
    threshold = FUSED_MIN_LOGITS if min_logits is None else min_logits
    return vocab is None or inputs["input_ids"].numel() * vocab >= threshold


def token_log_probs(
    model: nn.Module, inputs: dict, fused: bool, min_fused_logits: int | None = None, keep: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model and return ``(log_probs, mask)``, both ``(B, T-1)`` aligned with the shifted labels.

    ``fused``: the model carries the fused LM head (:func:`enable_fused_log_probs`); it is used when
    :func:`use_fused_head` says so, with ``min_fused_logits`` overriding the size threshold. Otherwise the full
    ``(B, T, V)`` logits are computed and upcast to fp32, exactly as the parent Trainer's loss does (module docstring).
    ``log_probs`` is 0 on ignored positions and stays connected to the graph even when no label is valid (so an
    all-ignored micro-batch still backpropagates a zero, which DDP/FSDP need to avoid hanging).
    ``keep``: a dict that receives the fused head's whole output under ``"fused"`` when that path runs (TRL's SFT head
    also returns each position's entropy and whether the label is the top-1 token, computed tile by tile).
    """
    if use_fused_head(model, inputs, fused, min_fused_logits):
        out = model(**inputs, fused_lm_head=True)
        if keep is not None:
            keep["fused"] = out
        return out.log_probs, out.label_mask
    forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward_inputs).logits
    target = shifted_labels(inputs)
    # Exactly the parent Trainer's loss computation (transformers' ForCausalLMLoss: fp32 logits, labels shifted by
    # padding one ignored column, one fused cross-entropy), kept per token: same time, same memory. Slicing the logits
    # to T-1 positions instead would make them non-contiguous and cost a full copy.
    padded = torch.nn.functional.pad(target, (0, 1), value=IGNORE_INDEX)
    nll = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), padded.view(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return -nll.view(padded.shape)[:, :-1], target != IGNORE_INDEX


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer body whose output feeds the LM head (through DDP/PEFT wrappers)."""
    model = model.module if hasattr(model, "module") else model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model.base_model


def token_log_probs_with(
    model: nn.Module, inputs: dict, fused: bool, min_fused_logits: int | None, of_hidden, keep: dict | None = None
):
    """:func:`token_log_probs` plus ``of_hidden(h)`` of the backbone's last hidden state ``h`` ``(B, T, H)`` (kept in
    the graph), evaluated by a forward hook on the backbone — *inside* the model's forward. ``keep`` as in
    :func:`token_log_probs`.

    Inside the forward is where a sharded engine has the top-level module's parameters (the LM head among them)
    gathered: FSDP2 unshards the root module's parameters for its forward, and DeepSpeed ZeRO-3 arms the hooks that
    reduce a gradient computed there (TRL's kernels gather the head themselves, ``maybe_gather_lm_head_ctx``). A
    full-vocabulary term such as ASFT's KL computed there gets the LM head's gradient reduced like the rest; computed
    after the forward it would read shards. The forward still goes through ``model``, so DDP/FSDP see it.
    """
    captured = {}

    def hook(module, args, output):
        captured["value"] = of_hidden(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = backbone_of(model).register_forward_hook(hook)
    try:
        logps, mask = token_log_probs(model, inputs, fused, min_fused_logits, keep)
    finally:
        handle.remove()
    return logps, mask, captured["value"]


def token_log_probs_and_hidden(
    model: nn.Module, inputs: dict, fused: bool, min_fused_logits: int | None = None, keep: dict | None = None
):
    """:func:`token_log_probs` plus the backbone's last hidden state ``(B, T, H)`` (kept in the graph)."""
    return token_log_probs_with(model, inputs, fused, min_fused_logits, lambda hidden: hidden, keep)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A frozen tensor whole on this rank (an FSDP2 ``DTensor`` shard gathered; anything else as is)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def lm_head_of(model: nn.Module) -> nn.Module:
    model = model.module if hasattr(model, "module") else model
    return model.get_output_embeddings()


def chunked_forward_kl(policy_hidden, policy_head, reference_hidden, reference_head) -> torch.Tensor:
    """Per-token ``KL(π_ref ‖ π_θ)`` over the full vocabulary ``(B, T-1)`` from both models' hidden states, computed
    tile by tile with TRL's ``ChunkedDivergenceFunction`` (β = 0: forward KL), so neither ``(B, T, V)`` logits tensor
    is materialized. Gradients flow into the policy only. Call it inside the policy's forward under ZeRO-3/FSDP2
    (:func:`token_log_probs_with`); the kernel gathers ZeRO-3-partitioned heads itself."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    batch, width = policy_hidden.shape[0], policy_hidden.shape[1] - 1
    h_s = policy_hidden[:, :-1].reshape(batch * width, -1)
    h_t = reference_hidden[:, :-1].reshape(batch * width, -1).to(h_s.device)
    if hasattr(policy_head.weight, "full_tensor"):
        raise RuntimeError(
            "hfweight: the policy's LM head is an FSDP shard here; compute the KL inside the model's forward "
            "(token_log_probs_with), where FSDP2 has the top-level module's parameters gathered."
        )
    # The reference is frozen: gathering an FSDP2-sharded reference head whole costs memory, never a gradient.
    weight_t = _whole(reference_head.weight).to(h_s.device)
    bias_t = None if reference_head.bias is None else _whole(reference_head.bias).to(h_s.device)
    divergence, _ = ChunkedDivergenceFunction.apply(
        h_s, policy_head.weight, policy_head.bias, h_t, weight_t, bias_t, 0.0, 1.0
    )
    return divergence.view(batch, width)


# ---- samples inside a micro-batch ------------------------------------------------------------------------------------


def sample_segments(inputs: dict) -> tuple[torch.Tensor, int]:
    """Which sample each shifted label position belongs to: ``(segment_ids (B, T-1), num_samples)``.

    A padded batch has one sample per row. A packed / padding-free batch (``position_ids`` restarting at 0 inside a
    row) has one sample per run of positions starting at 0, so sample-level weights and domains stay correct inside a
    packed row. The prediction at shifted position ``t`` belongs to the sample of its label, token ``t + 1``.
    """
    labels = inputs["labels"]
    batch, width = labels.shape
    positions = inputs.get("position_ids")
    if positions is None or positions.shape != labels.shape or not bool((positions[:, 1:] == 0).any()):
        rows = torch.arange(batch, device=labels.device)[:, None].expand(batch, width - 1)
        return rows, batch
    starts = (positions == 0).to(torch.long)
    starts[:, 0] = 1  # every row starts a sample (padding after the last sample joins it, and is masked anyway)
    token_segment = starts.flatten().cumsum(0).view(batch, width) - 1
    return token_segment[:, 1:], int(token_segment.max()) + 1


def per_sample_values(values: torch.Tensor | None, inputs: dict, segments: torch.Tensor, num_samples: int):
    """A per-sample column as one value per sample ``(S,)``.

    Accepts one value per row ``(B,)`` (padded batches) or one value per token ``(B, T)`` (packed batches, where the
    SFT trainer expanded each sample's scalar to its tokens before packing): the value of each sample's first label
    position is taken.
    """
    if values is None:
        return None
    if values.dim() == 1:
        return values
    per_position = values[:, 1:]
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    # Later positions overwrite earlier ones; inside a sample every position holds the same value.
    out[segments.flatten()] = per_position.flatten()
    return out


# ---- weighted sums --------------------------------------------------------------------------------------------------


def _ones_if_none(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like) if weights is None else weights.to(like.dtype)


def _per_sample_sums(values: torch.Tensor, segments: torch.Tensor | None, num_samples: int | None) -> torch.Tensor:
    """Σ over each sample's positions: row sums for padded batches, segment sums for packed ones."""
    if segments is None:
        return values.sum(dim=1)
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    return out.index_add(0, segments.flatten(), values.flatten())


def weighted_denominator(
    mask: torch.Tensor,
    denominator_weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    normalization: str,
    segments: torch.Tensor | None = None,
    num_samples: int | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the step denominator (a float64 scalar).

    token: ``Σ_i v_i Σ_t w'_it`` over valid tokens. sample: ``Σ_i v_i`` over samples with at least one valid token
    of non-zero denominator weight. Samples are rows, or ``segments`` of packed rows (see :func:`sample_segments`).
    """
    maskf = mask.to(torch.float64)
    w = _ones_if_none(denominator_weights, maskf).to(torch.float64) * maskf
    per_sample = _per_sample_sums(w, segments, num_samples)
    v = torch.ones_like(per_sample) if sample_weights is None else sample_weights.to(torch.float64)
    if normalization == "token":
        return (v * per_sample).sum()
    return (v * (per_sample != 0).to(torch.float64)).sum()


def weighted_numerator(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_weights: torch.Tensor | None,
    denominator_weights: torch.Tensor | None,
    sample_weights: torch.Tensor | None,
    normalization: str,
    segments: torch.Tensor | None = None,
    num_samples: int | None = None,
    extra_token_loss: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batch's unnormalized weighted loss and each sample's weighted mean token loss.

    Args:
        token_loss: ``ℓ_t`` ``(B, T-1)``, 0 where ignored, connected to the graph.
        mask: valid positions ``(B, T-1)``.
        loss_weights: ``w_t`` on each token's loss, or None (= ``denominator_weights``).
        denominator_weights: ``w'_t`` (used by the sample form to average within a sample), or None (= 1).
        sample_weights: ``v_i`` per sample ``(S,)`` or None (= 1).
        normalization: ``"token"`` or ``"sample"``.
        segments, num_samples: the sample of each position (packed rows); None means one sample per row.
        extra_token_loss: an additional per-token loss added after weighting (ASFT's λ·KL), or None.

    Returns:
        ``(numerator, per_sample_loss)``: the numerator keeps the graph (``0 * Σ ℓ`` when nothing is valid);
        ``per_sample_loss`` ``(S,)`` is detached, the weighted token mean of each sample (NaN for a sample without
        a valid token, so statistics can skip it).
    """
    maskf = mask.to(token_loss.dtype)
    den_w = _ones_if_none(denominator_weights, token_loss) * maskf
    loss_w = den_w if loss_weights is None else loss_weights.to(token_loss.dtype) * maskf
    weighted = loss_w * token_loss
    if extra_token_loss is not None:
        weighted = weighted + extra_token_loss * maskf
    per_sample_sum = _per_sample_sums(weighted, segments, num_samples)
    per_sample_den = _per_sample_sums(den_w, segments, num_samples)
    has_tokens = per_sample_den != 0
    per_sample_loss = per_sample_sum / torch.where(has_tokens, per_sample_den, torch.ones_like(per_sample_den))
    v = torch.ones_like(per_sample_sum) if sample_weights is None else sample_weights.to(token_loss.dtype)
    if normalization == "token":
        numerator = (v * per_sample_sum).sum()
    else:
        numerator = (v * per_sample_loss * has_tokens).sum()
    # Keep every parameter that produced `token_loss` in the graph even if all weights are 0.
    numerator = numerator + 0.0 * token_loss.sum()
    nan = torch.full_like(per_sample_loss, float("nan"))
    return numerator, torch.where(has_tokens, per_sample_loss, nan).detach()
