"""Learning progress (Graves et al., ICML 2017, "Automated Curriculum Learning for Neural Networks"): a
non-stationary bandit over domains rewarded by how fast each domain's loss falls.

Raw progress ``ν_d = (L̄_d − L_d) / π_d``, rescaled to ``[−1, 1]`` by its 20th/80th percentiles
(:func:`rescale_progress`), then Exp3.S (:func:`exp3s_weights`) and ``π = (1 − ε)·softmax(w) + ε/k``. Defaults:
``eta`` 0.2, ``epsilon`` 0.05, ``share`` 1e-3, ``ema`` 0.9. No authors' code is public; the divergences from the paper
are listed on :class:`LearningProgressMixture`. Run-time watch: a memorizable domain it keeps feeding
(:class:`~hfweight.strategies.mixture.base.MemorizedDomainWatch`), warned once.
"""

from __future__ import annotations

import math

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import in_range, integer, number
from ..watch import load_watch_state, watch_state
from .base import (
    F64,
    INITIAL_WEIGHTS,
    Controller,
    MemorizedDomainWatch,
    floor_probabilities,
    kwarg,
    warn_if_stuck,
    weight_spec,
)


def rescale_progress(raw: torch.Tensor, history: torch.Tensor, low_q: float, high_q: float) -> torch.Tensor:
    """Graves et al.'s reward rescaling: map raw progress to ``[−1, 1]`` by the ``low_q``/``high_q`` quantiles
    ``q_lo``, ``q_hi`` of the recent raw values ``history``:

        r = −1 if x < q_lo;  +1 if x > q_hi;  2·(x − q_lo)/(q_hi − q_lo) − 1 otherwise

    so the scale of the loss never matters. Quantiles by linear interpolation (``torch.quantile``). An empty history or
    ``q_hi == q_lo`` (nothing to rank against yet) gives 0 for every entry.
    """
    raw = torch.as_tensor(raw, dtype=F64)
    history = torch.as_tensor(history, dtype=F64).flatten()
    if history.numel() == 0:
        return torch.zeros_like(raw)
    bounds = torch.quantile(history, torch.tensor([low_q, high_q], dtype=F64))
    low, high = float(bounds[0]), float(bounds[1])
    if not high > low:
        return torch.zeros_like(raw)
    return (2 * (raw - low) / (high - low) - 1).clamp(-1.0, 1.0)


def exp3s_weights(weights: torch.Tensor, rewards: torch.Tensor, eta: float, share: float) -> torch.Tensor:
    """One Exp3.S weight update (Auer et al. 2002, as used by Graves et al. 2017, eq. 2), in log space:

        w_i ← log[(1 − α)·exp(w_i + η r_i) + α/(k − 1) · Σ_{j≠i} exp(w_j + η r_j)]

    (``α = share``: the fixed-share mixing that lets a non-stationary bandit switch arms). Returned shifted so that
    ``max w = 0`` (the policy is a softmax of ``w``, shift-invariant; the update is shift-equivariant), so the log-weights
    never drift towards overflow. ``k = 1`` returns ``[0]``.
    """
    z = torch.as_tensor(weights, dtype=F64) + eta * torch.as_tensor(rewards, dtype=F64)
    k = z.numel()
    if k == 1:
        return torch.zeros(1, dtype=F64)
    others = torch.stack([torch.logsumexp(torch.cat([z[:i], z[i + 1:]]), dim=0) for i in range(k)])
    if share > 0:
        w = torch.logaddexp(math.log1p(-share) + z, math.log(share / (k - 1)) + others)
    else:
        w = z
    return w - w.max()


MEMORIZED_WHY = ("Learning progress rewards the domain whose loss falls fastest, and near-duplicate or templated text "
                 "(memorizable, of little use to the model) keeps doing so long after it is learned.")
MEMORIZED_INSTEAD = ("If that domain is not what the model should learn, down-weight it statically (mixture='static' with "
                     "a small weight, or filter it), or use stratified sampling (mixture='temperature' with "
                     "temperature='inf') or mixture='doremi' with a reference model (docs/guidance.md)")


@register_mixture("learning_progress")
class LearningProgressMixture(Controller):
    """Learning progress (Graves et al. 2017, "Automated Curriculum Learning for Neural Networks", ICML): a
    non-stationary bandit over domains whose reward is how fast each domain's loss is *falling*, not how high it is.

    Why: ODM rewards the loss itself, so a domain of random characters — the highest, irreducible loss — is sampled
    more and more. The loss of such a domain does not fall, so its progress is ~0 and this controller samples it less;
    a domain that is learned (or memorized: near-duplicates) stops paying once its loss flattens.

    Per optimizer step ``t`` (every rank, all-reduced :class:`DomainStats`), for each domain present in the step with a
    finite token-mean loss ``L_d`` (measured on this step's fresh batch *before* training on it):

    1. raw progress ``ν_d = (L̄_d − L_d) / π_d``: ``L̄_d`` the EMA (``ema``) of the domain's earlier losses — the
       self prediction gain of the paper measured without an extra forward pass: the loss on new data of the domain
       now vs. on earlier data of the domain before the intervening updates — divided by the domain's current share
       ``π_d`` (``per_share``), i.e. progress per unit of sampling: the marginal value of one more row of ``d``. A
       domain's first observation only starts ``L̄_d``;
    2. reward ``r_d`` = :func:`rescale_progress` of ``ν_d`` by the 20th/80th percentiles (``quantiles``) of the last
       ``history_size`` raw values (all domains pooled), as in the paper;
    3. Exp3.S (:func:`exp3s_weights`): ``w ← ExpS(w, η·r̃)`` with ``r̃_d = r_d`` for present domains, 0 for absent
       ones (their weight only takes part in the fixed-share mixing);
    4. policy ``π = (1 − ε)·softmax(w) + ε/k``, then the ``min_prob`` floor.

    Divergences from the paper, and why: (a) the paper draws *one* task per step and importance-weights its reward by
    ``1/π``; a mixed batch observes the progress of every domain present in it, so the default applies the rewards
    unweighted (the full-information form of the same exponential-weights update); ``importance_weighting=True``
    divides by ``π_d`` as the paper does. (b) progress from the EMA of earlier losses instead of re-scoring the same
    batch after the update (no extra forward or backward). (c) the quantiles come from a sliding window of recent
    values rather than the paper's reservoir sample of the whole history (exact resume needs a deterministic buffer;
    progress shrinks over training, so recent history is the relevant scale). (d) the step size: the paper tuned its
    constants for runs of many thousands of steps; ``eta`` 0.2 lets a domain that is consistently best or worst move
    its log-weight by ±1 within 5 steps, so the controller acts within a few hundred steps (sweep:
    ``benchmarks/mixture_toy.py --sweep``). (e) ``per_share``: the paper's one-task-per-step progress is the progress of
    the task trained on; in a mixed batch a domain's raw loss decrease grows with its share, so without the division
    the controller feeds whatever it already feeds and learns fastest — on the built-in data it put 0.60 on the
    near-duplicate domain and was 0.32 nats worse than stratified (seed 0, ``docs/guidance.md``). No authors' code is
    public; the paper's exact constants could not be checked here.

    Args:
        eta: Exp3.S step size η (default 0.2).
        epsilon: Uniform exploration ε (default 0.05): every domain keeps at least ``ε/k``.
        share: Fixed-share mixing α of Exp3.S (default 1e-3).
        ema: β of the loss EMA ``L̄_d ← β·L̄_d + (1 − β)·L_d`` (default 0.9).
        quantiles: ``(low, high)`` percentiles of the rescaling, as fractions (default ``(0.2, 0.8)``).
        history_size: Raw progress values kept for the quantiles (default 500).
        importance_weighting: Divide rewards by ``π_d`` (the paper's single-task form; default False).
        per_share: Divide raw progress by ``π_d`` before rescaling (progress per unit of sampling; default True).
        update_every: Update cadence in optimizer steps (default 1): progress is accumulated over the skipped steps'
            observations only through ``L̄`` (the rewards of skipped steps are not applied).
        initial_weights: Starting policy (default uniform); ``w`` starts at its log.
        min_prob: Floor (default 1e-4).
        watch: Warn once when the run shows the method's failure signature (default True;
            :class:`~hfweight.strategies.mixture.base.MemorizedDomainWatch`): a self-progress reward cannot tell
            memorizable data (near-duplicates, templates) from useful data. On the built-in corpus its near-duplicate
            domain kept 0.32-0.43 of the mixture and the run was 0.094 nats worse than stratified (3 seeds, worse on
            each; ``docs/guidance.md``). The watch fires when the most upweighted domain (≥ 1.3 × its initial weight)
            has a training loss ≤ 0.3 × the other domains' median, fell the most since the start, and keeps all
            three for 80 consecutive updates; it names the domain, its share and losses, and the alternatives
            (static down-weighting, stratified sampling, ``doremi`` with a reference). A domain memorized outright and
            then dropped (exact duplicates, boilerplate) does not fire. The state is checkpointed.
    """

    def __init__(self, eta: float = 0.2, epsilon: float = 0.05, share: float = 1e-3, ema: float = 0.9,
                 quantiles=(0.2, 0.8), history_size: int = 500, importance_weighting: bool = False,
                 per_share: bool = True, update_every: int = 1, initial_weights=None, min_prob: float = 1e-4,
                 watch: bool = True, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.eta = number(eta, kwarg("eta"), low=0, low_open=True)
        self.epsilon = in_range(epsilon, kwarg("epsilon"), 0, 1)
        self.share = in_range(share, kwarg("share"), 0, 1, high_open=True)
        self.ema = in_range(ema, kwarg("ema"), 0, 1, high_open=True)
        try:
            low, high = (float(q) for q in quantiles)
        except (TypeError, ValueError):
            raise ValueError(f"mixture_kwargs['quantiles'] must be two fractions (low, high), got {quantiles!r}.") from None
        if not 0 <= low < high <= 1:
            raise ValueError(f"mixture_kwargs['quantiles'] must satisfy 0 ≤ low < high ≤ 1, got {quantiles!r}.")
        self.quantiles = (low, high)
        self.history_size = integer(history_size, kwarg("history_size"), 2)
        self.importance_weighting = bool(importance_weighting)
        self.per_share = bool(per_share)
        self.update_every = integer(update_every, kwarg("update_every"))
        self.initial_weights = weight_spec(initial_weights, INITIAL_WEIGHTS)
        self.watch_enabled = bool(watch)

    def _on_bind(self):
        p0 = self._initial(self.initial_weights)
        self._initial_probs = floor_probabilities(p0, self.min_prob) if self.k > 1 else torch.ones(1, dtype=F64)
        self._watch = MemorizedDomainWatch() if self.watch_enabled else None
        self._weights = torch.log(p0.clamp_min(1e-300))
        self._weights = self._weights - self._weights.max()
        self._loss_ema = torch.full((self.k,), float("nan"), dtype=F64)
        self._history = torch.zeros(0, dtype=F64)
        self.last_progress = torch.full((self.k,), float("nan"), dtype=F64)
        self.last_reward = torch.zeros(self.k, dtype=F64)
        self._set_probs(self._policy())

    def _policy(self) -> torch.Tensor:
        return (1 - self.epsilon) * torch.softmax(self._weights, dim=0) + self.epsilon / self.k

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        if self.k == 1:
            return
        t = int(stats.step) + 1
        loss = stats.mean_loss.to(F64)
        seen = (stats.sample_count > 0) & torch.isfinite(loss)
        known = seen & torch.isfinite(self._loss_ema)
        progress = torch.where(known, self._loss_ema - loss, torch.full_like(loss, float("nan")))
        if self.per_share:
            progress = progress / self._probs
        self._loss_ema = torch.where(
            seen, torch.where(torch.isfinite(self._loss_ema), self.ema * self._loss_ema + (1 - self.ema) * loss, loss),
            self._loss_ema,
        )
        if not known.any() or t % self.update_every:
            return
        self._history = torch.cat([self._history, progress[known]])[-self.history_size:]
        reward = torch.where(known, rescale_progress(progress, self._history, *self.quantiles), torch.zeros_like(loss))
        if self.importance_weighting:
            reward = reward / self._probs
        self._weights = exp3s_weights(self._weights, reward, self.eta, self.share)
        self.last_progress, self.last_reward = progress, reward
        self._set_probs(self._policy())
        warn_if_stuck(self._watch, "learning_progress", self.domain_names, t,
                      torch.where(seen, loss, torch.full_like(loss, float("nan"))), self._probs, self._initial_probs,
                      MEMORIZED_WHY, MEMORIZED_INSTEAD)

    _TENSORS = ("_weights", "_loss_ema", "_history", "last_progress", "last_reward")

    def state_dict(self) -> dict:
        return {**super().state_dict(), **{name: getattr(self, name).clone() for name in self._TENSORS},
                "watch": watch_state(self._watch)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in self._TENSORS:
            setattr(self, name, state[name].clone())
        load_watch_state(self._watch, state)  # an older checkpoint has no watch state: the watch starts afresh
