"""Online Data Mixing (Albalak et al. 2023): an EXP3 bandit over domains rewarded by the training loss
(docs/methods.md#odm).

``R̂_d += L_d · reward_scale / π_d`` for each domain seen; ``ε_t = min(1/k, √(ln k / (k·t)))``;
``w_d = softmax(ε_{t−1} R̂)_d · (1 − k ε_t) + ε_t``. Defaults: ``reward_scale`` 0.1, update every step, warm-up
``min(2000, 10 %`` of the run``)``. Source: ``alon-albalak/online-data-mixing``,
``megatron/data/data_sampling_utils.py`` (``Exp3WeightUpdater``); defaults from ``scripts/train_1B_exp3.sh``.
"""

from __future__ import annotations

import math
import warnings

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import in_range, integer, number
from ..watch import load_watch_state, watch_state
from .base import (
    F64,
    INITIAL_WEIGHTS,
    LEAVE_IT_OUT,
    NOT_WANTED,
    ConcentratedDomainWatch,
    Controller,
    StuckDomainWatch,
    kwarg,
    weight_spec,
)


@register_mixture("odm")
class ODMMixture(Controller):
    """Online Data Mixing (Albalak et al. 2023): EXP3 bandit with the training loss as reward.

    Source: ``alon-albalak/online-data-mixing``, ``megatron/data/data_sampling_utils.py`` (``Exp3WeightUpdater``,
    ``UpdateScheduler``) and ``megatron/training.py`` (``train_mixed_minibatch``); defaults from
    ``scripts/train_1B_exp3.sh`` (warm-up 2000, update frequency 1). At update ``t`` (``t`` = optimizer steps
    completed, updates when ``t > warmup_steps`` and ``t % update_every == 0``):

    - for each domain seen this step (``stats.sample_count > 0``, finite mean loss ``L_d``):
      ``R̂_d += (L_d · reward_scale) / π_d`` (``reward="exp3"``), or
      ``R̂_d ← β·R̂_d + (1 − β)·(L_d · reward_scale) / π_d`` (``reward="smoothed_mean"``, β = ``smoothing_factor``);
    - ``ε_t = min(1/k, √(ln k / (k·t)))``; ``w_d = exp(ε_{t−1} R̂_d)·(1 − k ε_t) / Σ_j exp(ε_{t−1} R̂_j) + ε_t``
      (``ε`` starts at ``1/k``; the softmax form is used for numerical stability, same value).

    Where ``π`` comes from: ``π_d`` is the probability the policy gave domain ``d`` when this step's data was drawn,
    which is the controller's mixture *before* this update (the authors' ``self._probabilities[dataset_name]``).
    Caveat: in ``resample`` mode with a prefetching loader the batch may have been drawn with the mixture of one update
    earlier (see :class:`hfweight.sampling.DomainSampler`); the importance weight then uses the newer ``π`` — the
    same approximation the authors' mixed-minibatch code makes. In ``upweight`` mode every domain present in the
    natural batch is "seen"; ``π`` is still the controller's mixture.

    Divergences: the authors' main setting draws one domain per batch (one reward per step); here every domain present
    in the step gets its reward, as in their ``mixed_minibatches`` variant. The smoothed-mean variant's code is not in
    the public snapshot; it follows docs/methods.md#odm (β = 0.9) and applies the EMA to the importance-weighted
    reward. The floor ``min_prob`` is applied after the EXP3 mixture (ε_t ≥ it in practice).

    Warm-up that fits the run: the authors' 2,000 warm-up steps were a small share of their runs; in a run of a few
    hundred steps they outlast it, and ODM silently *is* its initial mixture (issue 15: exactly stratified at 200
    steps). The default ``warmup_steps=None`` is therefore ``min(2000, ⌊total_steps / 10⌋)`` once the trainer calls
    :meth:`set_total_steps` (2000 if it never does); an explicit value that leaves no step to learn in warns with the
    number of steps the run will see.

    Args:
        warmup_steps: Steps on ``initial_weights`` before the first update (default ``None``: ``min(2000, 10%`` of the
            run's steps``)``; the authors' 2000 when the run length is unknown).
        update_every: Update frequency in optimizer steps (default 1).
        reward: ``"exp3"`` (default) or ``"smoothed_mean"``.
        smoothing_factor: β of the smoothed mean (default 0.9).
        reward_scale: Loss-to-reward scale (default 0.1, the code's ``reward/10``).
        initial_weights: Mixture during warm-up and the first π (default uniform).
        min_prob: Floor (default 1e-4).
        watch: Warn once when a domain ODM upweights is not being learned (default True; :class:`StuckDomainWatch`),
            and once when it concentrates the data on the hardest domain that no eval set measures
            (:class:`ConcentratedDomainWatch`).

    What ODM does at this scale (issue 23). In the mixed-minibatch form every domain is seen every step, so the
    importance weight ``1/π_d`` (meant for a bandit that sees one arm) makes the rewards grow equally exactly when
    ``π_d ∝ L_d``: the mixture settles at *proportional to the domains' training losses* within a few dozen updates
    (``tests/test_mixture_defaults.py``). On data whose domains differ in loss because some are harder, that is the
    paper's "learn more from the less-learned data"; on data with an unlearnable domain (random characters, random
    bytes) it is the wrong way: on the ``records`` corpus it put 0.44 on the random-byte domain (initial 0.25).
    The run-time watch names that case.
    """

    AUTHORS_WARMUP = 2000
    WARMUP_FRACTION = 0.1

    def __init__(self, warmup_steps: int | None = None, update_every: int = 1, reward: str = "exp3",
                 smoothing_factor: float = 0.9, reward_scale: float = 0.1, initial_weights=None,
                 min_prob: float = 1e-4, watch: bool = True, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.watch_enabled = bool(watch)
        self.warmup_given = warmup_steps is not None
        self.warmup_steps = self.AUTHORS_WARMUP if warmup_steps is None else integer(warmup_steps, kwarg("warmup_steps"), 0)
        self.update_every = integer(update_every, kwarg("update_every"))
        if reward not in ("exp3", "smoothed_mean"):
            raise ValueError(f"mixture_kwargs['reward'] must be 'exp3' or 'smoothed_mean', got {reward!r}.")
        self.reward = reward
        self.smoothing_factor = in_range(smoothing_factor, kwarg("smoothing_factor"), 0, 1, high_open=True)
        self.reward_scale = number(reward_scale, kwarg("reward_scale"), low=0, low_open=True)
        self.initial_weights = weight_spec(initial_weights, INITIAL_WEIGHTS)

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights))
        self._rewards = torch.zeros(self.k, dtype=F64)
        self._eps = 1.0 / self.k
        self._initial_probs = self._probs.clone()
        self._watch = StuckDomainWatch() if self.watch_enabled else None
        self._focus = ConcentratedDomainWatch() if self.watch_enabled else None

    def set_total_steps(self, n: int) -> None:
        """Fit the default warm-up to the run (``min(2000, ⌊n/10⌋)``); warn when a given warm-up outlasts it."""
        super().set_total_steps(n)
        if not self.warmup_given:
            self.warmup_steps = min(self.AUTHORS_WARMUP, int(self._total_steps * self.WARMUP_FRACTION))
        elif self.warmup_steps >= self._total_steps:
            warnings.warn(
                f"odm: warmup_steps={self.warmup_steps} but the run has {self._total_steps} optimizer steps, so the "
                "mixture never leaves initial_weights. Lower mixture_kwargs['warmup_steps'] (or leave it unset: "
                f"min(2000, 10% of the run) = {min(self.AUTHORS_WARMUP, int(self._total_steps * self.WARMUP_FRACTION))}).",
                stacklevel=2,
            )

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        t = int(stats.step) + 1
        if self.k == 1 or t <= self.warmup_steps or t % self.update_every:
            return
        k = self.k
        loss = stats.mean_loss.to(F64)
        seen = (stats.sample_count > 0) & torch.isfinite(loss)
        estimate = torch.where(seen, loss * self.reward_scale / self._probs, torch.zeros_like(loss))
        if self.reward == "exp3":
            self._rewards = self._rewards + estimate
        else:
            beta = self.smoothing_factor
            self._rewards = torch.where(seen, beta * self._rewards + (1 - beta) * estimate, self._rewards)
        prev_eps = self._eps
        self._eps = min(1.0 / k, math.sqrt(math.log(k) / (k * t)))
        w = torch.softmax(prev_eps * self._rewards, dim=0) * (1 - k * self._eps) + self._eps
        self._set_probs(w / w.sum())
        self._watch_domains("odm", t, torch.where(seen, loss, torch.full_like(loss, math.nan)), (
            (self._watch,
             "ODM's reward is the training loss, so it favours data the model cannot learn (random or corrupted "
             "text?); mixture='doremi' (excess loss over a reference) or 'learning_progress' (loss decrease) do not "
             "reward an irreducible loss.", LEAVE_IT_OUT),
            (self._focus,
             "ODM's reward is the training loss, so the hardest domain gets the most data; on mostly random data in a "
             "learnable layout (random bytes, hashes, dumps) that loss falls slowly and the budget goes there "
             "(docs/guidance.md: 0.075 nats worse than stratified on such a corpus).", NOT_WANTED),
        ))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rewards": self._rewards.clone(), "eps": self._eps,
                "watch": watch_state(self._watch), "focus_watch": watch_state(self._focus)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._rewards, self._eps = state["rewards"].clone(), float(state["eps"])
        load_watch_state(self._watch, state)  # an older checkpoint has no watch state: the watch starts afresh
        load_watch_state(self._focus, state, "focus_watch")

