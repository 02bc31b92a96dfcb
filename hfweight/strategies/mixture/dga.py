"""Dynamic Gradient Alignment (Fan et al. 2024): upweight the domains whose gradient aligns with a target set's
(docs/methods.md#dga).

Default (the paper's update): ``log α ← log α + η · ⟨g_d, g_target⟩ / mean_j ‖g_j‖`` every ``update_every`` steps
(``eta`` 1e-3, ``update_every`` 10; the normalization follows DoGE, ``Olivia-fsm/DoGE`` as adapted in
``HazyResearch/aioli`` ``trainer/doge_trainer.py``; no public DGA code). Options for junk domains (issue 23):
``normalize="cosine", eta=2, prior_pull=0.1, signal_clip=0.2`` — a clipped cosine signal and an entropy-regularized
step, ``log α ← (1 − ρ)·log α + ρ·log α_0 + η·s`` (fixed point ``α ∝ α_0·exp(η/ρ · s̄)``). Run-time check: a mixture
that does not move (``eta`` too small for the run) is warned once (:class:`InertMixtureWatch`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import choice, in_range, integer, number
from ..watch import load_watch_state, watch_state
from .base import F64, INITIAL_WEIGHTS, Controller, domain_vector, kwarg, mix_update, weight_spec

SIGNALS = ("doge", "cosine")


class InertMixtureWatch:
    """The failure signature of a step size too small for the run: a mixture that does not move from its start.

    After ``after`` updates (or half of the run's updates, if fewer), the largest relative change of a domain's
    weight, ``m = max_d |α_d / α0_d − 1|``, is extrapolated linearly to the run's number of updates; when even that
    stays below ``min_move`` (default 5%), the run is in effect sampling with the initial mixture: a change of a few
    percent of a domain's share is far below the batch-to-batch sampling noise of its row count (a domain at 0.2 of
    a 16-row batch: 3.2 ± 1.6 rows). Checked once; the state is checkpointed.
    """

    def __init__(self, after: int = 10, min_move: float = 0.05):
        self.after, self.min_move = int(after), float(min_move)
        self.updates = 0
        self.done = False

    def observe(self, probs: torch.Tensor, initial: torch.Tensor, total_updates: int | None) -> dict | None:
        """Count one update; at the check, what was seen (``move``, ``projected``, ``domain`` index, ``updates``)
        if the mixture is inert, else None. Later calls return None."""
        if self.done:
            return None
        self.updates += 1
        due = self.after if total_updates is None else min(self.after, max(1, math.ceil(total_updates / 2)))
        if self.updates < due:
            return None
        self.done = True
        change = (probs / initial - 1).abs()
        d = int(change.argmax())
        move = float(change[d])
        projected = move * (total_updates / self.updates) if total_updates else move
        if projected >= self.min_move:
            return None
        return {"domain": d, "move": move, "projected": projected, "updates": self.updates}

    def state_dict(self) -> dict:
        return {"updates": self.updates, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.updates, self.done = int(state["updates"]), bool(state["done"])



def alignment_signal(inner_products, squared_norms, target_squared_norm: float | None = None, normalize: str = "doge",
                     eps: float = 1e-6) -> torch.Tensor:
    """DGA's per-domain signal from the gradient inner products ``⟨g_d, g_target⟩`` and squared norms ``‖g_d‖²``.

    - ``normalize="doge"``: ``s_d = ⟨g_d, g_target⟩ / (mean_j ‖g_j‖ + eps)``, as DoGE normalizes
      (``HazyResearch/aioli`` ``trainer/doge_trainer.py``, ``DogeTrainer.update_domain_weights``: ``scores /
      (avg_norm + 1e-6)``, ``avg_norm`` the mean over domains of the domain-gradient norms; their ``lr`` factor and
      the division by ``μ`` are folded into DGA's η). The signal keeps the scale of ``‖g_target‖``, which changes by
      orders of magnitude with the model, the data and the point in training, so no one η fits every run.
    - ``normalize="cosine"``: ``s_d = ⟨g_d, g_target⟩ / (‖g_d‖·‖g_target‖ + eps)`` ∈ [−1, 1] (needs
      ``target_squared_norm``). Scale-free: η is then the log-weight change per update of a domain whose gradient
      points exactly along the target's. Our choice, not the paper's: the paper's ``⟨∇ℓ_d, ∇ℓ_target⟩`` also favours
      domains with *large* gradients, which is exactly what unlearnable data (random characters) has.

    Domains with a NaN inner product (absent from the step) are left out of the mean and keep NaN, which
    :meth:`DGAMixture.observe_gradients` reads as "no information". All NaN → all NaN.
    """
    ip = torch.as_tensor(inner_products, dtype=F64).flatten()
    sq = torch.as_tensor(squared_norms, dtype=F64).flatten()
    if ip.shape != sq.shape:
        raise ValueError(f"alignment_signal: {ip.numel()} inner products but {sq.numel()} squared norms.")
    present = torch.isfinite(ip) & torch.isfinite(sq)
    if not present.any():
        return torch.full_like(ip, float("nan"))
    if normalize == "cosine":
        if target_squared_norm is None or not math.isfinite(float(target_squared_norm)):
            raise ValueError("alignment_signal: normalize='cosine' needs the target gradient's squared norm.")
        scale = sq.clamp_min(0).sqrt() * math.sqrt(max(float(target_squared_norm), 0.0)) + eps
    elif normalize == "doge":
        scale = sq[present].clamp_min(0).sqrt().mean() + eps
    else:
        raise ValueError(f"alignment_signal: normalize must be one of {list(SIGNALS)}, got {normalize!r}.")
    return torch.where(present, ip / scale, torch.full_like(ip, float("nan")))


@register_mixture("dga")
class DGAMixture(Controller):
    """Dynamic Gradient Alignment (Fan et al. 2024): upweight domains whose gradient aligns with a target set's.

    No public code for DGA. The paper's update, as in the authors' earlier DoGE code (``Olivia-fsm/DoGE``, adapted in
    ``HazyResearch/aioli`` ``trainer/doge_trainer.py``: ``log α += lr·⟨g_d, g_tgt⟩ / (μ·avg‖g‖)``), is the default:

        log α ← log α + η·⟨g_d, g_target⟩ / mean_j ‖g_j‖            (then renormalized and floored, :func:`mix_update`)

    Three options (ours) turn it into a junk-domain filter when the target is the data you care about:

        s_d   = clip(cos(g_d, g_target), −c, c)                     (normalize="cosine", signal_clip=c)
        log α ← (1 − ρ)·log α + ρ·log α_0 + η·s                      (prior_pull=ρ)

    Why: the paper's signal keeps the scale of the gradients, so an η fits one model and one point of training only
    (1e-3 does not move the mixture in 200 steps here; 1.0 collapsed it onto one domain, +0.96 nats vs stratified);
    the cosine is scale-free and does not reward a large gradient (unlearnable data has one). The pull makes the step
    entropy-regularized: under a steady signal the mixture settles at ``α ∝ α_0·exp(η/ρ · s̄)`` instead of a vertex
    of the simplex. The clip bounds one noisy update's move (DoGE clips its scores too, to ``[0, 5·lr]``). Measured
    with ``normalize="cosine", eta=2, prior_pull=0.1, signal_clip=0.2`` (200 steps, target = the clean domains, 3
    seeds; ``docs/guidance.md``, row ``dga_cosine``): 52% / 66% / 60% of the stratified → oracle gap on
    ``builtin`` / ``records`` / ``ops`` (junk domains at 0.05–0.10 of the mixture), but +0.041 nats *worse* than
    stratified on the kept-aside ``language`` corpus, where it starved a clean but high-entropy target domain (an
    order-2 Markov text: its gradient is poorly aligned with the pooled target's); so it is not the default.

    ``g_d``: the gradient of domain ``d``'s token-mean training loss on the current step's batch (all micro-batches,
    all ranks); ``g_target``: that of a batch of the target set. The glue's alignment driver (declared by
    ``needs_target``) computes the inner products and norms (the target's too) every ``update_every`` steps
    (``gradients_requested()``), at the start of the step, without touching the optimizer's gradients;
    :func:`alignment_signal` normalizes them and :meth:`observe_gradients` applies them. A NaN entry (a domain absent
    from the step) leaves that domain's signal at 0. With ``ema=β`` the exposed mixture is an EMA of the raw one,
    ``ᾱ ← β·ᾱ + (1 − β)·α`` (the paper's optional EMA). Divergences from DoGE in the default: no per-domain gradient
    clipping before the inner products, no clipping of the scores.

    Args:
        target: What the target set is — required by the trainer: a key (or list of keys) of an ``eval_dataset`` dict,
            a domain value (or list) of ``eval_dataset``'s domain column, or ``"eval"`` for the whole ``eval_dataset``.
            E.g. ``{"target": "arithmetic"}`` aligns training with the held-out arithmetic rows.
        target_batch_size: Target rows per alignment, over all ranks (default: one per-device batch per rank). The
            rows are taken from the target set in a seeded shuffled order, cycling, so each batch samples the whole
            target and successive alignments see different rows.
        eta: Step size η (default 1e-3; it plays DoGE's ``lr/μ``). With the paper's signal it must be fitted to the
            run (1e-3 barely moves the mixture in a 200-step run; 1.0 collapsed onto the first aligned domain; 0.5
            with ``ema`` 0.5 closed about half the junk gap on issue 15's held-out corpus but 0.2 with ``ema`` 0.5 was
            +0.36 on the built-in data). With ``normalize="cosine"`` it is the log-weight change per update of a
            domain aligned with the target (2 in the measured junk-domain setting).
        update_every: Gradient cadence in optimizer steps (default 10).
        ema: EMA weight β of the previous mixture (default ``None``: no EMA).
        initial_weights: Starting mixture α_0 (default uniform); also what ``prior_pull`` pulls toward.
        min_prob: Floor (default 1e-4).
        normalize: ``"doge"`` (default, the paper's) or ``"cosine"``, see :func:`alignment_signal`.
        prior_pull: ρ in [0, 1) (default 0, the paper's unregularized update): the share of the log-mixture pulled
            back to ``log α_0`` per update; the mixture's memory is then ≈ 1/ρ updates.
        signal_clip: c > 0, or ``None`` (default: no clip): the signal is clipped to [−c, c].
        watch: Warn once when ``eta`` is too small for the run (default True; :class:`InertMixtureWatch`): after 10
            updates (or half of the run's), the mixture's largest relative change, extrapolated to the whole run, is
            below 5% — the run is then stratified sampling (the initial mixture) in effect. Measured with the default
            ``eta`` of issue 23's first table (1e-3, the paper's signal) on the five corpora of ``benchmarks/corpora.py`` (200 steps, 20 updates): no weight moved by more
            than 2%; on ``builtin`` DGA was +0.032 ± 0.045 nats vs stratified over 6 seeds, the ``reshuffled``
            control (stratified with another data order) −0.007 ± 0.057: not distinguishable (Welch t = 1.3), the
            order noise of a mixture that differs from uniform by 1-2% (``docs/guidance.md``). It warned in every
            one of those runs. The check's state is checkpointed.
    """

    needs_target = True

    def __init__(self, target=None, target_batch_size: int | None = None, eta: float = 1e-3, update_every: int = 10,
                 ema: float | None = None, initial_weights=None, min_prob: float = 1e-4, normalize: str = "doge",
                 prior_pull: float = 0.0, signal_clip: float | None = None, watch: bool = True,
                 domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.normalize = choice(normalize, kwarg("normalize"), SIGNALS)
        self.prior_pull = in_range(prior_pull, kwarg("prior_pull"), 0, 1, high_open=True)
        self.signal_clip = None if signal_clip is None else number(signal_clip, kwarg("signal_clip"), low=0, low_open=True)
        if target is not None:
            targets = [target] if isinstance(target, str | int) else list(target) if isinstance(target, Sequence) else None
            if not targets or any(not isinstance(t, str | int) or isinstance(t, bool) for t in targets):
                raise ValueError(
                    f"mixture_kwargs['target'] must name the target set: a key of the eval_dataset dict, a domain of "
                    f"eval_dataset, a list of those, or 'eval'; got {target!r}."
                )
            target = targets
        self.target = target
        self.target_batch_size = None if target_batch_size is None else integer(target_batch_size, kwarg("target_batch_size"))
        self.eta = number(eta, kwarg("eta"), low=0, low_open=True)
        self.update_every = integer(update_every, kwarg("update_every"))
        self.ema = None if ema is None else in_range(ema, kwarg("ema"), 0, 1, high_open=True)
        self.initial_weights = weight_spec(initial_weights, INITIAL_WEIGHTS)
        self.watch_enabled = bool(watch)

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights))
        self._log_p = torch.log(self._probs)
        self._initial_probs = self._probs.clone()
        self._step = 0
        self._watch = InertMixtureWatch() if self.watch_enabled else None

    def gradients_requested(self) -> bool:
        self._require_bound()
        return self.k > 1 and self._step % self.update_every == 0

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        self._step = int(stats.step) + 1

    def observe_gradients(self, inner_products: torch.Tensor, step: int) -> None:
        """Apply one update with the per-domain signal ``(k,)`` (:func:`alignment_signal`): clip, pull toward the
        prior, ``+ η·s``, renormalize and floor; then the optional EMA."""
        self._require_bound()
        ip = domain_vector(inner_products, self.k, "dga: the gradient inner products")
        if self.k == 1:
            return
        if self.signal_clip is not None:  # NaN stays NaN (clamp keeps it): "no information"
            ip = ip.clamp(-self.signal_clip, self.signal_clip)
        log_p = self._log_p
        if self.prior_pull > 0:  # entropic pull toward the prior: fixed point α ∝ α_0·exp(η/ρ · s)
            log_p = (1 - self.prior_pull) * log_p + self.prior_pull * torch.log(self._initial_probs)
        self._log_p = mix_update(log_p, ip, self.eta, min_prob=self.min_prob)
        raw = torch.exp(self._log_p)
        self._set_probs(raw if self.ema is None else self.ema * self._probs + (1 - self.ema) * raw)
        self._check_inert(step)

    def _check_inert(self, step: int) -> None:
        """Feed the update to the inert-mixture watch and warn the one time it sees a mixture that does not move."""
        if self._watch is None:
            return
        total = None if self._total_steps is None else math.ceil(self._total_steps / self.update_every)
        seen = self._watch.observe(self._probs, self._initial_probs, total)
        if seen is None:
            return
        d = seen["domain"]
        run = f"the whole {total}-update run" if total else "the run"
        warnings.warn(
            f"dga: after {seen['updates']} alignment updates (step {step}) no domain's weight has moved by more than "
            f"{seen['move']:.1%} from its start ({self.domain_names[d]!r}: {float(self._initial_probs[d]):.3f} → "
            f"{float(self._probs[d]):.3f}); at that rate it moves by about {seen['projected']:.1%} in {run}. With "
            f"eta={self.eta} the step is too small for this run: it is sampling with the initial mixture (stratified "
            "sampling by default) in effect. Raise mixture_kwargs['eta'] (with normalize='doge' the signal keeps the "
            "gradients' scale: sweep eta on a short run), or use the scale-free setting measured for junk domains "
            "(normalize='cosine', eta=2, prior_pull=0.1, signal_clip=0.2; docs/methods.md#dga), or stratified sampling; "
            "mixture_kwargs={'watch': False} silences this check.",
            stacklevel=3,
        )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_p": self._log_p.clone(), "step": self._step,
                "watch": watch_state(self._watch)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._log_p, self._step = state["log_p"].clone(), int(state["step"])
        load_watch_state(self._watch, state)  # an older checkpoint has no watch state: the check starts afresh

