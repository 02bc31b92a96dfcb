"""Dynamic loss-based sample reweighting — Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved Large
Language Model Pretraining", ICLR 2025 (docs/methods.md#sow).

Per step: ``h = normalize_losses(ℓ)`` in ``[−1, 1]``, a score ``f(h)`` per strategy (``linupper``, ``quadratic``,
``extremes``, ``upper``), weights ``v = N · softmax(f / r)``. Defaults: ``strategy="linupper"``, ``temperature`` r = 1.0
(both codes), no warm-up. Source: ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py`` and
``foundation-model-stack/fms-fsdp`` (branch ``reweighted-train``) ``fms_fsdp/utils/train_utils.py``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ...registry import register_sample_weighting
from ..base import SampleContext, SampleWeighting
from ..checks import integer, number
from ..watch import F64, WindowWatch, load_watch_state, watch_state
from .base import arg, check_mode, finish_weights, global_losses

LOSS_STRATEGIES = ("linupper", "quadratic", "extremes", "upper")
"""Canonical names of the score functions ``f(h)`` of Sow et al."""
LOSS_STRATEGY_ALIASES = {"mid": "quadratic"}
"""The GPT-2 repository's code name ``mid`` is the paper's ``quadratic``."""


def canonical_strategy(strategy) -> str:
    """The paper's name of a score function (the alias ``mid`` is ``quadratic``); an unknown name is an error that
    points out the naming trap of ``fms-fsdp`` (see :func:`loss_strategy_scores`)."""
    name = LOSS_STRATEGY_ALIASES.get(strategy, strategy) if isinstance(strategy, str) else None
    if name not in LOSS_STRATEGIES:
        raise ValueError(
            f"sample_weighting='loss': unknown `strategy={strategy!r}`; valid: {list(LOSS_STRATEGIES)} (alias "
            "'mid' = 'quadratic'). Naming trap: fms-fsdp's 'upper' is min(h+1, 1), which is 'linupper' here."
        )
    return name


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
    h = torch.as_tensor(h)
    name = canonical_strategy(strategy)
    if name == "linupper":
        return torch.minimum(h + 1.0, torch.ones_like(h))
    if name == "quadratic":
        return 1.0 - h * h
    if name == "extremes":
        return h.abs()
    return 0.5 * h + 0.5  # upper


def _softmax_inputs(scores: torch.Tensor, temperature: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The temperature ``r`` (> 0; ``inf`` allowed), the scores as float64 and the mask of the finite ones."""
    r = float(temperature)
    if not r > 0:
        raise ValueError(f"softmax temperature must be > 0 (float('inf') for uniform weights), got {temperature!r}.")
    f = torch.as_tensor(scores).to(torch.float64)
    return r, f, torch.isfinite(f)


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
    r, f, valid = _softmax_inputs(scores, temperature)
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
    r, f, valid = _softmax_inputs(scores, temperature)
    out = torch.zeros_like(f)
    out[valid] = 1.0 if math.isinf(r) else torch.exp((f[valid] - 1.0) / r)
    return out


TAIL_FRACTION = 0.1
"""The watched tail: the highest-loss tenth of a step's samples (at least one)."""


@dataclass(frozen=True)
class TailStats:
    """One step's losses and weights, seen from their high-loss *tail*: the top :data:`TAIL_FRACTION` of the samples
    by loss. (Not the samples above the mid-range, which ``linupper`` gives its top score: with a hard clean domain
    those are mostly clean samples whose loss does fall.)"""

    median: float
    tail_mean: float
    tail_share: float
    """Share of the samples in the tail."""
    tail_weight: float
    """Share of the step's weight the tail gets."""


TAIL_FIELDS = ("median", "tail_mean", "tail_share", "tail_weight")
"""The :class:`TailStats` fields, in the order of a :class:`StuckTailWatch` row."""


def tail_stats(losses: torch.Tensor, weights: torch.Tensor) -> TailStats | None:
    """:class:`TailStats` of one step's finite ``losses`` and their ``weights`` (None when fewer than 4 are finite)."""
    valid = torch.isfinite(losses)
    x, w = losses[valid], weights[valid]
    if x.numel() < 4:
        return None
    count = max(1, round(TAIL_FRACTION * x.numel()))
    tail = torch.zeros_like(x, dtype=torch.bool)
    tail[torch.argsort(x, descending=True, stable=True)[:count]] = True
    total = float(w.sum())
    return TailStats(median=float(x.median()), tail_mean=float(x[tail].mean()) if tail.any() else float(x.max()),
                     tail_share=float(tail.double().mean()), tail_weight=float(w[tail].sum()) / total if total else 0.0)


class StuckTailWatch(WindowWatch):
    """Detects the failure signature of loss-upweighting on noisy data, once per run.

    The signature (what random-token or corrupted samples look like to the method): over the run, the batch median
    loss falls (the model learns) while the mean loss of the high-loss tail does not fall with it, the tail stays well
    above the median, and the weighting gives that tail *more* than its share of the weight. Compared: the means of
    the first ``window`` watched steps and of the last ``window`` steps, once ``3·window`` steps were watched.
    Fires when the median fell by ≥ ``min_drop``, the tail by at most ``tail_ratio`` × the median's fall, the tail is
    ≥ ``min_gap`` nats above the median and gets more than its share of the weight. On clean data the tail is the
    hardest clean samples, and their loss falls too. The tail is the top tenth by loss: noise on fewer than about a
    tenth of the samples is not seen (nor does it do much harm).
    """

    def __init__(self, window: int = 10, min_drop: float = 0.05, tail_ratio: float = 0.2, min_gap: float = 0.5):
        super().__init__(window)
        self.min_drop, self.tail_ratio, self.min_gap = min_drop, tail_ratio, min_gap

    def observe(self, step: int, stats: TailStats | None) -> str | None:
        """Record one step; the description of the signature the first time it is seen, else None."""
        if stats is None or not self.record(step, torch.tensor([getattr(stats, f) for f in TAIL_FIELDS], dtype=F64)):
            return None
        early, late = (dict(zip(TAIL_FIELDS, rows.tolist())) for rows in self.means())
        median_drop = early["median"] - late["median"]
        tail_drop = early["tail_mean"] - late["tail_mean"]
        tail, median = late["tail_mean"], late["median"]
        share, weight = late["tail_share"], late["tail_weight"]
        if (median_drop >= self.min_drop and tail_drop <= self.tail_ratio * median_drop and tail - median >= self.min_gap
                and weight > share):
            self.fire()
            return (f"between steps {self.first_step} and {self.last_step} the median per-sample loss fell by "
                    f"{median_drop:.2f} nats but the highest-loss {share:.0%} of the samples (mean loss {tail:.2f} "
                    f"vs median {median:.2f}) fell by only {tail_drop:.2f}, and this weighting gives them {weight:.0%} of "
                    "the weight")
        return None


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
            ``r`` loses to uniform; on the tiny LM with 30% random-token blocks it is worse than uniform too
            (docs/guidance.md, sample weighting across corpora). For corrupted samples use ``truncation``.

            Run-time check: the method watches for that failure's signature (:class:`StuckTailWatch`: the median loss
            falls, a high-loss tail does not and gets more than its share of the weight) and warns once, naming what
            it saw and ``truncation`` as the alternative. ``watch=False`` turns the check off.
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
        watch: Warn once when the noisy-data failure signature shows (default True; see ``strategy``). The watch's
            windows are checkpointed with the weighting's state: a resumed run continues them and does not warn twice.

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
        watch: bool = True,
    ):
        self.mode = check_mode(mode, "loss")
        self.watch = StuckTailWatch() if watch else None
        self.previous_range: tuple[float, float] | None = None  # rescale mode: (min, max) of the last step's losses
        self.strategy = canonical_strategy(strategy)
        self.temperature = number(temperature, arg("loss", "temperature"), low=0, low_open=True, finite=False,
                                  hint=" (float('inf') for uniform weights)")
        self.warmup_steps = integer(warmup_steps, arg("loss", "warmup_steps"), 0)
        self.warmup_temperature = None
        if warmup_temperature is not None:
            self.warmup_temperature = number(warmup_temperature, arg("loss", "warmup_temperature"), low=0,
                                             low_open=True, finite=False, hint=" or None (uniform during warm-up)")

    def temperature_at(self, step: int) -> float:
        """The temperature in force after ``step`` optimizer steps (``inf`` = uniform)."""
        if step < self.warmup_steps:
            return float("inf") if self.warmup_temperature is None else self.warmup_temperature
        return self.temperature

    def weights(self, ctx: SampleContext) -> torch.Tensor:
        """Score mode: mean-1 weights of the global batch in ``ctx`` (stateless)."""
        losses = global_losses(ctx, "loss")
        scores = loss_strategy_scores(normalize_losses(losses), self.strategy)
        weights = softmax_weights(scores, self.temperature_at(ctx.step))
        self._check_tail(ctx.step, losses, weights)
        return finish_weights(weights, ctx)

    def _check_tail(self, step: int, losses: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Feed the step to the failure watch (after warm-up) and warn the first time it fires."""
        if self.watch is None or step < self.warmup_steps:
            return
        if weights is None:  # rescale mode: the step's softmax weights from its own range (what the glue's Z gives)
            weights = softmax_weights(loss_strategy_scores(normalize_losses(losses), self.strategy),
                                      self.temperature_at(step))
        seen = self.watch.observe(step, tail_stats(losses, weights))
        if seen:
            warnings.warn(
                f"sample_weighting='loss': {seen}. These samples do not learn (random tokens, corrupted or mislabelled "
                "data?) and loss-based reweighting up-weights exactly them; on noisy data it measured worse than no "
                "weighting (docs/guidance.md). Use sample_weighting='truncation' (drops the highest losses) instead, "
                "or clean the data; sample_weighting_kwargs={'watch': False} silences this check.",
                stacklevel=2,
            )

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """Rescale mode: ``u_i = exp((f_i − 1)/r)`` from the previous step's range (unnormalized; any subset)."""
        losses = global_losses(ctx, "loss")
        low, high = self.previous_range if self.previous_range is not None else (None, None)
        scores = loss_strategy_scores(normalize_losses_in_range(losses, low, high), self.strategy)
        return finish_weights(unnormalized_softmax_weights(scores, self.temperature_at(ctx.step)), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Rescale mode: remember the global min/max of this step's finite losses for the next step."""
        losses = global_losses(ctx, "loss")
        finite = losses[torch.isfinite(losses)]
        if finite.numel():
            self.previous_range = (float(finite.min()), float(finite.max()))
        self._check_tail(ctx.step, losses)

    def state_dict(self) -> dict:
        return {"previous_range": None if self.previous_range is None else list(self.previous_range),
                "watch": watch_state(self.watch)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("previous_range")  # a checkpoint of a score-mode run has none: start without a range
        self.previous_range = None if saved is None else (float(saved[0]), float(saved[1]))
        load_watch_state(self.watch, state)  # an older checkpoint has no watch state: the watch starts afresh
