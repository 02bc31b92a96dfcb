"""Gradient-based reward weighting (Lu et al. 2025; ``verl/trainer/ppo/ray_trainer_optimization.py``)
(docs/methods.md#gradient).

From the Gram ``S_kj = ⟨g_k, g_j⟩`` of the per-reward policy gradients (each clipped to ``clip_norm``,
:func:`clip_gram`): ``p ← softmax(log p + (lr/reg)·Σ_j S_kj)``, weights ``(Σ w0)·p``. Defaults: ``lr`` 1e-6, ``reg``
1e-5 (so ``lr/reg`` = 0.1), ``clip_norm`` 1.0, ``accumulation_steps`` 1 — the authors' scripts.
"""

from __future__ import annotations

import math
import warnings

import torch

from ...registry import register_reward_weighting
from ..checks import choice, integer, number
from .base import F64, Weighter, as_f64, floats, kwarg, simplex_log_weights


def clip_gram(gram, clip_norm: float | None = 1.0, norms=None) -> torch.Tensor:
    """Gram matrix of the clipped gradients from the Gram of the unclipped ones: ``D S D`` with
    ``D = diag(min(1, clip_norm / (norm_k + 1e-6)))`` — ``torch.nn.utils.clip_grad_norm_``'s coefficient, applied to
    each reward's gradient separately.

    ``norms`` are the norms used for clipping (default ``sqrt(diag(S))``). The authors clip the *full-model* gradient
    (``verl/workers/actor/dp_actor.py``, ``compute_gradients``: ``clip_grad_norm_(actor_module.parameters(),
    max_norm=grad_clip)``, ``grad_clip = 1.0`` in their scripts) and then keep a subset of layers
    (``target_layer_ids``); pass the full-model norms to match that when ``S`` is over a subset. ``clip_norm=None``
    disables clipping. Returns float64 ``(K, K)``.
    """
    s = as_f64(gram)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"The gradient Gram must be a square (K, K) matrix, got shape {tuple(s.shape)}.")
    if clip_norm is None:
        return s.clone()
    clip_norm = float(clip_norm)
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}.")
    n = s.diagonal().clamp(min=0).sqrt() if norms is None else as_f64(norms).flatten()
    if n.numel() != s.shape[0]:
        raise ValueError(f"norms has {n.numel()} entries; expected {s.shape[0]}.")
    coef = (clip_norm / (n + 1e-6)).clamp(max=1.0)
    return coef[:, None] * s * coef[None, :]


def gram_from_gradients(gradients, clip_norm: float | None = 1.0, norms=None) -> torch.Tensor:
    """``S = G Gᵀ`` (float64 ``(K, K)``) of the per-reward flat gradients ``g_1..g_K`` after clipping each to
    ``clip_norm`` (see :func:`clip_gram`; ``norms`` = full-model norms when the vectors are a parameter subset).

    The products are accumulated in float64. Under sharding, call ``clip_gram`` on the all-reduced partial Gram
    instead (``gram_from_gradients(shards, clip_norm=None)`` gives the partial Gram of the local shards).
    """
    grads = [as_f64(g).flatten() for g in gradients]
    if not grads:
        raise ValueError("gram_from_gradients needs one gradient per reward function; got none.")
    if len({g.numel() for g in grads}) != 1:
        raise ValueError(f"The gradients have different sizes {[g.numel() for g in grads]}; flatten the same parameters "
                         "for every reward function.")
    g = torch.stack([x.cpu() for x in grads])
    return clip_gram(g @ g.T, clip_norm, norms)


@register_reward_weighting("gradient")
class GradientWeighting(Weighter):
    """Gradient-based weighting (Lu et al. 2025; ``verl/trainer/ppo/ray_trainer_optimization.py``).

    From the Gram ``S_kj = ⟨g_k, g_j⟩`` of the per-reward policy gradients: ``s_k = Σ_j S_kj`` (the diagonal included,
    as in their ``scores_mat.sum(dim=-1)``), averaged over ``accumulation_steps`` calls (their
    ``weight_accumulation_steps``, default 1), then ``p ← softmax(log p + (lr/reg)·s)``; weights ``= (Σ w0)·p``, with
    ``p = w0/Σw0`` at the start (their weights sum to 1 and are used as is; here the configured total is kept, which
    changes nothing in GRPO and keeps RLOO's reward scale). Every initial weight must be > 0.

    ``lr`` is the policy's learning rate: the authors read the actor's *current* scheduled rate
    (``actor_lr_scheduler.get_last_lr``), so the glue should pass ``lr=`` to :meth:`update_from_gram`; the constructor's
    ``lr`` (default ``1e-6``, their ``LEARNING_RATE``) is used otherwise. ``reg`` default ``1e-5`` (their
    ``REGULARIZATION_FACTOR``), so ``lr/reg = 0.1``. ``clip_norm`` (default 1.0, their ``MAX_GRAD_NORM``) is stored
    for the glue's :func:`gram_from_gradients` call. A non-finite Gram skips the update (with a warning).

    ``clip_scope`` says whose norm each per-reward gradient is clipped by when the Gram is over a parameter subset
    (``reward_gradient_parameters``): ``"model"`` (default, the authors' choice: ``clip_grad_norm_`` over every
    trainable parameter, then the subset is kept) or ``"selected"`` (the norm of the subset itself).
    """

    needs_gram = True
    CLIP_SCOPES = ("model", "selected")

    def __init__(self, weights=None, lr: float = 1e-6, reg: float = 1e-5, accumulation_steps: int = 1,
                 clip_norm: float | None = 1.0, clip_scope: str = "model"):
        super().__init__(weights)
        self.lr = number(lr, kwarg("lr"), low=0.0)
        self.reg = number(reg, kwarg("reg"), low=0.0, low_open=True)
        self.accumulation_steps = integer(accumulation_steps, kwarg("accumulation_steps"))
        self.clip_norm = None if clip_norm is None else number(clip_norm, kwarg("clip_norm"), low=0.0, low_open=True)
        self.clip_scope = choice(clip_scope, kwarg("clip_scope"), self.CLIP_SCOPES)

    def _check_initial(self, w0):
        if len(self.reward_names) > 1:
            self._require_positive(w0)

    def _reset(self):
        k = len(self.reward_names)
        w0 = self.initial_weights
        self._total = float(w0.sum())
        self._log_p = simplex_log_weights(w0)
        self._acc = torch.zeros(k, dtype=F64)
        self._calls = 0
        self._last_scores = [0.0] * k

    def _current(self):
        if len(self.reward_names) == 1:
            return self.initial_weights.clone()
        return self._total * torch.softmax(self._log_p, dim=0)

    def _compute(self, rewards, step):
        return self._current()

    def update_from_gram(self, gram, step: int, lr: float | None = None) -> torch.Tensor:
        """Accumulate ``s = S.sum(1)``; every ``accumulation_steps`` calls apply the update. Returns the current
        weights (float32); they apply from the next :meth:`weights` call."""
        self._require_bound()
        k = len(self.reward_names)
        s = as_f64(gram)
        if s.shape != (k, k):
            raise ValueError(f"update_from_gram expects a ({k}, {k}) Gram for the K = {k} reward functions "
                             f"{self.reward_names}, got shape {tuple(s.shape)}.")
        rate = self.lr if lr is None else float(lr)
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"update_from_gram got lr={lr!r}; expected a finite number ≥ 0.")
        if not torch.isfinite(s).all():
            warnings.warn("The gradient Gram contains NaN/inf; the reward weights are not updated this step.",
                          stacklevel=2)
            return self.current_weights()
        self._acc = self._acc + s.sum(dim=1)
        self._calls += 1
        if self._calls % self.accumulation_steps == 0:
            scores = self._acc / self.accumulation_steps
            self._last_scores = floats(scores)
            if k > 1:
                self._log_p = torch.log_softmax(self._log_p + (rate / self.reg) * scores, dim=0)
            self._acc = torch.zeros(k, dtype=F64)
        self._last = self._current()
        return self.current_weights()

    def metrics(self):
        out = super().metrics()
        for n, v in zip(self.reward_names, self._last_scores):
            out[f"gradient_influence/{n}"] = v
        return out

    def _state(self):
        return {"log_p": floats(self._log_p), "acc": floats(self._acc), "calls": self._calls,
                "last_scores": list(self._last_scores)}

    def _load(self, state):
        self._log_p = torch.tensor(state["log_p"], dtype=F64)
        self._acc = torch.tensor(state["acc"], dtype=F64)
        self._calls = int(state["calls"])
        self._last_scores = [float(v) for v in state["last_scores"]]
