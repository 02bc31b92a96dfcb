"""Per-sample weighting strategies (METHODS §1).

Every strategy here returns one weight per sample of the set it is given; the Trainer glue turns them into the step
objective of METHODS §0 (``Σ v_i ℓ_i / Σ v_i`` in sample mode, ``Σ v_i w_t ℓ_t / Σ v_i w_t`` in token mode). The
loss-based strategies (``loss``, ``truncation``, ``storm``) declare ``needs_losses = True``: the glue then passes
``ctx.losses``, the per-sample mean token loss of the **global batch** of the optimizer step (all micro-batches of
the accumulation, all ranks, concatenated in a fixed order; NaN for a sample without a valid token). Because the input
is global and the computation deterministic, every rank computes the same weights and the same state updates, with
no communication inside the strategy; each rank then keeps its own slice (by *global* rank).

Contents:

- pure functions of Sow et al. (ICLR 2025): :func:`normalize_losses`, :func:`loss_strategy_scores`,
  :func:`softmax_weights`;
- ``static`` (:class:`StaticSampleWeighting`), ``loss`` (:class:`LossReweighting`), ``truncation``
  (:class:`LossTruncation`), ``storm`` (:class:`MetaRescaler`, with :class:`RescalerNet`, :func:`sample_features`,
  :func:`meta_objective` and :func:`lookahead_surrogate`).
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import nn

from ..registry import register_sample_weighting
from .base import SampleContext, SampleWeighting


@register_sample_weighting("static")
class StaticSampleWeighting(SampleWeighting):
    """Weights read from the dataset's ``sample_weight`` column (METHODS §1.4).

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

    Why mean 1 rather than sum 1: the glue divides the step objective by ``Σ v`` (METHODS §0), so a global scale
    cancels and the *relative* weights, which are exactly the paper's, are all that reaches the gradient. Mean-1 weights
    keep per-sample quantities (logged weighted losses, a static ``sample_weight`` column they are multiplied with,
    domain upweighting factors) on the same scale as in the unweighted run. The GPT-2 code does the same in effect: it
    multiplies the sum-1 weights back by the batch size (``* world_size * len(device_weights)``).

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


# ---- Sow et al., ICLR 2025: the strategy ------------------------------------------------------------------------------


@register_sample_weighting("loss")
class LossReweighting(SampleWeighting):
    """Dynamic loss-based sample reweighting — Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved Large
    Language Model Pretraining", ICLR 2025 (METHODS §1.1).

    Per optimizer step, over the global batch: ``h = normalize_losses(ℓ)``, ``f = loss_strategy_scores(h, strategy)``,
    ``v = softmax_weights(f, r)`` (mean 1), times the static ``sample_weight`` column if the dataset has one. Stateless:
    a pure function of ``ctx``, so there is nothing to checkpoint.

    Args:
        strategy: ``"linupper"`` (default), ``"quadratic"`` (alias ``"mid"``), ``"extremes"`` or ``"upper"``; see
            :func:`loss_strategy_scores`. Default ``linupper`` because it is the paper's general recommendation
            ("deprioritizing redundant or uninformative data tends to work best"): it lowers the weight of samples the
            model already fits while capping, not amplifying, the highest losses (noise, garbage), which is the safe
            choice for data of unknown quality; it is also what the 1.4B/7B ``fms-fsdp`` runs use (there named
            ``"upper"``) and what the authors combine with domain reweighting. Their GPT-2 configs use ``quadratic``
            (124M) and ``extremes`` (210M/684M).
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

    Divergences from the authors' code:
      - NaN (and ±inf) losses, e.g. a sample with no valid token, get weight 0 and are left out of the min/max and
        the softmax; the authors' code would turn every weight into NaN.
      - The weights are normalized by the glue's ``Σ v`` over the whole step (METHODS §0). The GPT-2 code divides the
        weighted sum by the local token count instead (``Σ N v_i n_i ℓ_i / Σ n_i``): the same gradient direction,
        a scale differing by ``Σ v_i n_i / Σ n_i``. ``fms-fsdp`` (equal-length sequences) is sample mode exactly.
      - The weights are computed over the step's *global* batch (all micro-batches and ranks), which equals the
        authors' all-gathered micro-batch when ``GA = 1`` (their setting); with ``GA > 1`` the batch over which min,
        max and softmax are taken is the whole step, so the result does not depend on how the step is split.
      - Each rank's slice is taken by global rank (``fms-fsdp`` slices by ``LOCAL_RANK``: wrong on several nodes);
        that is the glue's job.
    """

    needs_losses = True

    def __init__(
        self,
        strategy: str = "linupper",
        temperature: float = 1.0,
        warmup_steps: int = 0,
        warmup_temperature: float | None = None,
    ):
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
        losses = _global_losses(ctx, "loss")
        scores = loss_strategy_scores(normalize_losses(losses), self.strategy)
        return _finish(softmax_weights(scores, self.temperature_at(ctx.step)), ctx)


# ---- Kang & Hashimoto, ACL 2020: loss truncation ------------------------------------------------------------------------


@register_sample_weighting("truncation")
class LossTruncation(SampleWeighting):
    """Loss truncation — Kang & Hashimoto, "Improved Natural Language Generation via Loss Truncation", ACL 2020
    (METHODS §1.2; code ``ddkang/loss_dropper``, ``LossDropper``).

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
        buffer_size: ring-buffer length; default 10 000 as the authors (their buffer has ``recompute`` entries).
        min_samples: hot start: nothing is dropped before this many losses have been seen; default 10 000 as the
            authors (``min_count``). On a short fine-tuning run lower it: at 32 samples per step the default spends the
            first 313 steps untruncated.
        recompute_every: losses pushed between two cutoff computations; ``None`` (default) = ``buffer_size``, the
            authors' behaviour (their ``recompute`` is both the buffer length and the period).

    Cross-rank: the original keeps one buffer per process, fed with that process's samples. Here the input is the
    step's global batch (all ranks, fixed order), so the buffer, the counters and the cutoff are identical on every
    rank: the "reduced across ranks" version of METHODS §1.2, with no communication in this class.

    The glue must call :meth:`weights` exactly once per optimizer step, in training only (each call feeds the buffer).

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

    def __init__(
        self,
        drop_fraction: float = 0.4,
        buffer_size: int = 10000,
        min_samples: int = 10000,
        recompute_every: int | None = None,
    ):
        self.drop_fraction = _as_float(drop_fraction, "drop_fraction", "truncation")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(
                f"sample_weighting='truncation': `drop_fraction` must be in [0, 1) (the fraction of samples dropped), "
                f"got {drop_fraction!r}."
            )
        self.buffer_size = _as_int(buffer_size, "buffer_size", "truncation", 1)
        self.min_samples = _as_int(min_samples, "min_samples", "truncation", 0)
        self.recompute_every = (
            self.buffer_size if recompute_every is None else _as_int(recompute_every, "recompute_every", "truncation", 1)
        )
        self.buffer = torch.zeros(self.buffer_size, dtype=torch.float64)
        self.position = 0  # next write index
        self.filled = 0  # valid entries in the buffer (≤ buffer_size)
        self.seen = 0  # finite losses pushed since the start
        self.since_recompute = 0  # losses pushed since the cutoff was last computed
        self.cutoff = float("inf")
        self.has_cutoff = False

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
        losses = _global_losses(ctx, "truncation")
        valid = torch.isfinite(losses)
        self._refresh_cutoff()
        keep = valid & (losses <= self.cutoff) if self.has_cutoff else valid
        self._push(losses[valid])
        return _finish(keep.to(torch.float64), ctx)

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
    feature list is not verified here (METHODS §1.3), and these single-pass features are this library's choice.
    Non-finite inputs stay non-finite (NaN/inf) so the caller can mask them; float32.
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
    train_scales: torch.Tensor, directional_derivatives: torch.Tensor, lookahead_lr: float
) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ω is the meta gradient through the one-step look-ahead, obtained without
    differentiating through the model (no ``create_graph``, no Hessian)::

        S(ω) = −η Σ_i v̂_i(ω) d_i,    v̂_i = s_i / Σ_k s_k,    d_i = ⟨∇_θ ℓ_i(θ), g_val⟩  (detached)

    where ``g_val = ∇_θ Σ_j v̂_j^val ℓ_j(θ')`` is the gradient of :func:`meta_objective` w.r.t. the model at θ'.
    Then ``∂S/∂s_k = −η (d_k − Σ_i v̂_i d_i) / Σ s = ∂L_meta(θ'(ω))/∂s_k`` exactly: ``θ' = θ − η Σ v̂_i ∇ℓ_i(θ)`` is
    linear in v̂ at fixed θ, so ``∂θ'/∂s_k = −η (∇ℓ_k − ∇L_train) / Σ s`` involves no second derivative of the model
    (the tests check this against the second-order graph). The ``d_i`` for all samples at once come from two extra
    forwards by central differences, ``d_i ≈ (ℓ_i(θ + δ g_val) − ℓ_i(θ − δ g_val)) / (2δ)``: the only approximation.
    Non-finite ``d_i`` (samples without a valid token) are left out.
    """
    d = directional_derivatives.detach().flatten().to(train_scales.dtype)
    s = train_scales.flatten()
    valid = torch.isfinite(d)
    if not bool(valid.any()):
        return (s * 0.0).sum()
    s, d = s[valid], d[valid]
    return -float(lookahead_lr) * (s / s.sum().clamp(min=1e-12) * d).sum()


@register_sample_weighting("storm")
class MetaRescaler(SampleWeighting):
    """STORM-like self-taught on-the-fly meta loss rescaling — after Heck et al., "Learning from Noisy Labels via
    Self-Taught On-the-Fly Meta Loss Rescaling", AAAI 2025 (METHODS §1.3). The authors' code (university GitLab) was
    not readable here: the features, the architecture of Ω and the normalizations below are this library's choices
    and are documented as such; only the scheme (a rescaler fed with the model's own signals, meta-learned through a
    one-step look-ahead on batches drawn from the noisy training data, the meta batch itself rescaled) follows the
    paper.

    This class holds Ω (:attr:`rescaler`, a :class:`RescalerNet`), its optimizer (:attr:`meta_optimizer`, Adam) and the
    running feature statistics. :meth:`weights` is a no-grad forward: ``v_i = Ω(F_i) / mean_j Ω(F_j)`` over the
    samples with a finite loss (0 for the others), times the static ``sample_weight`` column if any.

    Features (:func:`sample_features`, standardized): the sample's loss; its mean token entropy, read from
    ``ctx.features["entropy"]`` when the glue provides it (a constant 0 column otherwise: loss-only features); and its
    loss minus the running mean loss of its domain before this step (``ctx.domains``; one global running mean when
    there are no domains; ``ctx.features["prev_loss"]`` overrides the baseline). Standardization: ``(x − μ)/√(σ² +
    1e-6)`` clamped to [−5, 5], with per-feature running mean/variance updated by :meth:`weights` as in BatchNorm
    (``μ ← m μ + (1 − m) batch mean``, same for the variance, ``m = feature_momentum``; the first batch initializes
    them). Non-finite features are set to 0 and left out of the statistics.

    Args:
        hidden: width of Ω's hidden layer (16).
        meta_lr: Adam learning rate of Ω (1e-3).
        meta_every: a meta step every this many optimizer steps (1); see :meth:`should_meta_step`.
        feature_momentum: ``m`` of the running feature statistics and of the per-domain loss baselines (0.99).
        seed: seed of Ω's initialization (0), the same on every rank.
        max_grad_norm: clip Ω's gradient to this norm in :meth:`meta_update` (1.0; ``None`` for no clipping).

    The meta step (in the trainer glue, every ``meta_every`` steps, after the step's usual backward and before the
    model's ``optimizer.step()``; all per-sample tensors over the global batch so every rank computes the same ω):

    1. Training batch B (this step), features ``F`` (as used by :meth:`weights`), train scales
       ``s = self.scales(F)`` *with* graph to ω. The usual backward gives ``g_train = ∇_θ Σ v̂_i ℓ_i`` (v̂ ∝ weights).
    2. Look-ahead ``θ' = θ − η g_train`` (η: the current learning rate; an SGD look-ahead, as in Meta-Weight-Net,
       whatever the model's optimizer), applied in place under ``no_grad`` and undone afterwards.
    3. Meta batch V drawn from the training data (e.g. the previous step's batch, kept as token ids: independent of B
       without a held-out set); at θ': one forward + backward of ``meta_objective(s_val.detach(), ℓ_val(θ'))`` with
       ``s_val = self.scales(F_val)`` (``F_val = self.features(ctx_val)`` from the same forward, stats not updated)
       gives ``g_val`` in ``.grad`` (the normalizer ``Σ s_val`` is over the global V: each rank backpropagates its
       local ``Σ s_j ℓ_j / Σ_global s · W`` so that DDP's mean restores the global gradient, as in METHODS §0).
    4. Restore θ; two no-grad forwards of B at ``θ ± δ g_val`` (δ = 0.01 / ‖g_val‖, as DARTS) give
       ``d_i ≈ (ℓ_i(θ + δ g_val) − ℓ_i(θ − δ g_val)) / 2δ``; all-gather d.
    5. ``self.meta_update(meta_objective(s_val, ℓ_val.detach()) + lookahead_surrogate(s, d, η))``: the first term
       is the outer term (∇_ω through ``s_val``), the second the meta term (∇_ω through ``s``); ℓ_val and d gathered.

    What is differentiated: only ω, through ``s`` (train scales, via the surrogate = the meta term) and ``s_val`` (the
    outer term); never the model. Cost per meta step: one forward + backward of V and two forwards of B, about +1.7
    training steps (≈ 2.7× a plain step; amortized by ``meta_every``); memory: parameter-sized copies of ``g_train``
    (the val backward overwrites ``.grad``, and the model's optimizer step needs it back), of ``g_val``, and of θ
    (or restore θ by adding ``η g_train`` back, exact only up to rounding); nothing second-order. The textbook
    alternative — θ' built with ``create_graph=True`` and one ``backward`` of ``meta_objective(s_val, ℓ_val(θ'(ω)))``
    — gives the same gradient (up to the finite difference) but needs double backward through the model (not
    available with fused/flash kernels, FSDP or ZeRO-3) and about 3× the memory. With DDP, ``g_val`` from a DDP
    backward is already averaged over ranks; under ZeRO-3/FSDP the ``θ ± δ g`` updates apply shard by shard.
    """

    needs_losses = True

    def __init__(
        self,
        hidden: int = 16,
        meta_lr: float = 1e-3,
        meta_every: int = 1,
        feature_momentum: float = 0.99,
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
    ):
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

    def _baselines(self, losses: torch.Tensor, domains: torch.Tensor | None, update: bool) -> torch.Tensor:
        """Running mean loss of each sample's domain before this batch (a domain seen for the first time: its mean in
        this batch); updates the running means when ``update``."""
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
        baselines = torch.where(seen, running, batch_mean)[dom]
        if update:
            m = self.feature_momentum
            updated = torch.where(seen, m * running + (1 - m) * batch_mean, batch_mean)
            self.domain_loss = torch.where(present, updated, running)
            self.domain_seen = seen | present
        return baselines

    def features(self, ctx: SampleContext, update_stats: bool = False) -> torch.Tensor:
        """Standardized features ``(N, 3)`` float32 of the samples in ``ctx`` (on the rescaler's device).

        With ``update_stats`` the running feature statistics and domain baselines are updated first, as
        :meth:`weights` does once per step; the meta step's extra calls leave them alone.
        """
        losses = _global_losses(ctx, "storm")
        extra = getattr(ctx, "features", None) or {}
        entropies = extra.get("entropy")
        prev = extra.get("prev_loss")
        if prev is None:
            prev = self._baselines(losses, ctx.domains, update_stats)
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
        feats = self.features(ctx, update_stats=True)
        with torch.no_grad():
            s = self.scales(feats).detach().to("cpu", torch.float64)
        valid = torch.isfinite(_global_losses(ctx, "storm")) & torch.isfinite(s)
        out = torch.zeros_like(s)
        if bool(valid.any()):
            out[valid] = s[valid] / s[valid].mean().clamp(min=1e-12)
        return _finish(out, ctx)

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
