"""Dynamic Gradient Alignment (Fan et al. 2024): upweight the domains whose gradient aligns with a target set's
(docs/methods.md#dga).

Every ``update_every`` steps (default 10): ``s_d = cos(g_d, g_target)`` clipped to ``±signal_clip`` (0.2), then
``log α ← (1 − ρ)·log α + ρ·log α_0 + η·s`` (``prior_pull`` ρ 0.1, ``eta`` 2: the mixture settles at
``α ∝ α_0·exp(η/ρ · s̄)``). The paper's form — DoGE's normalization ``⟨g_d, g_target⟩ / mean_j ‖g_j‖``, no pull, no
clip — is ``normalize="doge", prior_pull=0, signal_clip=None`` with an ``eta`` fitted to the run. No public code for
DGA; the normalization follows DoGE (``Olivia-fsm/DoGE``, as adapted in ``HazyResearch/aioli``
``trainer/doge_trainer.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import choice, in_range, integer, number
from .base import F64, INITIAL_WEIGHTS, Controller, domain_vector, kwarg, mix_update, weight_spec

SIGNALS = ("doge", "cosine")


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
    ``HazyResearch/aioli`` ``trainer/doge_trainer.py``: ``log α += lr·⟨g_d, g_tgt⟩ / (μ·avg‖g‖)``), is
    ``log α ← log α + η·⟨g_d, g_target⟩ / mean_j ‖g_j‖``. The default here differs in three ways, each an option:

        s_d   = clip(cos(g_d, g_target), −c, c)                     (normalize="cosine", signal_clip=c=0.2)
        log α ← (1 − ρ)·log α + ρ·log α_0 + η·s                      (prior_pull=ρ=0.1, eta=η=2)

    then renormalized and floored (:func:`mix_update`). Why (issue 23, ``docs/guidance.md``): the paper's signal keeps
    the scale of the gradients, so its η fits one model and one point of training only — the old default 1e-3 did not
    move the mixture in 200 steps (+0.005 mean vs stratified over five corpora), 1.0 collapsed onto one domain (+0.96).
    The cosine is scale-free and does not reward a domain for a *large* gradient (unlearnable data has one). The pull
    toward the prior makes the update an entropy-regularized one whose fixed point under a steady signal is
    ``α ∝ α_0·exp(η/ρ · s̄)`` instead of a vertex of the simplex: a domain whose gradient is orthogonal to the
    target's (random bytes, duplicates, another language: cosine ≈ 0) ends ≈ e^{−η·c/ρ} = e^{−4} below one that
    steadily saturates the clip, and no domain runs away with the mixture. The clip bounds one noisy update's move
    (η·c = 0.4 in log-weight) — DoGE clips its scores too (to ``[0, 5·lr]``). ``g_d``: the gradient of domain ``d``'s
    token-mean training loss on the current step's batch (all micro-batches, all ranks); ``g_target``: that of a
    batch of the target set. The glue's alignment driver (declared by ``needs_target``) computes the inner products
    and norms every ``update_every`` steps (``gradients_requested()``), at the start of the step, without touching the
    optimizer's gradients; :func:`alignment_signal` normalizes them and :meth:`observe_gradients` applies them. A NaN
    entry (a domain absent from the step) leaves that domain's signal at 0 (the pull still acts). With ``ema=β`` the
    exposed mixture is an EMA of the raw one, ``ᾱ ← β·ᾱ + (1 − β)·α`` (the paper's optional EMA).

    Args:
        target: What the target set is — required by the trainer: a key (or list of keys) of an ``eval_dataset`` dict,
            a domain value (or list) of ``eval_dataset``'s domain column, or ``"eval"`` for the whole ``eval_dataset``.
            E.g. ``{"target": "arithmetic"}`` aligns training with the held-out arithmetic rows.
        target_batch_size: Target rows per alignment, over all ranks (default: one per-device batch per rank). The
            rows are taken from the target set in a seeded shuffled order, cycling, so each batch samples the whole
            target and successive alignments see different rows.
        eta: Step size η (default 2.0 with the cosine signal; the paper's DoGE-normalized signal needs a value fitted
            to the run: there 1e-3 barely moved the mixture in 200 steps and 1.0 collapsed it onto one domain).
        update_every: Gradient cadence in optimizer steps (default 10).
        ema: EMA weight β of the previous mixture (default ``None``: no EMA).
        initial_weights: Starting mixture α_0 (default uniform); also what ``prior_pull`` pulls toward.
        min_prob: Floor (default 1e-4).
        normalize: ``"cosine"`` (default) or ``"doge"`` (the paper's), see :func:`alignment_signal`.
        prior_pull: ρ in [0, 1) (default 0.1): the share of the log-mixture pulled back to ``log α_0`` per update; the
            mixture's memory is ≈ 1/ρ updates. 0: the paper's unregularized update.
        signal_clip: c > 0 or ``None`` (default 0.2): the signal is clipped to [−c, c].
    """

    needs_target = True

    def __init__(self, target=None, target_batch_size: int | None = None, eta: float = 2.0, update_every: int = 10,
                 ema: float | None = None, initial_weights=None, min_prob: float = 1e-4, normalize: str = "cosine",
                 prior_pull: float = 0.1, signal_clip: float | None = 0.2, domains=None):
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

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights))
        self._log_p = torch.log(self._probs)
        self._log_prior = self._log_p.clone()
        self._step = 0

    def gradients_requested(self) -> bool:
        self._require_bound()
        return self.k > 1 and self._step % self.update_every == 0

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        self._step = int(stats.step) + 1

    def observe_gradients(self, inner_products: torch.Tensor, step: int) -> None:
        """Apply ``log α += η·⟨g_d, g_target⟩`` with the per-domain inner products ``(k,)``."""
        self._require_bound()
        ip = domain_vector(inner_products, self.k, "dga: the gradient inner products")
        if self.k == 1:
            return
        if self.signal_clip is not None:  # NaN stays NaN (clamp keeps it): "no information"
            ip = ip.clamp(-self.signal_clip, self.signal_clip)
        log_p = self._log_p
        if self.prior_pull > 0:  # entropic pull toward the prior: fixed point α ∝ α_0·exp(η/ρ · s)
            log_p = (1 - self.prior_pull) * log_p + self.prior_pull * self._log_prior
        self._log_p = mix_update(log_p, ip, self.eta, min_prob=self.min_prob)
        raw = torch.exp(self._log_p)
        self._set_probs(raw if self.ema is None else self.ema * self._probs + (1 - self.ema) * raw)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_p": self._log_p.clone(), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._log_p, self._step = state["log_p"].clone(), int(state["step"])

