"""Loss truncation — Kang & Hashimoto, "Improved Natural Language Generation via Loss Truncation", ACL 2020
(docs/methods.md#truncation).

Samples whose loss is above the ``(1 − drop_fraction)`` quantile of a ring buffer of recent losses get weight 0, the
others 1. Defaults: ``drop_fraction`` 0.4 (the authors'), buffer, hot start and recompute period all
``min(10 000, ceil(run_samples / 10))`` (the authors use 10 000). Source: ``ddkang/loss_dropper`` (``LossDropper``).
"""

from __future__ import annotations

import logging

import torch

from ...registry import register_sample_weighting
from ..base import SampleContext, SampleWeighting
from ..checks import choice, in_range, integer
from .base import arg, check_mode, finish_weights, global_losses

TRUNCATION_AUTHORS_WINDOW = 10000
"""``ddkang/loss_dropper``'s ``min_count`` = ``recompute`` = buffer length."""


def truncation_window(run_samples: int) -> int:
    """Buffer length, hot start and recompute period of loss truncation for a run of ``run_samples`` samples:
    ``min(10 000, ceil(run_samples / 10))``, at least 1 (see :class:`LossTruncation`)."""
    return max(1, min(TRUNCATION_AUTHORS_WINDOW, -(-int(run_samples) // 10)))


CUTOFF_RULES = ("quantile", "gap")


def largest_gap_cutoff(losses: torch.Tensor, drop_fraction: float) -> float:
    """The cutoff of ``cutoff="gap"`` (ours; not in the paper): the midpoint of the widest gap between consecutive
    sorted ``losses`` at or above their ``(1 − drop_fraction)`` quantile, so at most ``drop_fraction`` of them lie
    above it. When the highest losses form a separate cluster (corrupted rows: random tokens sit near ``log(vocab)``
    while clean rows spread below), the widest gap is the one between the clusters, and only that cluster is dropped
    instead of a fixed share that also takes the hardest clean rows. 1-D "natural breaks" with a single break,
    restricted to the quantile's tail. ``+inf`` (drop nothing) for fewer than 2 losses."""
    x = torch.sort(losses.to(torch.float64)).values
    n = x.numel()
    if n < 2:
        return float("inf")
    q = float(torch.quantile(x, 1.0 - drop_fraction, interpolation="linear"))
    first = int(torch.searchsorted(x, torch.tensor([q], dtype=torch.float64), right=False)[0])  # first value ≥ q
    start = max(first - 1, 0)  # the gap just below the quantile counts too (what the quantile rule would cut)
    gaps = x[start + 1 :] - x[start:-1]
    if gaps.numel() == 0:
        return float("inf")
    j = start + int(torch.argmax(gaps))
    return float((x[j] + x[j + 1]) / 2)


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
        cutoff: ``"quantile"`` (default, the paper's: drop the top ``drop_fraction``) or ``"gap"`` (ours:
            :func:`largest_gap_cutoff`, drop only above the widest gap within that top share).
        mode: ``"auto"`` (default), ``"rescale"`` or ``"score"`` (:data:`SAMPLE_MODES`). The cutoff applied to a step
            comes from earlier steps only, so both modes give the *same* weights: 1-2 above happen in
            :meth:`begin_step` and :meth:`local_weights` (each micro-batch from its own forward, the glue dividing by
            the global count of kept samples), 3 in :meth:`end_step` with the global batch; ``"score"`` only adds a
            scoring forward.

    The window (what every ``None`` size above resolves to): ``min(10 000, ceil(run_samples / 10))`` once the glue has
    told the strategy how many samples the run will see (:meth:`set_run_length`, called at the start of training
    with ``max_steps × global batch``), 10 000 (the authors' value) when it never does. Why: the authors' 10 000
    is a small share of their runs (summarization, several epochs of ~10^5-10^6 samples); in a run of 3 200 samples
    it is longer than the run, and truncation never drops anything. ``run_samples / 10`` keeps their proportions for
    short runs: the cutoff starts after the first tenth of the run and is refreshed nine more times. A value set
    explicitly is kept as given; if it is ``min_samples`` ≥ the run's samples, :meth:`set_run_length` warns with the
    numbers (truncation would then never act).

    Why the hot start and the recompute period stay one window (issue 23; 120 steps × 16 blocks, 30% of the blocks
    random tokens, four corpora, 3 seeds; docs/guidance.md#defaults-across-corpora-issue-23): a per-step diagnostic
    (``benchmarks/diag_truncation.py``, seed 0 of ``records`` and ``pydocs``) shows that once the first cutoff exists
    it drops every garbage block on every step (recall 1.00; false drops 0-27% of the clean blocks, ~14% being what
    ``drop_fraction`` 0.4 > 0.3 implies). What the default leaves is the first tenth of the run (steps 0-11 drop
    nothing) and a cutoff that lags the falling loss (steps 12-23 of ``records``: 7.62, above the batch's own 60th
    percentile 4.3-5.4, so it dropped the garbage only). Neither costs measurably: of the uniform → oracle gap
    (builtin/pydocs/records/ops) this default closed 67/53/49/75%, a cutoff recomputed every step 67/69/39/71%, with
    a hot start of one step 67/58/49/75% (differences under ~10 points are seed noise), and even weighting exactly the garbage 0 from the first step (the
    benchmark's ``known_drop``) closed 58/46/64/76%. A method that drops rows trains on ~70% of each batch where the
    oracle trains on a full clean batch; that, not the cutoff's timing, bounds its share of that gap here.

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
        cutoff: str = "quantile",
        mode: str = "auto",
    ):
        self.mode = check_mode(mode, "truncation")
        self.cutoff_rule = choice(cutoff, arg("truncation", "cutoff"), CUTOFF_RULES)
        self.drop_fraction = in_range(drop_fraction, arg("truncation", "drop_fraction"), 0, 1, high_open=True,
                                      hint=" (the fraction of samples dropped)")
        # The sizes left to the run (None): resolved by set_run_length, or to the authors' 10 000 if it never comes.
        self.requested = {"buffer_size": buffer_size, "min_samples": min_samples, "recompute_every": recompute_every}
        for name, minimum in (("buffer_size", 1), ("min_samples", 0), ("recompute_every", 1)):
            if self.requested[name] is not None:
                self.requested[name] = integer(self.requested[name], arg("truncation", name), minimum)
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
        self.run_samples = integer(run_samples, arg("truncation", "run_samples"), 0)
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
        filled = self.buffer[: self.filled]
        if self.cutoff_rule == "gap":
            self.cutoff = largest_gap_cutoff(filled, self.drop_fraction)
        else:
            self.cutoff = float(torch.quantile(filled, 1.0 - self.drop_fraction, interpolation="linear"))
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
        losses = global_losses(ctx, "truncation")
        valid = torch.isfinite(losses)
        keep = valid & (losses <= self.cutoff) if self.has_cutoff else valid
        return finish_weights(keep.to(torch.float64), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Push the step's finite global losses into the ring buffer (in the glue's fixed order)."""
        losses = global_losses(ctx, "truncation")
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
