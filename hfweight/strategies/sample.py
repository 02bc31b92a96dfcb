"""Per-sample weighting strategies (docs/methods.md, "Per-sample weights").

Every strategy here returns one weight per sample of the set it is given; the Trainer glue turns them into the step
objective of docs/methods.md#normalization (``Σ v_i ℓ_i / Σ v_i`` in sample mode, ``Σ v_i w_t ℓ_t / Σ v_i w_t`` in
token mode). The loss-based strategies (``loss``, ``truncation``, ``storm``) declare ``needs_losses = True``: the glue
then passes ``ctx.losses``, the per-sample mean token loss of the **global batch** of the optimizer step (all
micro-batches of the accumulation, all ranks, concatenated in a fixed order; NaN for a sample without a valid token).
Because the input is global and the computation deterministic, every rank computes the same weights and the same state
updates, with no communication inside the strategy; each rank then keeps its own slice (by *global* rank).

Contents:

- pure functions of Sow et al. (ICLR 2025): :func:`normalize_losses`, :func:`loss_strategy_scores`,
  :func:`softmax_weights`;
- ``static`` (:class:`StaticSampleWeighting`), ``loss`` (:class:`LossReweighting`), ``truncation``
  (:class:`LossTruncation`), ``storm`` (:class:`MetaRescaler`, with :class:`RescalerNet`, :func:`sample_features`,
  :func:`meta_objective` and :func:`lookahead_surrogate`).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers

import torch
from torch import nn

from ..registry import register_sample_weighting
from .base import SampleContext, SampleWeighting


@register_sample_weighting("static")
class StaticSampleWeighting(SampleWeighting):
    """Weights read from the dataset's ``sample_weight`` column (docs/methods.md#static-sample).

    In token normalization every token of sample ``i`` carries ``v_i``; in sample normalization the step loss is
    ``Σ v_i ℓ_i / Σ v_i``.
    """

    column_required = True

    def weights(self, ctx: SampleContext):
        if ctx.column is None:
            raise ValueError(
                "sample_weighting='static' needs a `sample_weight` column (one float ≥ 0 per row) in the training "
                "dataset; add it or choose another sample_weighting."
            )
        return ctx.column


# ---- shared helpers ---------------------------------------------------------------------------------------------------


def _as_float(value, name: str, strategy: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"sample_weighting={strategy!r}: `{name}` must be a number, got {value!r}.")
    try:
        out = float(value)
    except ValueError as err:
        raise ValueError(f"sample_weighting={strategy!r}: `{name}` must be a number, got {value!r}.") from err
    if math.isnan(out):
        raise ValueError(f"sample_weighting={strategy!r}: `{name}` must not be NaN.")
    return out


def _as_int(value, name: str, strategy: str, minimum: int) -> int:
    ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not ok or int(value) < minimum:
        raise ValueError(f"sample_weighting={strategy!r}: `{name}` must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def _global_losses(ctx: SampleContext, strategy: str) -> torch.Tensor:
    """``ctx.losses`` as a detached 1-D float64 CPU tensor (the strategies' arithmetic is done there, see below)."""
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


def _finish(weights: torch.Tensor, ctx: SampleContext) -> torch.Tensor:
    """float32 weights on the device of ``ctx.losses``, multiplied by the static column when there is one."""
    device = ctx.losses.device
    out = weights.to(dtype=torch.float32)
    if ctx.column is not None:
        out = out * ctx.column.detach().to(device="cpu", dtype=torch.float32)
    return out.to(device)


# ---- Sow et al., ICLR 2025: pure functions ----------------------------------------------------------------------------

LOSS_STRATEGIES = ("linupper", "quadratic", "extremes", "upper")
"""Canonical names of the score functions ``f(h)`` of Sow et al."""
LOSS_STRATEGY_ALIASES = {"mid": "quadratic"}
"""The GPT-2 repository's code name ``mid`` is the paper's ``quadratic``."""


def normalize_losses(losses: torch.Tensor) -> torch.Tensor:
    """Map per-sample losses to ``h ∈ [−1, 1]`` over the batch (Sow et al., ICLR 2025, Eq. for ``h``)::

        h_i = (2 ℓ_i − (ℓmax + ℓmin)) / max(ℓmax − ℓmin, 1e-6)

    Source: ``h_func`` in ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py`` and in
    ``foundation-model-stack/fms-fsdp`` (branch ``reweighted-train``) ``fms_fsdp/utils/train_utils.py``, called with
    ``delta=1`` and the min/max of the all-gathered losses.

    Divergence: NaN (or ±inf) losses, which the glue passes for a sample without a valid token, are left out of the
    min/max and come back as NaN (the authors' code has no such samples: it would propagate NaN to every weight).
    Computed in float64; returns float64.
    """
    x = torch.as_tensor(losses).to(torch.float64)
    valid = torch.isfinite(x)
    h = torch.full_like(x, float("nan"))
    if not bool(valid.any()):
        return h
    lo, hi = x[valid].min(), x[valid].max()
    h[valid] = (2.0 * x[valid] - (hi + lo)) / torch.clamp(hi - lo, min=1e-6)
    return h


def loss_strategy_scores(h: torch.Tensor, strategy: str) -> torch.Tensor:
    """Score ``f(h)`` of each sample; the softmax of :func:`softmax_weights` turns scores into weights.

    ========== ==================== =============================================================
    strategy   ``f(h)``             effect
    ========== ==================== =============================================================
    linupper   ``min(h + 1, 1)``    down-weights low-loss samples, caps high-loss ones
    quadratic  ``1 − h²``           down-weights both extremes (code name ``mid``)
    extremes   ``|h|``              up-weights both extremes
    upper      ``0.5 h + 0.5``      unclipped linear: the highest loss gets the most weight
    ========== ==================== =============================================================

    Source: ``f_func_linupper`` / ``f_func_mid`` / ``f_func_extremes`` / ``f_func_upper`` (``delta=1``) in
    ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py``.

    Naming trap: in ``fms-fsdp`` (branch ``reweighted-train``) the function registered as ``"upper"`` is
    ``min(h + 1, 1)``, i.e. the GPT-2 repository's ``"linupper"``; ``fms-fsdp`` has no unclipped linear strategy.
    Here the names follow the GPT-2 repository and the paper: a config ported from ``fms-fsdp`` with
    ``reweighting_strategy="upper"`` must say ``strategy="linupper"``.

    NaN entries of ``h`` stay NaN.
    """
    name = LOSS_STRATEGY_ALIASES.get(strategy, strategy)
    h = torch.as_tensor(h)
    if name == "linupper":
        return torch.minimum(h + 1.0, torch.ones_like(h))
    if name == "quadratic":
        return 1.0 - h * h
    if name == "extremes":
        return h.abs()
    if name == "upper":
        return 0.5 * h + 0.5
    raise ValueError(
        f"Unknown loss reweighting `strategy={strategy!r}`; valid: {list(LOSS_STRATEGIES)} (alias 'mid' = "
        "'quadratic'). Naming trap: fms-fsdp's 'upper' is min(h+1, 1), which is 'linupper' here."
    )


def softmax_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of the scores with temperature ``r``, scaled to **sum to N** (mean 1)::

        v_i = N · exp((f_i − max f) / r) / Σ_j exp((f_j − max f) / r)

    Source: ``g_func(f − f.max(), l=kl_reg)`` followed by ``g / g.sum()`` in
    ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py`` (``kl_regularizer`` in ``fms-fsdp``).
    The weights solve ``max_v Σ v_i f_i − r·KL(v ‖ uniform)`` on the simplex, hence ``r → ∞`` gives uniform weights
    and, since every score here lies in ``[0, 1]``, ``max v / min v ≤ e^{1/r}``.

    Why mean 1 rather than sum 1: the glue divides the step objective by ``Σ v`` (docs/methods.md#normalization), so a
    global scale cancels and the *relative* weights, which are exactly the paper's, are all that reaches the gradient.
    Mean-1 weights keep per-sample quantities (logged weighted losses, a static ``sample_weight`` column they are
    multiplied with, domain upweighting factors) on the same scale as in the unweighted run. The GPT-2 code does the
    same in effect: it multiplies the sum-1 weights back by the batch size (``* world_size * len(device_weights)``).

    ``temperature`` must be > 0; ``float("inf")`` gives uniform weights. NaN scores get weight 0, are left out of the
    max and the normalization, and ``N`` counts only the others; all-NaN gives all zeros. Computed in float64.
    """
    r = float(temperature)
    if not r > 0:
        raise ValueError(f"softmax temperature must be > 0 (float('inf') for uniform weights), got {temperature!r}.")
    f = torch.as_tensor(scores).to(torch.float64)
    valid = torch.isfinite(f)
    out = torch.zeros_like(f)
    n = int(valid.sum())
    if n == 0:
        return out
    if math.isinf(r):
        out[valid] = 1.0
        return out
    z = torch.exp((f[valid] - f[valid].max()) / r)  # max term is exp(0) = 1: the sum is ≥ 1, never 0
    out[valid] = z * (n / z.sum())
    return out


# ---- the two exact modes (docs/methods.md#exact-modes) ---------------------------------------------------------------

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


def _as_mode(mode, strategy: str) -> str:
    if mode not in SAMPLE_MODES:
        raise ValueError(
            f"sample_weighting={strategy!r}: `mode` must be one of {list(SAMPLE_MODES)}, got {mode!r} ('rescale': weights "
            "from each micro-batch's own forward, gradients rescaled by the global sum; 'score': a scoring pass first)."
        )
    return mode


def normalize_losses_in_range(losses: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """:func:`normalize_losses` with a *given* range ``[low, high]`` (rescale mode: the previous step's global
    min/max), clamped to ``[−1, 1]``::

        h_i = clamp((2 ℓ_i − (high + low)) / max(high − low, 1e-6), −1, 1)

    Same formula as Sow et al.'s ``h_func`` (``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025``
    ``src/trainer.py``); the clamp is this library's: a loss outside the previous step's range gets the score of the
    range's end, so every score stays in ``[0, 1]`` and the max/min weight ratio stays ≤ ``e^{1/r}`` as in the paper.
    ``low``/``high`` ``None`` (no previous step): ``h = 0`` for every finite loss (uniform weights). NaN stays NaN.
    """
    x = torch.as_tensor(losses).to(torch.float64)
    valid = torch.isfinite(x)
    h = torch.full_like(x, float("nan"))
    if low is None or high is None:
        h[valid] = 0.0
        return h
    h[valid] = ((2.0 * x[valid] - (high + low)) / max(high - low, 1e-6)).clamp(-1.0, 1.0)
    return h


def unnormalized_softmax_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """The numerators of :func:`softmax_weights` with a fixed shift instead of the batch max::

        u_i = exp((f_i − 1) / r)

    ``softmax_weights`` is ``u / Σ u`` (times N), because the shift cancels in the ratio; 1 is the largest score any
    strategy of :func:`loss_strategy_scores` gives on ``h ∈ [−1, 1]``, so ``u ∈ [e^{−1/r}, 1]``: no overflow and no
    underflow to 0 for any ``r`` > 0 reasonable in practice. Source of the softmax: ``g_func`` in
    ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py``. ``r = inf`` gives 1; NaN scores give 0.
    """
    r = float(temperature)
    if not r > 0:
        raise ValueError(f"softmax temperature must be > 0 (float('inf') for uniform weights), got {temperature!r}.")
    f = torch.as_tensor(scores).to(torch.float64)
    valid = torch.isfinite(f)
    out = torch.zeros_like(f)
    out[valid] = 1.0 if math.isinf(r) else torch.exp((f[valid] - 1.0) / r)
    return out


# ---- Sow et al., ICLR 2025: the strategy ------------------------------------------------------------------------------


@register_sample_weighting("loss")
class LossReweighting(SampleWeighting):
    """Dynamic loss-based sample reweighting — Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved Large
    Language Model Pretraining", ICLR 2025 (docs/methods.md#sow).

    Two exact modes (``mode``, see :data:`SAMPLE_MODES`); they differ only in where the min/max of ``h`` come from:

    - ``"score"``: per optimizer step, over the global batch: ``h = normalize_losses(ℓ)``,
      ``f = loss_strategy_scores(h, strategy)``, ``v = softmax_weights(f, r)`` (mean 1), times the static
      ``sample_weight`` column if the dataset has one. The paper's computation (with ``GA = 1``), at the price of a
      scoring forward.
    - ``"rescale"`` (the default through ``"auto"``): ``h = normalize_losses_in_range(ℓ, ℓmin', ℓmax')`` with
      ``ℓmin'``/``ℓmax'`` the global min/max of the **previous** optimizer step's losses (from its training forward;
      all ranks), clamped to [−1, 1]; then ``u = unnormalized_softmax_weights(f, r)`` per micro-batch from its own
      losses, and the glue divides by the global ``Σ u`` after the last micro-batch, so the step objective is
      ``Σ u_i ℓ_i / Σ u_i``, exactly the softmax weighting of those scores. The first step has no previous range:
      uniform weights. The state (the previous range) is checkpointed.

    The min/max one step old is the only difference: the loss range drifts slowly during training (a step changes the
    model by one small update), and a loss outside the old range is scored as the range's end.

    Args:
        strategy: ``"linupper"`` (default), ``"quadratic"`` (alias ``"mid"``), ``"extremes"`` or ``"upper"``; see
            :func:`loss_strategy_scores`. Default ``linupper`` because it is the paper's general recommendation
            ("deprioritizing redundant or uninformative data tends to work best"): it lowers the weight of samples the
            model already fits; it is also what the 1.4B/7B ``fms-fsdp`` runs use (there named ``"upper"``) and what
            the authors combine with domain reweighting. Their GPT-2 configs use ``quadratic`` (124M) and
            ``extremes`` (210M/684M).

            Not for corrupted or noisy samples (the method's nature, not a deviation): every sample above the
            batch's mid-range loss gets the top score, so relative to the rest the highest losses — random tokens,
            wrong labels — get *more* weight, the more the smaller ``r`` (the cap only stops the increase at the
            mid-range). ``quadratic`` does not help either: a corrupted sample is rarely the batch's single extreme,
            and clean low-loss samples are pushed down with it. Measured: a toy with 30% wrong labels
            (``benchmarks/results/sample_diagnosis_toy.md``; weights equal to the authors' rule to 5e-7 at every
            step) raises the weight on corrupted samples from 30% to 37% (r = 1) and 42% (r = 0.4), and every
            ``r`` loses to uniform; on the tiny LM with 30% random-token blocks
            (``benchmarks/results/sample_effectiveness_corrupt.md``) it is worse than uniform too. For corrupted
            samples use ``truncation``.
        temperature: ``r`` (authors' ``kl_reg`` / ``kl_regularizer``), default 1.0 as in both codes; > 0, with
            ``float("inf")`` giving uniform weights. Smaller is sharper; the max/min weight ratio is ≤ ``e^{1/r}``
            (e ≈ 2.7 at r = 1, e^2.5 ≈ 12 at the authors' r = 0.4).
        warmup_steps: optimizer steps at the start with uniform weights (authors' ``burnout_steps``: uniform while
            ``global_step < burnout_steps``; here while ``ctx.step < warmup_steps``). Default 0, not the authors' 1000:
            the library is mostly used to fine-tune pretrained models whose losses are informative from the first
            step, and many such runs are shorter than 1000 steps, so a 1000-step default would silently disable the
            method. When pretraining from random initialization, where early losses only reflect the random init, set
            it (the authors used 1000 steps at GPT-2 scale, ``fms-fsdp`` 2000).
        warmup_temperature: ``None`` (default): uniform weights during warm-up, as in the GPT-2 repository. A number:
            use this temperature during warm-up instead, as ``fms-fsdp`` does (``r = 100`` for its warm-up steps).
        mode: ``"auto"`` (default), ``"rescale"`` or ``"score"``; see above and :data:`SAMPLE_MODES`.

    Divergences from the authors' code:
      - NaN (and ±inf) losses, e.g. a sample with no valid token, get weight 0 and are left out of the min/max and
        the softmax; the authors' code would turn every weight into NaN.
      - The weights are normalized by the glue's ``Σ v`` over the whole step (docs/methods.md#normalization). The
        GPT-2 code divides the weighted sum by the local token count instead (``Σ N v_i n_i ℓ_i / Σ n_i``): the same
        gradient direction, a scale differing by ``Σ v_i n_i / Σ n_i``. ``fms-fsdp`` (equal-length sequences) is sample mode exactly.
      - The weights are computed over the step's *global* batch (all micro-batches and ranks), which equals the
        authors' all-gathered micro-batch when ``GA = 1`` (their setting); with ``GA > 1`` the batch over which min,
        max and softmax are taken is the whole step, so the result does not depend on how the step is split.
      - Each rank's slice is taken by global rank (``fms-fsdp`` slices by ``LOCAL_RANK``: wrong on several nodes);
        that is the glue's job.
    """

    needs_losses = True
    supports_rescale = True

    def __init__(
        self,
        strategy: str = "linupper",
        temperature: float = 1.0,
        warmup_steps: int = 0,
        warmup_temperature: float | None = None,
        mode: str = "auto",
    ):
        self.mode = _as_mode(mode, "loss")
        self.previous_range: tuple[float, float] | None = None  # rescale mode: (min, max) of the last step's losses
        if not isinstance(strategy, str) or LOSS_STRATEGY_ALIASES.get(strategy, strategy) not in LOSS_STRATEGIES:
            raise ValueError(
                f"sample_weighting='loss': unknown `strategy={strategy!r}`; valid: {list(LOSS_STRATEGIES)} (alias "
                "'mid' = 'quadratic'). Naming trap: fms-fsdp's 'upper' is min(h+1, 1), which is 'linupper' here."
            )
        self.strategy = LOSS_STRATEGY_ALIASES.get(strategy, strategy)
        self.temperature = _as_float(temperature, "temperature", "loss")
        if not self.temperature > 0:
            raise ValueError(
                f"sample_weighting='loss': `temperature` must be > 0 (float('inf') for uniform weights), got "
                f"{temperature!r}."
            )
        self.warmup_steps = _as_int(warmup_steps, "warmup_steps", "loss", 0)
        self.warmup_temperature = None
        if warmup_temperature is not None:
            self.warmup_temperature = _as_float(warmup_temperature, "warmup_temperature", "loss")
            if not self.warmup_temperature > 0:
                raise ValueError(
                    f"sample_weighting='loss': `warmup_temperature` must be > 0 or None (uniform during warm-up), got "
                    f"{warmup_temperature!r}."
                )

    def temperature_at(self, step: int) -> float:
        """The temperature in force after ``step`` optimizer steps (``inf`` = uniform)."""
        if step < self.warmup_steps:
            return float("inf") if self.warmup_temperature is None else self.warmup_temperature
        return self.temperature

    def weights(self, ctx: SampleContext) -> torch.Tensor:
        """Score mode: mean-1 weights of the global batch in ``ctx`` (stateless)."""
        losses = _global_losses(ctx, "loss")
        scores = loss_strategy_scores(normalize_losses(losses), self.strategy)
        return _finish(softmax_weights(scores, self.temperature_at(ctx.step)), ctx)

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """Rescale mode: ``u_i = exp((f_i − 1)/r)`` from the previous step's range (unnormalized; any subset)."""
        losses = _global_losses(ctx, "loss")
        low, high = self.previous_range if self.previous_range is not None else (None, None)
        scores = loss_strategy_scores(normalize_losses_in_range(losses, low, high), self.strategy)
        return _finish(unnormalized_softmax_weights(scores, self.temperature_at(ctx.step)), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Rescale mode: remember the global min/max of this step's finite losses for the next step."""
        losses = _global_losses(ctx, "loss")
        finite = losses[torch.isfinite(losses)]
        if finite.numel():
            self.previous_range = (float(finite.min()), float(finite.max()))

    def state_dict(self) -> dict:
        return {"previous_range": None if self.previous_range is None else list(self.previous_range)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("previous_range")  # a checkpoint of a score-mode run has none: start without a range
        self.previous_range = None if saved is None else (float(saved[0]), float(saved[1]))


# ---- Kang & Hashimoto, ACL 2020: loss truncation ------------------------------------------------------------------------


TRUNCATION_AUTHORS_WINDOW = 10000
"""``ddkang/loss_dropper``'s ``min_count`` = ``recompute`` = buffer length."""


def truncation_window(run_samples: int) -> int:
    """Buffer length, hot start and recompute period of loss truncation for a run of ``run_samples`` samples:
    ``min(10 000, ceil(run_samples / 10))``, at least 1 (see :class:`LossTruncation`)."""
    return max(1, min(TRUNCATION_AUTHORS_WINDOW, -(-int(run_samples) // 10)))


@register_sample_weighting("truncation")
class LossTruncation(SampleWeighting):
    """Loss truncation — Kang & Hashimoto, "Improved Natural Language Generation via Loss Truncation", ACL 2020
    (docs/methods.md#truncation; code ``ddkang/loss_dropper``, ``LossDropper``).

    Samples whose loss is above the ``(1 − drop_fraction)`` quantile of a ring buffer of recent sample losses get
    weight 0, the others 1 (times the static ``sample_weight`` column, if any). Per call (one optimizer step):

    1. if at least ``min_samples`` losses have been seen and the cutoff is due (never computed, or at least
       ``recompute_every`` losses entered the buffer since it was), recompute it: the linear-interpolation quantile
       (``numpy.percentile``'s default, as the authors) of the buffer's filled part;
    2. weight 0 for each sample with loss > cutoff (and for NaN losses), 1 otherwise; no cutoff yet → nothing dropped;
    3. push this step's finite losses into the ring buffer (oldest overwritten first).

    Args:
        drop_fraction: ``dropc``, the fraction of (buffered) samples dropped; default 0.4 as the authors; in [0, 1).
            0 drops nothing.
        buffer_size: ring-buffer length. ``None`` (default): the run's *window* (below); the authors use 10 000
            (their buffer has ``recompute`` entries).
        min_samples: hot start: nothing is dropped before this many losses have been seen. ``None`` (default): the
            run's window; the authors use 10 000 (``min_count``).
        recompute_every: losses pushed between two cutoff computations; ``None`` (default) = the buffer length, the
            authors' behaviour (their ``recompute`` is both the buffer length and the period).

    The window (what every ``None`` size above resolves to): ``min(10 000, ceil(run_samples / 10))`` once the glue has
    told the strategy how many samples the run will see (:meth:`set_run_length`, called at the start of training
    with ``max_steps × global batch``), 10 000 (the authors' value) when it never does. Why: the authors' 10 000
    is a small share of their runs (summarization, several epochs of ~10^5-10^6 samples); in a run of 3 200 samples
    it is longer than the run, and truncation never drops anything. ``run_samples / 10`` keeps their proportions for
    short runs: the cutoff starts after the first tenth of the run and is refreshed nine more times. A value set
    explicitly is kept as given; if it is ``min_samples`` ≥ the run's samples, :meth:`set_run_length` warns with the
    numbers (truncation would then never act).
        mode: ``"auto"`` (default), ``"rescale"`` or ``"score"`` (:data:`SAMPLE_MODES`). The cutoff applied to a step
            comes from earlier steps only, so both modes give the *same* weights: 1-2 above happen in
            :meth:`begin_step` and :meth:`local_weights` (each micro-batch from its own forward, the glue dividing by
            the global count of kept samples), 3 in :meth:`end_step` with the global batch; ``"score"`` only adds a
            scoring forward.

    Cross-rank: the original keeps one buffer per process, fed with that process's samples. Here the input is the
    step's global batch (all ranks, fixed order), so the buffer, the counters and the cutoff are identical on every
    rank: the "reduced across ranks" version, with no communication in this class.

    The glue must call :meth:`weights` (score mode) or :meth:`begin_step`/:meth:`end_step` (rescale mode) exactly once
    per optimizer step, in training only (each call feeds the buffer).

    Divergences from ``ddkang/loss_dropper``:
      - order: the cutoff applied to a step comes from losses of earlier steps only; the authors push the batch first,
        so on the steps where the cutoff is recomputed the batch's own losses take part. With the default sizes the
        buffer holds 10 000 losses and the difference is at most one batch in the quantile.
      - hot start: the first cutoff is computed as soon as ``min_samples`` losses have been seen (authors: the first
        recompute also waits for ``recompute`` losses, ``count > recompute``; identical with the default sizes up to an
        off-by-one), and ``recompute_every`` can differ from ``buffer_size``.
      - ties: a loss equal to the cutoff is kept (authors keep ``loss < cutoff`` only); ``drop_fraction=0`` drops
        nothing (authors: ``loss < max(buffer)`` would still drop a batch's new maxima).
      - non-finite losses (NaN: no valid token) get weight 0 and do not enter the buffer; the buffer is float64.
    """

    needs_losses = True
    supports_rescale = True
    needs_run_length = True

    def __init__(
        self,
        drop_fraction: float = 0.4,
        buffer_size: int | None = None,
        min_samples: int | None = None,
        recompute_every: int | None = None,
        mode: str = "auto",
    ):
        self.mode = _as_mode(mode, "truncation")
        self.drop_fraction = _as_float(drop_fraction, "drop_fraction", "truncation")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(
                f"sample_weighting='truncation': `drop_fraction` must be in [0, 1) (the fraction of samples dropped), "
                f"got {drop_fraction!r}."
            )
        # The sizes left to the run (None): resolved by set_run_length, or to the authors' 10 000 if it never comes.
        self.requested = {"buffer_size": buffer_size, "min_samples": min_samples, "recompute_every": recompute_every}
        for name, minimum in (("buffer_size", 1), ("min_samples", 0), ("recompute_every", 1)):
            if self.requested[name] is not None:
                self.requested[name] = _as_int(self.requested[name], name, "truncation", minimum)
        self.run_samples: int | None = None
        self._resolve_sizes(TRUNCATION_AUTHORS_WINDOW)
        self.warnings: list[str] = []  # what set_run_length warned about (tests and the model card read it)

    def _resolve_sizes(self, window: int) -> None:
        """Set buffer/min_samples/recompute from the request, ``window`` standing in for every ``None``; empties the
        buffer (only called before the first step)."""
        self.buffer_size = self.requested["buffer_size"] or window
        self.min_samples = window if self.requested["min_samples"] is None else self.requested["min_samples"]
        self.recompute_every = self.requested["recompute_every"] or self.buffer_size
        self.buffer = torch.zeros(self.buffer_size, dtype=torch.float64)
        self.position = 0  # next write index
        self.filled = 0  # valid entries in the buffer (≤ buffer_size)
        self.seen = 0  # finite losses pushed since the start
        self.since_recompute = 0  # losses pushed since the cutoff was last computed
        self.cutoff = float("inf")
        self.has_cutoff = False

    def set_run_length(self, run_samples: int) -> None:
        """Called by the glue before the first step with the number of samples the run will see (``max_steps`` ×
        global batch): resolves the ``None`` sizes to ``truncation_window(run_samples)`` and warns (``logging`` and
        :attr:`warnings`) when an explicit ``min_samples`` leaves truncation nothing to act on. After a resume the
        checkpoint's sizes win (:meth:`load_state_dict`), so the run continues exactly."""
        self.run_samples = _as_int(run_samples, "run_samples", "truncation", 0)
        if self.seen == 0:
            self._resolve_sizes(truncation_window(self.run_samples))
        if self.drop_fraction > 0 and self.min_samples >= self.run_samples:
            message = (
                f"sample_weighting='truncation': `min_samples={self.min_samples}` but the run will see only "
                f"{self.run_samples} samples (max_steps × global batch), so nothing will ever be dropped; leave "
                f"`min_samples` unset (it then scales with the run: {truncation_window(self.run_samples)} here) or "
                "set it below the run's sample count."
            )
            self.warnings.append(message)
            logging.getLogger(__name__).warning(message)

    def _refresh_cutoff(self) -> None:
        if self.drop_fraction == 0.0 or self.filled == 0 or self.seen < self.min_samples:
            return
        if self.has_cutoff and self.since_recompute < self.recompute_every:
            return
        q = torch.quantile(self.buffer[: self.filled], 1.0 - self.drop_fraction, interpolation="linear")
        self.cutoff = float(q)
        self.has_cutoff = True
        self.since_recompute = 0

    def _push(self, values: torch.Tensor) -> None:
        n = int(values.numel())
        if n == 0:
            return
        kept = values[-self.buffer_size :]  # a batch longer than the buffer: only its last entries survive
        start = (self.position + n - kept.numel()) % self.buffer_size
        index = (start + torch.arange(kept.numel())) % self.buffer_size
        self.buffer[index] = kept
        self.position = (self.position + n) % self.buffer_size
        self.filled = min(self.buffer_size, self.filled + n)
        self.seen += n
        self.since_recompute += n

    def weights(self, ctx: SampleContext) -> torch.Tensor:
        """Score mode: the whole step at once (:meth:`begin_step`, :meth:`local_weights`, :meth:`end_step`)."""
        self.begin_step(ctx.step)
        out = self.local_weights(ctx)
        self.end_step(ctx)
        return out

    def begin_step(self, step: int) -> None:
        self._refresh_cutoff()

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """1 for a kept sample (loss ≤ the cutoff of the buffer before this step), 0 for a dropped or NaN one."""
        losses = _global_losses(ctx, "truncation")
        valid = torch.isfinite(losses)
        keep = valid & (losses <= self.cutoff) if self.has_cutoff else valid
        return _finish(keep.to(torch.float64), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Push the step's finite global losses into the ring buffer (in the glue's fixed order)."""
        losses = _global_losses(ctx, "truncation")
        self._push(losses[torch.isfinite(losses)])

    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer.clone(),
            "position": self.position,
            "filled": self.filled,
            "seen": self.seen,
            "since_recompute": self.since_recompute,
            "cutoff": self.cutoff,
            "has_cutoff": self.has_cutoff,
            "config": {
                "drop_fraction": self.drop_fraction,
                "buffer_size": self.buffer_size,
                "min_samples": self.min_samples,
                "recompute_every": self.recompute_every,
            },
        }

    def load_state_dict(self, state: dict) -> None:
        saved_size = int(state["buffer"].numel())
        config = state.get("config", {})
        for name in ("buffer_size", "min_samples", "recompute_every"):
            # sizes left to the run: take the ones the checkpointed run resolved, so resuming continues exactly even
            # if this run's length (hence its window) differs
            if self.requested[name] is None and name in config:
                setattr(self, name, int(config[name]))
        if saved_size != self.buffer_size:
            raise ValueError(
                f"sample_weighting='truncation': the checkpoint's loss buffer has {saved_size} entries but this run has "
                f"`buffer_size={self.buffer_size}`; resume with the original `buffer_size`."
            )
        self.buffer = state["buffer"].detach().to(device="cpu", dtype=torch.float64).clone()
        self.position = int(state["position"])
        self.filled = int(state["filled"])
        self.seen = int(state["seen"])
        self.since_recompute = int(state["since_recompute"])
        self.cutoff = float(state["cutoff"])
        self.has_cutoff = bool(state["has_cutoff"])


# ---- STORM-like on-the-fly meta loss rescaling (Heck et al., AAAI 2025) ----------------------------------------------

STORM_FEATURES = ("loss", "entropy", "loss_change")
"""Columns of :func:`sample_features`."""


def sample_features(
    losses: torch.Tensor, entropies: torch.Tensor | None = None, prev_losses: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw per-sample rescaler features ``(N, 3)``: ``[ℓ_i, H_i, ℓ_i − b_i]``.

    - ``ℓ_i``: the sample's mean token loss;
    - ``H_i``: the mean entropy of the model's predictive distribution over the sample's valid tokens (a confidence
      signal that does not need the label); NaN column when ``entropies`` is None;
    - ``ℓ_i − b_i``: the loss relative to a baseline ``b_i`` (``prev_losses``), e.g. the running mean loss of the
      sample's domain before this step (what :class:`MetaRescaler` passes): positive for a sample harder than its
      domain currently is; NaN column when ``prev_losses`` is None.

    Heck et al. build their features from the model's own predictions and losses over ``G`` forward passes; their
    feature list is not verified here (docs/methods.md#storm), and these single-pass features are this library's
    choice. Non-finite inputs stay non-finite (NaN/inf) so the caller can mask them; float32.
    """
    loss = torch.as_tensor(losses).detach().to(torch.float32).flatten()
    nan = torch.full_like(loss, float("nan"))
    ent = nan if entropies is None else torch.as_tensor(entropies).detach().to(loss).flatten()
    if prev_losses is None:
        change = nan
    else:
        change = loss - torch.as_tensor(prev_losses).detach().to(loss).flatten()
    return torch.stack([loss, ent, change], dim=1)


class RescalerNet(nn.Module):
    """``Ω_ω``: a tiny MLP from standardized features ``(N, F)`` to a positive scale per sample ``(N,)``.

    ``Linear(F, hidden) → tanh → Linear(hidden, 1) → softplus``. The last layer starts at weight 0 and bias
    ``log(e − 1)``, so every output is exactly ``softplus(log(e − 1)) = 1`` at initialization: training starts
    unweighted and departs from it only as far as the meta objective pushes. The first layer is initialized from a
    private generator seeded with ``seed`` (identical on every rank, and the global RNG is not consumed).
    """

    def __init__(self, num_features: int = len(STORM_FEATURES), hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hidden = nn.Linear(num_features, hidden)
            self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.fill_(math.log(math.e - 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.out(torch.tanh(self.hidden(features)))).squeeze(-1)


def meta_objective(scales: torch.Tensor, per_sample_losses_after_lookahead: torch.Tensor) -> torch.Tensor:
    """STORM's self-taught meta loss on a meta batch drawn from the training data itself::

        L_meta = Σ_j s_j ℓ_j(θ') / Σ_j s_j          s_j = Ω_ω(F_j),  θ' = θ − η ∇_θ L_train(θ; ω)

    Both arguments may carry gradients to ω: through ``scales`` (the "outer" term of Heck et al.'s Algorithm 1: the
    meta batch is itself rescaled, which is how the method needs no clean validation set) and through the losses at
    the look-ahead parameters θ'(ω) (the "meta" term). Normalizing by ``Σ s`` makes the objective invariant to a global
    scale of Ω (otherwise the outer term would simply shrink every scale). Samples with a non-finite loss are left out;
    returns 0 (still connected to ``scales``) when none is left.
    """
    losses = per_sample_losses_after_lookahead.flatten()
    s = scales.flatten()
    valid = torch.isfinite(losses.detach())
    if not bool(valid.any()):
        return (s * 0.0).sum()
    s, losses = s[valid], losses[valid].to(s.dtype)
    return (s * losses).sum() / s.sum().clamp(min=1e-12)


def lookahead_surrogate(
    train_scales: torch.Tensor,
    directional_derivatives: torch.Tensor,
    lookahead_lr: float,
    static: torch.Tensor | None = None,
    denominators: torch.Tensor | None = None,
) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ω is the meta gradient through the one-step look-ahead, obtained without
    differentiating through the model (no ``create_graph``, no Hessian)::

        S(ω) = −η Σ_i c_i s_i(ω) d_i / Σ_k c_k s_k(ω) D_k,      d_i = ⟨∇_θ N_i(θ), g_val⟩  (detached)

    for a training step whose loss is ``L_train = Σ_i c_i s_i N_i(θ) / Σ_k c_k s_k D_k``
    (docs/methods.md#normalization): ``N_i`` the sample's numerator (its token-loss sum in token normalization, its
    mean token loss in sample normalization), ``D_i`` its share of the denominator (its token count, or 1), ``c_i`` the
    static part of its weight (``static``: the ``sample_weight`` column × domain factor; default 1), and ``g_val = ∇_θ
    L_meta(θ')`` the gradient of :func:`meta_objective` at the look-ahead ``θ' = θ − η ∇_θ L_train``. Then
    ``∂S/∂s_k = −η c_k (d_k − D_k d̄) / Z = ∂L_meta(θ'(ω))/∂s_k`` exactly (``Z = Σ c s D``, ``d̄ = Σ c s d / Z =
    ⟨∇L_train, g_val⟩``): θ' is linear in the normalized weights at fixed θ, so ``∂θ'/∂s_k = −η c_k (∇N_k − D_k
    ∇L_train) / Z`` involves no second derivative of the model (the tests check it against the second-order graph,
    on a regression model here and on the tiny Llama through the trainer). With ``static`` and ``denominators``
    ``None`` this is ``−η Σ_i (s_i / Σ s) d_i``. The ``d_i`` for all samples at once come from two extra forwards by
    central differences, ``d_i ≈ (N_i(θ + δ g_val) − N_i(θ − δ g_val)) / (2δ)``: the only approximation.
    Non-finite ``d_i`` (samples without a valid token) are left out. The derivation is the first-order form of the
    Meta-Weight-Net / learning-to-reweight look-ahead gradient that Heck et al. (AAAI 2025) build STORM on.
    """
    d = directional_derivatives.detach().flatten().to(train_scales.dtype)
    s = train_scales.flatten()
    c = torch.ones_like(d) if static is None else static.detach().flatten().to(d)
    den = torch.ones_like(d) if denominators is None else denominators.detach().flatten().to(d)
    valid = torch.isfinite(d) & torch.isfinite(c) & torch.isfinite(den)
    if not bool(valid.any()):
        return (s * 0.0).sum()
    s, d, c, den = s[valid], d[valid], c[valid], den[valid]
    return -float(lookahead_lr) * (c * s * d).sum() / (c * s * den).sum().clamp(min=1e-12)


def scales_kl_to_uniform(scales: torch.Tensor) -> torch.Tensor:
    """``KL(v̂ ‖ uniform) = Σ_i v̂_i log(N v̂_i)`` with ``v̂ = s / Σ s`` over the finite scales (0 when all are equal),
    differentiable w.r.t. the scales. :class:`MetaRescaler`'s regularizer (``kl_weight``): the same entropy term as
    Sow et al.'s ``r·KL(v ‖ uniform)`` (their weights solve ``max_v Σ v f − r KL``). Not in Heck et al.'s description:
    it is this library's guard against the collapse measured without it (see :class:`MetaRescaler`)."""
    s = scales.flatten()
    valid = torch.isfinite(s.detach())
    if int(valid.sum()) < 2:
        return (s * 0.0).sum()
    s = s[valid]
    v = s / s.sum().clamp(min=1e-12)
    return (v * torch.log((v * v.numel()).clamp(min=1e-12))).sum()


@register_sample_weighting("storm")
class MetaRescaler(SampleWeighting):
    """STORM-like self-taught on-the-fly meta loss rescaling — after Heck et al., "Learning from Noisy Labels via
    Self-Taught On-the-Fly Meta Loss Rescaling", AAAI 2025 (docs/methods.md#storm). The authors' code (university
    GitLab) was not readable here: the features, the architecture of Ω and the normalizations below are this library's
    choices and are documented as such; only the scheme (a rescaler fed with the model's own signals, meta-learned
    through a one-step look-ahead on batches drawn from the noisy training data, the meta batch itself rescaled)
    follows the paper.

    This class holds Ω (:attr:`rescaler`, a :class:`RescalerNet`), its optimizer (:attr:`meta_optimizer`, Adam) and the
    running feature statistics. :meth:`weights` is a no-grad forward: ``v_i = Ω(F_i) / mean_j Ω(F_j)`` over the
    samples with a finite loss (0 for the others), times the static ``sample_weight`` column if any.

    Features (:func:`sample_features`, standardized): the sample's loss; its mean token entropy, read from
    ``ctx.features["entropy"]`` when given (the trainer glue does not compute it — it would need the full-vocabulary
    logits the fused path avoids — so in training it is a constant 0 column: loss-only features); and its loss minus
    the running mean loss of its domain before this step (``ctx.domains``; one global running mean when there are no
    domains; ``ctx.features["prev_loss"]`` overrides the baseline). Standardization: ``(x − μ)/√(σ² + 1e-6)`` clamped
    to [−5, 5], with per-feature running mean/variance updated once per step as in BatchNorm (``μ ← m μ + (1 − m)
    batch mean``, same for the variance, ``m = feature_momentum``; the first batch initializes them). Non-finite
    features are set to 0 and left out of the statistics.

    Modes (:data:`SAMPLE_MODES`): ``"score"``: :meth:`weights` updates the statistics with the step's global batch,
    then weighs it (``v = Ω(F)/mean Ω(F)``). ``"rescale"`` (default through ``"auto"``): :meth:`local_weights` gives
    ``u_i = Ω(F_i)`` per micro-batch from the statistics *before* the step (a domain never seen before gets a 0
    loss-change feature), the glue divides by the global ``Σ u``, and :meth:`end_step` updates the statistics with the
    global batch. The first step has no statistics yet: every feature is 0 and the weights are uniform in both modes.

    Args:
        hidden: width of Ω's hidden layer (16).
        meta_lr: Adam learning rate of Ω (1e-3).
        meta_every: a meta step every this many optimizer steps (1); see :meth:`should_meta_step`.
        feature_momentum: ``m`` of the running feature statistics and of the per-domain loss baselines (0.99).
        seed: seed of Ω's initialization (0), the same on every rank.
        max_grad_norm: clip Ω's gradient to this norm in :meth:`meta_update` (1.0; ``None`` for no clipping).
        kl_weight: ``λ`` of the regularizer ``λ · KL(v̂_B ‖ uniform)`` added to the meta objective
            (:func:`scales_kl_to_uniform` of the training batch's scales; 1.0; 0 for the plain objective). Why: the
            self-taught outer term ``∂/∂s_k Σ s ℓ / Σ s = (ℓ_k − L)/Σ s`` always moves weight towards the samples
            with the lowest loss — the right direction for noisy *labels* (the paper's setting), but in language-model
            pretraining the lowest losses are redundant text. On the built-in corpus (400 steps, ``meta_lr=1e-2``,
            ``benchmarks/results/sample_effectiveness_long_seed0*.md``) Ω moved the weight onto the repetitive domain:
            without the term ESS 1.9 of 16 samples and clean held-out loss +0.73 vs uniform; with ``kl_weight=1`` ESS
            5.7 of 16 and +0.61. The term bounds the collapse (the optimum of outer term + KL alone is
            ``v ∝ exp(−ℓ/λ)``), it does not change its direction: for pretraining data prefer ``loss``.
        mode: ``"auto"`` (default), ``"rescale"`` or ``"score"``; see above.

    The meta step (``WeightingMixin._storm_meta_step``), every ``meta_every`` steps, after the step's last backward
    (and the rescale of its gradients) and before clipping and the model's ``optimizer.step()``; every per-sample
    tensor below is over the *global* batch (all-gathered), so every rank computes the same ω:

    1. Training batch B (this step): ``F_B`` = the features its weights were computed from (:meth:`step_features`),
       train scales ``s = Ω(F_B)`` *with* graph to ω. ``.grad`` holds ``g_train = ∇_θ Σ v̂_i ℓ_i`` (v̂ ∝ weights).
    2. Look-ahead ``θ' = θ − η g_train`` in place (η: the optimizer's current learning rate; an SGD look-ahead, as in
       Meta-Weight-Net, whatever the model's optimizer; θ is copied and restored exactly afterwards).
    3. Meta batch V = the **previous** step's batch (a batch of the noisy training data itself, independent of B,
       kept in memory and in the checkpoint) with the features ``F_V`` its own step used, so that ``s_V = Ω(F_V)`` is
       known before V's forward. At θ', micro-batch by micro-batch (memory as in training): forward, then backward of
       ``Σ_local s_V,j ℓ_j(θ') / Σ_global s_V``; the gradients are summed over ranks with one all-reduce: ``g_val =
       ∇_θ meta_objective(s_V, ℓ_V(θ'))``.
    4. Restore θ; two no-grad forwards of B at ``θ ± δ g_val`` (δ = 0.01 / ‖g_val‖, as DARTS) give
       ``d_i ≈ (ℓ_i(θ + δ g_val) − ℓ_i(θ − δ g_val)) / 2δ``; restore θ and ``.grad = g_train``; all-gather d and ℓ_V.
    5. ``self.meta_update(meta_objective(s_V, ℓ_V(θ')) + lookahead_surrogate(s, d, η) + λ KL(s/Σs ‖ uniform))``: the
       first term is the outer term (∇_ω through ``s_V``: the meta batch is itself rescaled, so no clean set is
       needed), the second the meta term (∇_ω through ``s``, exact for the look-ahead by :func:`lookahead_surrogate`),
       the third this library's regularizer (``kl_weight``).

    The first step (no V yet) has no meta step. What is differentiated: only ω; never the model twice. Cost per meta
    step: one forward + backward of V and two forwards of B, measured +1.8-2.5 training steps (mean CPU time per
    step vs static weights on the tiny benchmark: 3.0× with a meta step every step, 1.6× with ``meta_every=4``, see
    ``benchmarks/results/overhead_sample_weighting.md``; amortize with ``meta_every``); memory: parameter-sized copies of θ,
    ``g_train`` and ``g_val``; nothing second-order. The textbook alternative — θ' built with ``create_graph=True``
    and one ``backward`` of ``meta_objective(s_V, ℓ_V(θ'(ω)))`` — gives the same gradient (up to the finite
    difference) but needs double backward through the model (not available with fused/flash kernels, FSDP or ZeRO-3)
    and about 3× the memory. The meta step needs the gradients in ``param.grad``: single process, DDP or FSDP2 (every
    update is elementwise, so it runs on each rank's shards; only ‖g_val‖ takes the shards' partial sums and one
    all-reduce). DeepSpeed is refused at setup: its engine keeps the gradients (partitioned under ZeRO-2/3).

    How this differs from the paper's description (Heck et al., AAAI 2025; their code was not readable here): the
    features are single-pass (loss, loss change vs. the domain's running mean; no entropy, no statistics over G
    forward passes); Ω is a 2-layer MLP with a softplus output started at exactly 1; the meta batch is the previous
    training batch rather than a separately drawn one; the look-ahead is first-order by finite differences rather than
    through a second-order graph; weights are normalized by their step-global sum (docs/methods.md#normalization).
    """

    needs_losses = True
    supports_rescale = True
    needs_meta_step = True
    """The glue runs :meth:`WeightingMixin._storm_meta_step` after each step's backward (every ``meta_every``)."""

    def __init__(
        self,
        hidden: int = 16,
        meta_lr: float = 1e-3,
        meta_every: int = 1,
        feature_momentum: float = 0.99,
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
        kl_weight: float = 1.0,
        mode: str = "auto",
    ):
        self.mode = _as_mode(mode, "storm")
        self.kl_weight = _as_float(kl_weight, "kl_weight", "storm")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"sample_weighting='storm': `kl_weight` must be a finite number ≥ 0, got {kl_weight!r}.")
        self.last_features: torch.Tensor | None = None  # score mode: the features :meth:`weights` last used
        self.hidden = _as_int(hidden, "hidden", "storm", 1)
        self.meta_lr = _as_float(meta_lr, "meta_lr", "storm")
        if not (self.meta_lr > 0 and math.isfinite(self.meta_lr)):
            raise ValueError(f"sample_weighting='storm': `meta_lr` must be a finite number > 0, got {meta_lr!r}.")
        self.meta_every = _as_int(meta_every, "meta_every", "storm", 1)
        self.feature_momentum = _as_float(feature_momentum, "feature_momentum", "storm")
        if not 0.0 <= self.feature_momentum < 1.0:
            raise ValueError(
                f"sample_weighting='storm': `feature_momentum` must be in [0, 1), got {feature_momentum!r}."
            )
        self.seed = _as_int(seed, "seed", "storm", 0)
        self.max_grad_norm = None
        if max_grad_norm is not None:
            self.max_grad_norm = _as_float(max_grad_norm, "max_grad_norm", "storm")
            if not self.max_grad_norm > 0:
                raise ValueError(
                    f"sample_weighting='storm': `max_grad_norm` must be > 0 or None, got {max_grad_norm!r}."
                )
        self.num_features = len(STORM_FEATURES)
        self.rescaler = RescalerNet(self.num_features, self.hidden, self.seed)
        self.meta_optimizer = torch.optim.Adam(self.rescaler.parameters(), lr=self.meta_lr)
        self.feature_mean = torch.zeros(self.num_features, dtype=torch.float64)
        self.feature_var = torch.ones(self.num_features, dtype=torch.float64)
        self.feature_seen = torch.zeros(self.num_features, dtype=torch.bool)
        self.domain_loss = torch.zeros(0, dtype=torch.float64)  # running mean loss per domain index
        self.domain_seen = torch.zeros(0, dtype=torch.bool)
        self.meta_steps = 0

    # -- features ---------------------------------------------------------------------------------------------------

    def _baselines(
        self, losses: torch.Tensor, domains: torch.Tensor | None, update: bool, unseen_from_batch: bool = True
    ) -> torch.Tensor:
        """Running mean loss of each sample's domain before this batch (a domain seen for the first time: its mean in
        this batch, or NaN when not ``unseen_from_batch``); updates the running means when ``update``."""
        n = losses.numel()
        dom = torch.zeros(n, dtype=torch.long) if domains is None else domains.detach().to("cpu", torch.long).flatten()
        if dom.numel() != n:
            raise ValueError(f"sample_weighting='storm': {dom.numel()} domain indices for {n} losses.")
        size = max(int(dom.max()) + 1 if n else 0, self.domain_loss.numel())
        pad = size - self.domain_loss.numel()
        running = torch.cat([self.domain_loss, torch.zeros(pad, dtype=torch.float64)])
        seen = torch.cat([self.domain_seen, torch.zeros(pad, dtype=torch.bool)])
        valid = torch.isfinite(losses)
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, dom[valid], losses[valid])
        counts = torch.zeros(size, dtype=torch.float64).index_add_(0, dom[valid], torch.ones_like(losses[valid]))
        present = counts > 0
        batch_mean = torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums))
        unseen = batch_mean if unseen_from_batch else torch.full_like(batch_mean, float("nan"))
        baselines = torch.where(seen, running, unseen)[dom]
        if update:
            m = self.feature_momentum
            updated = torch.where(seen, m * running + (1 - m) * batch_mean, batch_mean)
            self.domain_loss = torch.where(present, updated, running)
            self.domain_seen = seen | present
        return baselines

    def features(self, ctx: SampleContext, update_stats: bool = False, state_only: bool = False) -> torch.Tensor:
        """Standardized features ``(N, 3)`` float32 of the samples in ``ctx`` (on the rescaler's device).

        With ``update_stats`` the running feature statistics and domain baselines are updated first, as
        :meth:`weights` does once per step; the meta step's extra calls leave them alone. With ``state_only`` (rescale
        mode) each row depends on the state and that sample alone (a domain not seen before gets a NaN baseline,
        hence a 0 feature), so any split of the batch gives the same rows.
        """
        losses = _global_losses(ctx, "storm")
        extra = getattr(ctx, "features", None) or {}
        entropies = extra.get("entropy")
        prev = extra.get("prev_loss")
        if prev is None:
            prev = self._baselines(losses, ctx.domains, update_stats, unseen_from_batch=not state_only)
        raw = sample_features(losses, entropies, prev).to(torch.float64)
        finite = torch.isfinite(raw) & torch.isfinite(losses).unsqueeze(1)
        if update_stats:
            m = self.feature_momentum
            for j in range(self.num_features):
                col = raw[finite[:, j], j]
                if col.numel() == 0:
                    continue
                mean = col.mean()
                var = col.var(unbiased=False)
                if bool(self.feature_seen[j]):
                    self.feature_mean[j] = m * self.feature_mean[j] + (1 - m) * mean
                    self.feature_var[j] = m * self.feature_var[j] + (1 - m) * var
                else:
                    self.feature_mean[j], self.feature_var[j] = mean, var
                    self.feature_seen[j] = True
        z = (raw - self.feature_mean) / torch.sqrt(self.feature_var + 1e-6)
        z = torch.where(finite & self.feature_seen, z, torch.zeros_like(z)).clamp(-5.0, 5.0)
        return z.to(self._device(), torch.float32)

    def _device(self) -> torch.device:
        return next(self.rescaler.parameters()).device

    def scales(self, features: torch.Tensor) -> torch.Tensor:
        """``Ω_ω(F)`` with graph to ω (for the meta step); ``features`` from :meth:`features`."""
        return self.rescaler(features.to(self._device(), torch.float32))

    # -- weights ------------------------------------------------------------------------------------------------------

    def weights(self, ctx: SampleContext) -> torch.Tensor:
        """Score mode: update the statistics with the global batch, then ``v = Ω(F) / mean Ω(F)``."""
        feats = self.features(ctx, update_stats=True)
        self.last_features = feats.detach()
        with torch.no_grad():
            s = self.scales(feats).detach().to("cpu", torch.float64)
        valid = torch.isfinite(_global_losses(ctx, "storm")) & torch.isfinite(s)
        out = torch.zeros_like(s)
        if bool(valid.any()):
            out[valid] = s[valid] / s[valid].mean().clamp(min=1e-12)
        return _finish(out, ctx)

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """Rescale mode: ``u_i = Ω(F_i)`` from the statistics before the step (unnormalized; any subset)."""
        feats = self.features(ctx, state_only=True)
        with torch.no_grad():
            s = self.scales(feats).detach().to("cpu", torch.float64)
        valid = torch.isfinite(_global_losses(ctx, "storm")) & torch.isfinite(s)
        return _finish(torch.where(valid, s, torch.zeros_like(s)), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Rescale mode: update the running statistics with the step's global batch."""
        self.features(ctx, update_stats=True)

    def step_features(self, ctx: SampleContext, mode: str) -> torch.Tensor:
        """The features the current step's weights were computed from (global batch ``ctx``): in score mode those of
        the last :meth:`weights` call, in rescale mode the state-only features (call it before :meth:`end_step`)."""
        if mode == "score":
            if self.last_features is None or self.last_features.shape[0] != _global_losses(ctx, "storm").numel():
                raise RuntimeError("MetaRescaler.step_features: call weights(ctx) on this step's batch first.")
            return self.last_features
        return self.features(ctx, state_only=True)

    # -- meta step ----------------------------------------------------------------------------------------------------

    def should_meta_step(self, step: int) -> bool:
        """Whether the glue runs a meta step after ``step`` completed optimizer steps."""
        return step % self.meta_every == 0

    def meta_update(self, objective: torch.Tensor) -> float:
        """One Adam step of ω on ``objective`` (a scalar with graph to Ω's parameters, e.g.
        ``meta_objective(...) + lookahead_surrogate(...)``). Gradients are taken w.r.t. ω only
        (``torch.autograd.grad``), so the model's ``.grad`` is never touched. Returns the gradient norm before
        clipping. Inputs must be identical on every rank (global tensors) so that ω stays identical everywhere.
        """
        params = list(self.rescaler.parameters())
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_steps += 1
        return float(norm)

    # -- state --------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "rescaler": {k: v.detach().clone() for k, v in self.rescaler.state_dict().items()},
            "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
            "feature_mean": self.feature_mean.clone(),
            "feature_var": self.feature_var.clone(),
            "feature_seen": self.feature_seen.clone(),
            "domain_loss": self.domain_loss.clone(),
            "domain_seen": self.domain_seen.clone(),
            "meta_steps": self.meta_steps,
            "config": {"hidden": self.hidden, "num_features": self.num_features},
        }

    def load_state_dict(self, state: dict) -> None:
        config = state.get("config", {})
        if config.get("hidden", self.hidden) != self.hidden:
            raise ValueError(
                f"sample_weighting='storm': the checkpoint's rescaler has `hidden={config['hidden']}` but this run has "
                f"`hidden={self.hidden}`; resume with the original value."
            )
        self.rescaler.load_state_dict(state["rescaler"])
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))
        self.feature_mean = state["feature_mean"].detach().cpu().to(torch.float64).clone()
        self.feature_var = state["feature_var"].detach().cpu().to(torch.float64).clone()
        self.feature_seen = state["feature_seen"].detach().cpu().to(torch.bool).clone()
        self.domain_loss = state["domain_loss"].detach().cpu().to(torch.float64).clone()
        self.domain_seen = state["domain_seen"].detach().cpu().to(torch.bool).clone()
        self.meta_steps = int(state["meta_steps"])
