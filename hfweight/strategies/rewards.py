"""Multi-objective reward weighting for GRPO / RLOO (docs/methods.md#rewards).

Each strategy turns the rewards of one generation batch ``(N, K)`` — K reward functions, gathered over all ranks, NaN
where a reward function returned None — into the weights ``(K,)`` that TRL multiplies them by
(``self.reward_weights``, a float32 CPU tensor read right after ``_calculate_rewards``). Strategies are pure math plus
explicit state: no Trainer, no process group. Every rank sees the same inputs and computes the same weights.

Registered names (``reward_weighting=...``; kwargs in ``reward_weighting_kwargs``):

============== ==========================================================================================================
``static``      the configured weights, unchanged
``popart``      ``w_k / σ_k`` with running (EMA, debiased) per-reward statistics (PopArt)
``saw``         variance-aware ``w0_k·CV_k`` per batch (× saturation factor ``(1 − sat_k)^γ``), total ``Σ|w0|`` kept
``hypervolume`` Lu et al. 2025, validation-driven: exact hypervolume gain over a Pareto archive
``gradient``    Lu et al. 2025: ``w ← softmax(log w + (lr/reg)·Σ_j S_kj)`` from the per-reward gradient Gram ``S``
``constrained`` Moskovitz et al., ICLR 2024: Lagrange multipliers on reward thresholds; task weight ``n − Σλ``
============== ==========================================================================================================

Common rules
------------
- ``bind(reward_names, initial_weights)`` is called once by the glue with TRL's ``reward_func_names`` and
  ``reward_weights`` (ones when the config has none). ``static``, ``popart``, ``saw``, ``hypervolume`` and
  ``gradient`` also accept ``weights`` in their kwargs (a list in reward order or a ``{reward name: weight}`` dict
  naming every reward), which replaces the config's ``reward_weights``. A wrong count or an unknown/missing name is an
  error that names K and the reward functions.
- ``weights(rewards, step)`` returns float32 ``(K,)``; it is called once per *training* generation batch. Rows where
  every reward is NaN are ignored; a NaN in one column is ignored for that column only. Weights are never NaN.
- ``current_weights()`` returns the weights last returned (the initial ones before any call) without touching the
  state: use it for evaluation batches (``_calculate_rewards`` also runs in evaluation).
- With a single reward function every strategy returns the initial weight, with two deliberate exceptions where
  the rescaling *is* the method: ``popart`` (``w0/σ``: PopArt's original single-reward use, which matters for RLOO's
  absolute scale; ``fixed_sum=True`` gives back ``w0``) and ``hypervolume`` with ``variant="scalar"`` (``m·w0``).
- ``state_dict()`` / ``load_state_dict()`` round-trip exactly (call ``bind`` first, then ``load_state_dict``).
- ``metrics()`` returns a flat ``{name: float}`` dict for the Trainer's ``log``.

Protocol the GRPO/RLOO glue implements
--------------------------------------
1. **Every generation batch.** Override ``_calculate_rewards``: call the parent (rewards gathered over all ranks),
   then ``self.reward_weights = weighter.weights(rewards_per_func.float().cpu(), step=self.state.global_step)`` when
   the model is training, or ``weighter.current_weights()`` when evaluating. TRL reads ``self.reward_weights`` right
   after, in both ``sum_then_normalize`` and ``normalize_then_sum``.
2. **Validation** (``needs_validation`` is True: ``hypervolume``; ``constrained`` with ``nelder_mead=True``). Once
   before the first training generation batch (this sets the hypervolume reference), then every ``eval_steps``
   optimizer steps (the authors validate after every step): generate on the held-out prompts, score with the same
   reward functions, gather over ranks, take the NaN-robust mean per reward → ``scores (K,)``, and call
   ``observe_validation(scores, step)`` on every rank with identical numbers. The new weights apply from the *next*
   ``weights()`` call, i.e. the next generation batch (the authors also apply the multiplier to the next step).
3. **Gradient Gram** (``needs_gram`` is True: ``gradient``). Once per generation batch, after the rewards are known:
   for each reward k, advantages from reward k alone (the trainer's own normalization applied to column k), one
   forward/backward of the policy loss with those advantages (no optimizer step; zero the gradients before and after),
   flatten the gradients of the chosen parameters into ``g_k``. Then
   ``S = gram_from_gradients([g_1..g_K], clip_norm=weighter.clip_norm, norms=full-model norms)`` and
   ``weighter.update_from_gram(S, step, lr=current learning rate)``. Under DDP the gradients are already averaged and
   identical on every rank. Under ZeRO/FSDP each rank holds a shard of every ``g_k``: compute the *unclipped* partial
   Gram ``G_shard G_shardᵀ`` (K×K) and all-reduce (sum) it — the norms are on its diagonal — then ``clip_gram``.
   Cost: K extra forward/backward passes per generation batch. The authors update the weights and then recompute the
   combined reward of the *same* batch; with TRL's hook the Gram is available only after the batch's advantages were
   formed, so the update applies from the next generation batch unless the glue recomputes the advantages.
4. **Checkpoints**: ``state_dict()`` is saved with the other strategies (see :mod:`hfweight.state`); on resume
   ``bind`` then ``load_state_dict``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..hypervolume import ParetoArchive
from ..registry import register_reward_weighting
from .base import RewardWeighting

_F64 = torch.float64

__all__ = [
    "ConstrainedWeighting",
    "GradientWeighting",
    "HypervolumeWeighting",
    "NelderMead",
    "PopArtWeighting",
    "SAWWeighting",
    "StaticWeighting",
    "clip_gram",
    "gram_from_gradients",
]


# ---- validation helpers -------------------------------------------------------------------------------------------


def _field(name: str) -> str:
    return f"reward_weighting_kwargs['{name}']"


def _number(value, name: str, *, low: float | None = None, low_open: bool = False, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{_field(name)} must be a number, got {value!r}.")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None and (value < low or (low_open and value == low)):
        bad = True
    if high is not None and value > high:
        bad = True
    if bad:
        bounds = [f"{'>' if low_open else '≥'} {low:g}"] if low is not None else []
        if high is not None:
            bounds.append(f"≤ {high:g}")
        where = f" {' and '.join(bounds)}" if bounds else ""
        raise ValueError(f"{_field(name)} must be a finite number{where}, got {value!r}.")
    return value


def _integer(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{_field(name)} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def _choice(value, name: str, options: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{_field(name)} must be one of {list(options)}, got {value!r}.")
    return value


def _spec_items(spec, name: str, allow_none: bool = False) -> list:
    """Construction-time check of a per-reward spec (list or dict of numbers); names are checked at bind."""
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence | torch.Tensor | np.ndarray) and not isinstance(spec, str):
        items = list(enumerate(spec.tolist() if hasattr(spec, "tolist") else spec))
    else:
        raise ValueError(f"{_field(name)} must be a list (one entry per reward function) or a {{reward name: value}} "
                         f"dict, got {spec!r}.")
    for key, value in items:
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) or not math.isfinite(
            float(value)
        ):
            raise ValueError(f"{_field(name)} gives {key!r} the value {value!r}; expected a finite number.")
    return items


def _resolve_per_reward(spec, names: list[str], name: str, *, allow_none: bool = False, skip: int | None = None):
    """A per-reward spec as a list aligned with ``names`` (``None`` where allowed and absent).

    A list must have one entry per reward (or, with ``skip``, one per reward other than ``names[skip]``). A dict must
    name rewards that exist; with ``allow_none`` missing names give ``None``, otherwise they are an error.
    """
    k = len(names)
    wanted = [i for i in range(k) if i != skip]
    if isinstance(spec, Mapping):
        if len(set(names)) != k:
            raise ValueError(f"{_field(name)} is a dict but the reward function names {names} are not unique; give a "
                             "list in reward order instead.")
        unknown = sorted(set(map(str, spec)) - set(names))
        if unknown:
            raise ValueError(f"{_field(name)} names unknown reward function(s) {unknown}; the {k} reward functions are "
                             f"{names}.")
        by_name = {str(key): value for key, value in spec.items()}
        if skip is not None and names[skip] in by_name and by_name[names[skip]] is not None:
            raise ValueError(f"{_field(name)} gives a value to {names[skip]!r}, which is the task reward (it has no "
                             f"threshold). Constraint rewards: {[names[i] for i in wanted]}.")
        missing = [names[i] for i in wanted if names[i] not in by_name]
        if missing and not allow_none:
            raise ValueError(f"{_field(name)} has no entry for reward function(s) {missing}; the {k} reward functions "
                             f"are {names}. Give one value per reward function.")
        out = [None] * k
        for i in wanted:
            value = by_name.get(names[i])
            out[i] = None if value is None else float(value)
        return out
    values = spec.tolist() if hasattr(spec, "tolist") else list(spec)
    if skip is not None and len(values) == k and values[skip] is None:
        values = [v for i, v in enumerate(values) if i != skip]
    if len(values) != len(wanted):
        target = (
            f"one per constraint reward ({len(wanted)}: {[names[i] for i in wanted]}; K = {k} reward functions "
            f"{names}, task {names[skip]!r})"
            if skip is not None
            else f"one per reward function (K = {k}: {names})"
        )
        raise ValueError(f"{_field(name)} has {len(values)} entries; expected {target}.")
    out = [None] * k
    for i, value in zip(wanted, values):
        if value is None and not allow_none:
            raise ValueError(f"{_field(name)} has no value for reward function {names[i]!r}.")
        out[i] = None if value is None else float(value)
    return out


def _f64(x) -> torch.Tensor:
    """float64 CPU tensor from a tensor, an array or (nested) lists, without a float32 round trip."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", _F64)
    return torch.from_numpy(np.array(x, dtype=np.float64))


def _as_rewards(rewards, k: int) -> torch.Tensor:
    """The batch as float64 ``(M, K)`` with rows where every reward is NaN removed."""
    r = _f64(rewards)
    if r.ndim == 1 and k == 1:
        r = r[:, None]
    if r.ndim != 2 or r.shape[1] != k:
        raise ValueError(f"rewards must have shape (N, {k}) (one column per reward function), got {tuple(r.shape)}.")
    if torch.isinf(r).any():
        raise ValueError("rewards contain ±inf; a reward function returned an infinite value.")
    if r.shape[0] == 0:
        return r
    return r[~torch.isnan(r).all(dim=1)]


def column_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per column, over the non-NaN entries: ``(count, mean, population variance)``, float64 ``(K,)`` each.

    A column without any valid entry has count 0, mean 0 and variance 0. The population variance (``ddof = 0``) is used
    so one valid entry gives 0, never NaN.
    """
    valid = ~torch.isnan(rewards)
    count = valid.sum(dim=0).to(_F64)
    x = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = x.sum(dim=0) / count.clamp(min=1)
    dev = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    var = (dev * dev).sum(dim=0) / count.clamp(min=1)
    return count, mean, var


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.tolist()]


# ---- base ---------------------------------------------------------------------------------------------------------


class _RewardWeightingBase(RewardWeighting):
    """Shared plumbing: binding, input checks, the last weights, state and metrics."""

    needs_validation: bool = False
    """Whether the glue must call :meth:`observe_validation` with per-reward validation scores."""
    needs_gram: bool = False
    """Whether the glue must compute the per-reward gradient Gram and call ``update_from_gram``."""

    def __init__(self, weights=None):
        if weights is not None:
            _spec_items(weights, "weights")
        self._weights_spec = weights
        self.reward_names: list[str] = []
        self.initial_weights: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    # -- binding --

    def bind(self, reward_names: list[str], initial_weights: torch.Tensor | None = None) -> None:
        names = [str(n) for n in reward_names]
        k = len(names)
        if k == 0:
            raise ValueError("Reward weighting needs at least one reward function; got none.")
        if initial_weights is None:
            w0 = torch.ones(k, dtype=_F64)
        else:
            w0 = _f64(initial_weights).flatten()
        if w0.numel() != k:
            raise ValueError(f"`reward_weights` has {w0.numel()} entries but there are K = {k} reward functions "
                             f"{names}; give one weight per reward function.")
        if not torch.isfinite(w0).all():
            raise ValueError(f"`reward_weights` {w0.tolist()} contain NaN or infinite values.")
        if self._weights_spec is not None:
            w0 = torch.tensor(_resolve_per_reward(self._weights_spec, names, "weights"), dtype=_F64)
        self.reward_names = names
        self.initial_weights = w0
        self._last = w0.clone()
        self._check_initial(w0)
        self._reset()

    def _check_initial(self, w0: torch.Tensor) -> None:
        """Hook: validate the initial weights for this strategy."""

    def _reset(self) -> None:
        """Hook: (re)initialize the strategy's state after :meth:`bind`."""

    def _require_positive(self, w0: torch.Tensor) -> None:
        bad = [(n, float(v)) for n, v in zip(self.reward_names, w0.tolist()) if not v > 0]
        if bad:
            raise ValueError(f"reward_weighting={self.name!r} keeps the weights on a scaled simplex, so every initial "
                             f"weight must be > 0; got {bad}. Set positive `reward_weights` (or "
                             f"{_field('weights')}).")

    @property
    def num_rewards(self) -> int:
        self._require_bound()
        return len(self.reward_names)

    def _require_bound(self) -> None:
        if self.initial_weights is None:
            raise RuntimeError(f"reward_weighting={self.name!r} was used before `bind(reward_names, initial_weights)`.")

    # -- weights --

    def weights(self, rewards: torch.Tensor, step: int) -> torch.Tensor:
        self._require_bound()
        r = _as_rewards(rewards, len(self.reward_names))
        if len(self.reward_names) == 1 and self._single_is_initial():
            w = self.initial_weights.clone()
        else:
            w = self._compute(r, int(step))
        w = torch.nan_to_num(w.to(_F64), nan=0.0)
        self._last = w
        return w.to(torch.float32)

    def _single_is_initial(self) -> bool:
        return True

    def _compute(self, rewards: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def current_weights(self) -> torch.Tensor:
        """The weights last returned by :meth:`weights` (the initial weights before the first call), float32."""
        self._require_bound()
        return self._last.to(torch.float32)

    def metrics(self) -> dict[str, float]:
        self._require_bound()
        return {f"reward_weight/{n}": float(w) for n, w in zip(self.reward_names, self._last.tolist())}

    # -- state --

    def state_dict(self) -> dict:
        self._require_bound()
        return {
            "name": self.name,
            "reward_names": list(self.reward_names),
            "initial_weights": _floats(self.initial_weights),
            "last": _floats(self._last),
            **self._state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._require_bound()
        if list(state.get("reward_names", [])) != self.reward_names:
            raise ValueError(f"The saved reward weighting state is for reward functions {state.get('reward_names')}, "
                             f"but this run has {self.reward_names}. Resume with the same reward functions.")
        self.initial_weights = torch.tensor(state["initial_weights"], dtype=_F64)
        self._last = torch.tensor(state["last"], dtype=_F64)
        self._load(state)

    def _state(self) -> dict:
        return {}

    def _load(self, state: dict) -> None:
        del state


# ---- static -------------------------------------------------------------------------------------------------------


@register_reward_weighting("static")
class StaticWeighting(_RewardWeightingBase):
    """The configured weights, unchanged: the config's ``reward_weights`` or ``reward_weighting_kwargs['weights']``
    (a list in reward order, or a ``{reward name: weight}`` dict naming every reward). Negative weights are allowed
    (a penalty), as in TRL."""

    def _compute(self, rewards, step):
        return self.initial_weights.clone()


# ---- PopArt -------------------------------------------------------------------------------------------------------


@register_reward_weighting("popart")
class PopArtWeighting(_RewardWeightingBase):
    """PopArt-style per-reward normalization by running statistics (van Hasselt et al., NeurIPS 2016; multi-task use:
    Hessel et al., AAAI 2019).

    Per reward k, once per generation batch (NaN entries ignored; a column with no valid entry is not updated):
    ``μ_k ← (1−β)μ_k + β·mean_batch(r_k)``, ``ν_k ← (1−β)ν_k + β·mean_batch(r_k²)``; debiased like Adam
    (``μ̂ = μ/(1 − (1−β)^{t_k})``, ``t_k`` the number of updates of column k) so the statistics start at the data's
    scale rather than 0; ``σ_k = sqrt(max(ν̂_k − μ̂_k², 0))``, at most ``max_std``.

    Weights: ``w_k = w0_k / σ_k``, so ``Σ_k w_k r_k = Σ_k w0_k (r_k / σ_k)``; ``offset()`` returns ``Σ_k w_k μ̂_k``, so
    ``rewards @ w − offset() = Σ_k w0_k (r_k − μ̂_k)/σ_k`` (the fully normalized reward). The shift cancels in GRPO's
    group baseline and in RLOO's leave-one-out baseline, which is why the weights alone are enough.

    - A reward whose running std is below ``min_std`` (it has been constant so far) gets weight 0: it carries no
      signal, and ``1/σ`` would blow up the float32 reward sum. If every reward is below it, the initial weights.
    - ``fixed_sum=True`` rescales the weights so ``Σ|w_k| = Σ|w0_k|``: the *ratios* are PopArt's, the absolute scale is
      the configured one. GRPO (std-normalized advantages) only sees ratios; RLOO (no normalization by default, KL
      penalty folded into the reward) is sensitive to the absolute scale, so ``fixed_sum=True`` keeps the
      reward-vs-KL trade-off of the configured weights. Off by default (pure PopArt: rewards in σ units).

    Args:
        beta: EMA step size β, default ``3e-4``: the statistics step size attributed to multi-task PopArt
            (Hessel et al. 2019) and the default of public PopArt reimplementations (not re-checked against the
            paper's table here; van Hasselt et al. 2016 tune β per domain). Here it is applied once per generation
            batch, not per learner step, so with debiasing the statistics stay close to the cumulative mean over the
            first ~``1/β`` batches; raise it (e.g. ``0.01``) to track a drifting reward faster.
        min_std: ``1e-4`` (the lower clip of σ in public PopArt implementations); below it the weight is 0.
        max_std: ``1e6`` (upper clip of σ).
        fixed_sum: see above.
    """

    def __init__(self, weights=None, beta: float = 3e-4, min_std: float = 1e-4, max_std: float = 1e6,
                 fixed_sum: bool = False):
        super().__init__(weights)
        self.beta = _number(beta, "beta", low=0.0, low_open=True, high=1.0)
        self.min_std = _number(min_std, "min_std", low=0.0)
        self.max_std = _number(max_std, "max_std", low=0.0, low_open=True)
        if self.max_std <= self.min_std:
            raise ValueError(f"{_field('max_std')} ({max_std}) must be larger than {_field('min_std')} ({min_std}).")
        if not isinstance(fixed_sum, bool):
            raise ValueError(f"{_field('fixed_sum')} must be True or False, got {fixed_sum!r}.")
        self.fixed_sum = fixed_sum

    def _reset(self):
        k = len(self.reward_names)
        self._mu = torch.zeros(k, dtype=_F64)
        self._nu = torch.zeros(k, dtype=_F64)
        self._t = torch.zeros(k, dtype=_F64)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Debiased running ``(mean, std)`` per reward (0 for a reward never observed)."""
        self._require_bound()
        corr = 1.0 - (1.0 - self.beta) ** self._t
        safe = torch.where(self._t > 0, corr, torch.ones_like(corr))
        mu = torch.where(self._t > 0, self._mu / safe, torch.zeros_like(self._mu))
        nu = torch.where(self._t > 0, self._nu / safe, torch.zeros_like(self._nu))
        std = (nu - mu * mu).clamp(min=0).sqrt().clamp(max=self.max_std)
        return mu, std

    def offset(self) -> float:
        """``Σ_k w_k μ̂_k`` for the last weights: subtract it from ``rewards @ w`` to get the fully normalized reward."""
        mu, _ = self.statistics()
        return float((self._last * mu).sum())

    def _single_is_initial(self) -> bool:
        return False  # keep the statistics up to date; the weight of a single reward is still w0/σ

    def _compute(self, rewards, step):
        count, mean, var = column_stats(rewards)
        seen = count > 0
        sq = var + mean * mean  # batch mean of r²
        b = self.beta
        self._mu = torch.where(seen, (1 - b) * self._mu + b * mean, self._mu)
        self._nu = torch.where(seen, (1 - b) * self._nu + b * sq, self._nu)
        self._t = self._t + seen.to(_F64)
        _, std = self.statistics()
        w0 = self.initial_weights
        usable = std >= self.min_std
        if self.min_std == 0:
            usable = std > 0
        w = torch.where(usable, w0 / torch.where(usable, std, torch.ones_like(std)), torch.zeros_like(w0))
        if not (w != 0).any():
            return w0.clone()
        return keep_total(w0, w) if self.fixed_sum else w

    def metrics(self):
        out = super().metrics()
        mu, std = self.statistics()
        for n, m, s in zip(self.reward_names, mu.tolist(), std.tolist()):
            out[f"reward_mean/{n}"] = m
            out[f"reward_std/{n}"] = s
        return out

    def _state(self):
        return {"mu": _floats(self._mu), "nu": _floats(self._nu), "t": _floats(self._t)}

    def _load(self, state):
        self._mu = torch.tensor(state["mu"], dtype=_F64)
        self._nu = torch.tensor(state["nu"], dtype=_F64)
        self._t = torch.tensor(state["t"], dtype=_F64)


# ---- SAW ----------------------------------------------------------------------------------------------------------


@register_reward_weighting("saw")
class SAWWeighting(_RewardWeightingBase):
    """Variance-aware weights from the current batch (stateless), optionally saturation-aware.

    Per reward k over the batch's valid entries (population statistics): ``s_k = CV_k = σ_k / max(|μ_k|, eps)``
    (``statistic="cv"``), or ``s_k = σ_k`` (``"std"``), or ``s_k = 1`` (``"none"``). Then
    ``w_k = c · w0_k · s_k`` with ``c`` such that ``Σ|w| = Σ|w0|`` (:func:`keep_total`: the total of the initial
    weights is kept, which RLOO's reward scale needs); with the default ``w0 = 1`` this is ``K·CV_k/Σ CV``.

    - A constant reward (σ = 0) or one with no valid entry gets ``s_k = 0``, hence weight 0; when every reward is
      constant the initial weights are returned. Never NaN.
    - The CV of a reward whose mean is near 0 is huge (``eps`` only prevents a division by zero): prefer
      ``statistic="std"`` for rewards centred on 0.
    - ``saturation_gamma=γ`` multiplies by ``(1 − sat_k)^γ`` (saturation-aware GDPO), ``sat_k`` = fraction of valid
      entries at the reward's maximum (``r ≥ max_k − saturation_tol``), where ``max_k`` is ``reward_max[k]`` when given
      (a list, or a ``{reward name: max}`` dict; missing names use the batch maximum) and the batch maximum otherwise.
      With ``statistic="none"`` this is the saturation factor alone, meant for ``normalize_then_sum``. The total
      ``Σ|w| = Σ|w0|`` is restored after the factor too.
    - If every weight comes out 0 (e.g. every reward saturated), the initial weights are returned.
    """

    def __init__(self, weights=None, statistic: str = "cv", eps: float = 1e-8, saturation_gamma: float | None = None,
                 reward_max=None, saturation_tol: float = 0.0):
        super().__init__(weights)
        self.statistic = _choice(statistic, "statistic", ("cv", "std", "none"))
        self.eps = _number(eps, "eps", low=0.0, low_open=True)
        self.saturation_gamma = None if saturation_gamma is None else _number(saturation_gamma, "saturation_gamma",
                                                                                low=0.0)
        if reward_max is not None:
            _spec_items(reward_max, "reward_max", allow_none=True)
            if self.saturation_gamma is None:
                raise ValueError(f"{_field('reward_max')} only matters with {_field('saturation_gamma')}; set it too.")
        self._reward_max_spec = reward_max
        self.saturation_tol = _number(saturation_tol, "saturation_tol", low=0.0)

    def _reset(self):
        if self._reward_max_spec is None:
            self._reward_max = [None] * len(self.reward_names)
        else:
            self._reward_max = _resolve_per_reward(self._reward_max_spec, self.reward_names, "reward_max",
                                                   allow_none=True)

    def saturation(self, rewards: torch.Tensor) -> torch.Tensor:
        """Fraction of valid entries at each reward's maximum, float64 ``(K,)`` (0 for a column without entries)."""
        r = _as_rewards(rewards, len(self.reward_names))
        valid = ~torch.isnan(r)
        count = valid.sum(dim=0).to(_F64)
        out = torch.zeros(r.shape[1], dtype=_F64)
        for k in range(r.shape[1]):
            if count[k] == 0:
                continue
            col = r[valid[:, k], k]
            top = self._reward_max[k] if self._reward_max[k] is not None else float(col.max())
            out[k] = (col >= top - self.saturation_tol).sum().to(_F64) / count[k]
        return out

    def _compute(self, rewards, step):
        count, mean, var = column_stats(rewards)
        std = var.sqrt()
        if self.statistic == "cv":
            s = std / mean.abs().clamp(min=self.eps)
        elif self.statistic == "std":
            s = std
        else:
            s = (count > 0).to(_F64)
        s = torch.where(count > 0, s, torch.zeros_like(s))
        w0 = self.initial_weights
        if s.sum() <= 0:
            s = torch.ones_like(s)  # every reward constant: the initial weights (before any saturation factor)
        if self.saturation_gamma is not None:
            s = s * (1.0 - self.saturation(rewards)).clamp(min=0) ** self.saturation_gamma
        return keep_total(w0, w0 * s)


def keep_total(w0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` rescaled so that ``Σ|w| = Σ|w0|`` (the initial weights' total); ``w0`` itself when ``w`` is all zero.

    RLOO's advantages (and its KL penalty folded into the reward) scale with the weights, so a weighter that only
    means to change the *ratios* between rewards must leave their total where the user put it."""
    target, total = w0.abs().sum(), w.abs().sum()
    if not total > 0:
        return w0.clone()
    return w * (target / total)


# ---- hypervolume (Lu et al. 2025) ---------------------------------------------------------------------------------


@register_reward_weighting("hypervolume")
class HypervolumeWeighting(_RewardWeightingBase):
    """Hypervolume-guided weighting (Lu et al. 2025, ``yining610/dynamic-reward-weighting``).

    Driven by validation, not by the training batch: the glue calls :meth:`observe_validation` with the per-reward
    validation means ``(K,)``; :meth:`weights` returns the current weights (they change only on validation, and apply
    from the next call).

    Reference point and archive. The first call sets the reference ``r = s₀ − reference_margin`` and puts ``s₀`` in a
    :class:`~hfweight.hypervolume.ParetoArchive`. The authors (``verl/trainer/ppo/ray_trainer_vanilla.py``) use
    ``r = s₀`` exactly, with an empty archive; then a later point has volume only if it beats ``s₀`` in *every*
    objective, and one that improves accuracy while holding the format score gets nothing. With the margin and ``s₀``
    in the archive, a point gains hypervolume as soon as it improves any objective without falling below ``r``, and
    a point equal to ``s₀`` gains exactly 0. Each later call computes the exact gain of the new point over the archive
    (``verl/utils/reward_score/dynamic_math/hypervolumn_contribution.py``: ``compute_score``); points with a positive
    gain join the archive (as in their code), dominated archive points are pruned (HV unchanged).

    Variants:

    - ``"scalar"`` — the authors' code: one multiplier ``m = 0.5 + 1.5·tanh(gain)`` on the whole reward (``m = 1``
      until the first gain is known), i.e. weights ``m·w0``. With GRPO's std-normalized advantages (and with TRL's
      ``normalize_then_sum``, which standardizes the sum again) a common positive factor cancels exactly: the scalar
      variant then changes nothing. It matters only without std normalization (RLOO's default,
      ``scale_rewards="none"``), where it rescales the reward against the KL term.
    - ``"per_objective"`` (default) — moves weight toward the objectives whose improvement adds hypervolume. With
      ``s`` the new point and ``s⁻`` the previous validation point, the marginal contribution of objective k is
      ``c_k = gain(s) − gain(s with s_k replaced by min(s_k, s⁻_k))``: how much of the gain is lost if objective k
      had not improved (0 when it did not improve; ``c_k ≥ 0`` because the gain is monotone). With shares
      ``z = c / Σc``: ``log p ← log p + eta·z``, weights ``= (Σ w0) · softmax(log p)``, starting from
      ``p = w0/Σw0`` (so every initial weight must be > 0). Shares are unit-free (the raw gain is a volume in the
      product of the K score units, which is why it is not used as the step size). No gain → no move. A joint
      improvement of several objectives is credited to each of them (removing any one loses it), so simultaneous
      progress keeps the weights balanced while one-sided progress pulls weight toward that side.

    Args:
        variant: ``"per_objective"`` or ``"scalar"``.
        eta: step size of the exponentiated update (per_objective), default 0.1 — the same per-step scale as the
            gradient method's ``lr/reg`` in the authors' scripts.
        reference_margin: subtracted from the first validation point to form the reference (a number or one per
            reward), default 1e-3 (in score units: the width of the sliver credited to the initial point).
        maximize: a bool or one per reward (validation scores of reward functions are maximized by default).
    """

    needs_validation = True

    def __init__(self, weights=None, variant: str = "per_objective", eta: float = 0.1, reference_margin=1e-3,
                 maximize=True):
        super().__init__(weights)
        self.variant = _choice(variant, "variant", ("per_objective", "scalar"))
        self.eta = _number(eta, "eta", low=0.0)
        if isinstance(reference_margin, int | float) and not isinstance(reference_margin, bool):
            _number(reference_margin, "reference_margin", low=0.0, low_open=True)
        else:
            for key, v in _spec_items(reference_margin, "reference_margin"):
                if not float(v) > 0:
                    raise ValueError(f"{_field('reference_margin')} gives {key!r} the margin {v!r}; margins must be > 0.")
        self._margin_spec = reference_margin
        if not isinstance(maximize, bool) and not (
            isinstance(maximize, Sequence) and all(isinstance(m, bool) for m in maximize)
        ):
            raise ValueError(f"{_field('maximize')} must be a bool or a list of bools, got {maximize!r}.")
        self._maximize_spec = maximize

    def _check_initial(self, w0):
        if self.variant == "per_objective" and len(self.reward_names) > 1:
            self._require_positive(w0)

    def _reset(self):
        k = len(self.reward_names)
        if isinstance(self._margin_spec, int | float):
            self._margin = [float(self._margin_spec)] * k
        else:
            self._margin = [float(v) for v in _resolve_per_reward(self._margin_spec, self.reward_names,
                                                                  "reference_margin")]
        if isinstance(self._maximize_spec, bool):
            self._maximize = [self._maximize_spec] * k
        else:
            if len(self._maximize_spec) != k:
                raise ValueError(f"{_field('maximize')} has {len(self._maximize_spec)} entries; expected one per "
                                 f"reward function (K = {k}: {self.reward_names}).")
            self._maximize = list(self._maximize_spec)
        w0 = self.initial_weights
        self._total = float(w0.sum())
        self._log_p = (w0 / w0.sum()).log() if (w0 > 0).all() else torch.zeros(k, dtype=_F64)
        self._multiplier = 1.0
        self._archive: ParetoArchive | None = None
        self._prev: list[float] | None = None
        self._last_gain = 0.0
        self._last_contrib = [0.0] * k
        self._observations = 0

    @property
    def reference(self) -> list[float] | None:
        return None if self._archive is None else self._archive.reference.tolist()

    @property
    def archive(self) -> ParetoArchive | None:
        return self._archive

    @property
    def multiplier(self) -> float:
        return self._multiplier

    def _current(self) -> torch.Tensor:
        w0 = self.initial_weights
        if self.variant == "scalar":
            return w0 * self._multiplier
        if len(self.reward_names) == 1:
            return w0.clone()
        return self._total * torch.softmax(self._log_p, dim=0)

    def _single_is_initial(self) -> bool:
        return self.variant == "per_objective"

    def _compute(self, rewards, step):
        return self._current()

    def observe_validation(self, scores, step: int) -> float:
        """Record the per-reward validation means ``(K,)``; return the hypervolume gain (0 for the first call, which
        sets the reference). A NaN score (no validation value for that reward) keeps the previous value of that
        coordinate, with a warning; the first call must be NaN-free."""
        self._require_bound()
        k = len(self.reward_names)
        s = _f64(scores).flatten()
        if s.numel() != k:
            raise ValueError(f"observe_validation got {s.numel()} scores; expected one per reward function "
                             f"(K = {k}: {self.reward_names}).")
        if torch.isinf(s).any():
            raise ValueError(f"validation scores {s.tolist()} contain ±inf.")
        self._observations += 1
        if self._archive is None:
            if torch.isnan(s).any():
                raise ValueError(f"The first validation scores {s.tolist()} set the hypervolume reference and must not "
                                 "contain NaN; every reward function must score the validation set.")
            sign = torch.tensor([1.0 if m else -1.0 for m in self._maximize], dtype=_F64)
            ref = s - sign * torch.tensor(self._margin, dtype=_F64)
            self._archive = ParetoArchive(ref.tolist(), maximize=self._maximize)
            self._archive.add(s.tolist())
            self._prev = s.tolist()
            self._last_gain = 0.0
            return 0.0
        if torch.isnan(s).any():
            warnings.warn(f"validation scores {s.tolist()} contain NaN; those coordinates keep their previous value.",
                          stacklevel=2)
            s = torch.where(torch.isnan(s), torch.tensor(self._prev, dtype=_F64), s)
        point = s.tolist()
        gain = self._archive.gain(point)
        if self.variant == "scalar":
            self._multiplier = 0.5 + 1.5 * math.tanh(gain)
        elif gain > 0 and k > 1:
            contrib = []
            for j in range(k):
                worse = list(point)
                if self._maximize[j]:
                    worse[j] = min(point[j], self._prev[j])
                else:
                    worse[j] = max(point[j], self._prev[j])
                contrib.append(max(gain - self._archive.gain(worse), 0.0))
            self._last_contrib = contrib
            total = sum(contrib)
            if total > 0:
                z = torch.tensor(contrib, dtype=_F64) / total
                self._log_p = torch.log_softmax(self._log_p + self.eta * z, dim=0)
        self._archive.add(point)
        self._prev = point
        self._last_gain = gain
        self._last = self._current()
        return gain

    def metrics(self):
        out = super().metrics()
        out["hypervolume/gain"] = self._last_gain
        out["hypervolume/multiplier"] = self._multiplier
        if self._archive is not None:
            out["hypervolume/archive_size"] = float(len(self._archive))
            out["hypervolume/value"] = self._archive.hypervolume()
        return out

    def _state(self):
        return {
            "log_p": _floats(self._log_p),
            "multiplier": self._multiplier,
            "archive": None if self._archive is None else self._archive.state_dict(),
            "prev": None if self._prev is None else list(self._prev),
            "last_gain": self._last_gain,
            "last_contrib": list(self._last_contrib),
            "observations": self._observations,
        }

    def _load(self, state):
        self._log_p = torch.tensor(state["log_p"], dtype=_F64)
        self._multiplier = float(state["multiplier"])
        self._archive = None if state["archive"] is None else ParetoArchive.from_state_dict(state["archive"])
        self._prev = None if state["prev"] is None else [float(v) for v in state["prev"]]
        self._last_gain = float(state["last_gain"])
        self._last_contrib = [float(v) for v in state["last_contrib"]]
        self._observations = int(state["observations"])


# ---- gradient-based (Lu et al. 2025) ------------------------------------------------------------------------------


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
    s = _f64(gram)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"The gradient Gram must be a square (K, K) matrix, got shape {tuple(s.shape)}.")
    if clip_norm is None:
        return s.clone()
    clip_norm = float(clip_norm)
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}.")
    n = s.diagonal().clamp(min=0).sqrt() if norms is None else _f64(norms).flatten()
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
    grads = [_f64(g).flatten() for g in gradients]
    if not grads:
        raise ValueError("gram_from_gradients needs one gradient per reward function; got none.")
    if len({g.numel() for g in grads}) != 1:
        raise ValueError(f"The gradients have different sizes {[g.numel() for g in grads]}; flatten the same parameters "
                         "for every reward function.")
    g = torch.stack([x.cpu() for x in grads])
    return clip_gram(g @ g.T, clip_norm, norms)


@register_reward_weighting("gradient")
class GradientWeighting(_RewardWeightingBase):
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
        self.lr = _number(lr, "lr", low=0.0)
        self.reg = _number(reg, "reg", low=0.0, low_open=True)
        self.accumulation_steps = _integer(accumulation_steps, "accumulation_steps")
        self.clip_norm = None if clip_norm is None else _number(clip_norm, "clip_norm", low=0.0, low_open=True)
        self.clip_scope = _choice(clip_scope, "clip_scope", self.CLIP_SCOPES)

    def _check_initial(self, w0):
        if len(self.reward_names) > 1:
            self._require_positive(w0)

    def _reset(self):
        k = len(self.reward_names)
        w0 = self.initial_weights
        self._total = float(w0.sum())
        self._log_p = (w0 / w0.sum()).log() if (w0 > 0).all() else torch.zeros(k, dtype=_F64)
        self._acc = torch.zeros(k, dtype=_F64)
        self._calls = 0
        self._last_scores = [0.0] * k

    def _current(self):
        if len(self.reward_names) == 1:
            return self.initial_weights.clone()
        return self._total * torch.softmax(self._log_p, dim=0)

    def _compute(self, rewards, step):
        return self._current()

    def gram(self, gradients, norms=None) -> torch.Tensor:
        """:func:`gram_from_gradients` with this weighter's ``clip_norm``."""
        return gram_from_gradients(gradients, self.clip_norm, norms)

    def update_from_gram(self, gram, step: int, lr: float | None = None) -> torch.Tensor:
        """Accumulate ``s = S.sum(1)``; every ``accumulation_steps`` calls apply the update. Returns the current
        weights (float32); they apply from the next :meth:`weights` call."""
        self._require_bound()
        k = len(self.reward_names)
        s = _f64(gram)
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
            self._last_scores = _floats(scores)
            if k > 1:
                self._log_p = torch.log_softmax(self._log_p + (rate / self.reg) * scores, dim=0)
            self._acc = torch.zeros(k, dtype=_F64)
        self._last = self._current()
        return self.current_weights()

    def metrics(self):
        out = super().metrics()
        for n, v in zip(self.reward_names, self._last_scores):
            out[f"gradient_influence/{n}"] = v
        return out

    def _state(self):
        return {"log_p": _floats(self._log_p), "acc": _floats(self._acc), "calls": self._calls,
                "last_scores": list(self._last_scores)}

    def _load(self, state):
        self._log_p = torch.tensor(state["log_p"], dtype=_F64)
        self._acc = torch.tensor(state["acc"], dtype=_F64)
        self._calls = int(state["calls"])
        self._last_scores = [float(v) for v in state["last_scores"]]


# ---- Nelder–Mead (ask/tell) ---------------------------------------------------------------------------------------


class NelderMead:
    """Nelder–Mead minimization as an explicit ask/tell state machine, so one evaluation can span many training steps
    and the search survives a checkpoint.

    ``ask()`` returns the point to evaluate (``None`` when finished); ``tell(f)`` gives its value. Coefficients are the
    standard ones the constrained-RLHF authors use (``scripts/training/task_configs/dialog/gpt2_nm_ppo.yml``:
    α 1, γ 2, ρ 0.5, σ 0.5, tol 0.01, max_iters 10). The iteration follows their loop
    (``rl4lms/envs/text_generation/training_utils.py``, ``NelderMeadTrainer.train_and_eval``): order, reflect, expand,
    inside contraction, shrink. Differences: an expansion is accepted when it beats the *reflected* point (the
    standard rule; they compare with the best point, which can keep an expansion worse than the reflection); the
    convergence test (std of the simplex values < tol) runs at the start of every iteration, not only after a shrink;
    the initial simplex is deterministic (given by the caller) rather than random, so every rank agrees.
    """

    def __init__(self, simplex, alpha: float = 1.0, gamma: float = 2.0, rho: float = 0.5, sigma: float = 0.5,
                 tol: float = 0.01, max_iters: int = 10):
        x = np.asarray(simplex, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != x.shape[1] + 1:
            raise ValueError(f"A Nelder–Mead simplex in n dimensions has n + 1 vertices; got shape {x.shape}.")
        self.alpha, self.gamma, self.rho, self.sigma = float(alpha), float(gamma), float(rho), float(sigma)
        self.tol, self.max_iters = float(tol), int(max_iters)
        self.x = x.copy()
        self.f = np.full(x.shape[0], np.nan)
        self.phase = "init"
        self.index = 0
        self.iters = 0
        self.pending = self.x[0].copy()
        self.centroid = None
        self.reflected = None
        self.f_reflected = None

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def best(self) -> np.ndarray:
        """The best vertex evaluated so far (the first vertex before any evaluation)."""
        if np.isnan(self.f).all():
            return self.x[0].copy()
        return self.x[int(np.nanargmin(self.f))].copy()

    def ask(self) -> np.ndarray | None:
        return None if self.done else self.pending.copy()

    def _start_iteration(self) -> None:
        order = np.argsort(self.f, kind="stable")
        self.x, self.f = self.x[order], self.f[order]
        if self.iters >= self.max_iters or float(np.std(self.f)) < self.tol:
            self.phase, self.pending = "done", None
            return
        self.iters += 1
        self.centroid = self.x[:-1].mean(axis=0)
        self.reflected = self.centroid + self.alpha * (self.centroid - self.x[-1])
        self.phase, self.pending = "reflect", self.reflected.copy()

    def tell(self, value: float) -> None:
        if self.done:
            raise RuntimeError("Nelder–Mead search is finished; nothing to tell.")
        value = float(value)
        if math.isnan(value):
            raise ValueError("Nelder–Mead got a NaN objective value.")
        if self.phase == "init":
            self.f[self.index] = value
            self.index += 1
            if self.index < self.x.shape[0]:
                self.pending = self.x[self.index].copy()
            else:
                self._start_iteration()
        elif self.phase == "reflect":
            if self.f[0] <= value < self.f[-2]:
                self.x[-1], self.f[-1] = self.reflected, value
                self._start_iteration()
            elif value < self.f[0]:
                self.f_reflected = value
                self.phase = "expand"
                self.pending = self.centroid + self.gamma * (self.reflected - self.centroid)
            else:
                self.phase = "contract"
                self.pending = self.centroid + self.rho * (self.x[-1] - self.centroid)
        elif self.phase == "expand":
            if value < self.f_reflected:
                self.x[-1], self.f[-1] = self.pending, value
            else:
                self.x[-1], self.f[-1] = self.reflected, self.f_reflected
            self._start_iteration()
        elif self.phase == "contract":
            if value < self.f[-1]:
                self.x[-1], self.f[-1] = self.pending, value
                self._start_iteration()
            else:
                self.x[1:] = self.x[0] + self.sigma * (self.x[1:] - self.x[0])
                self.f[1:] = np.nan
                self.phase, self.index = "shrink", 1
                self.pending = self.x[1].copy()
        elif self.phase == "shrink":
            self.f[self.index] = value
            self.index += 1
            if self.index < self.x.shape[0]:
                self.pending = self.x[self.index].copy()
            else:
                self._start_iteration()

    def state_dict(self) -> dict:
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.float64).tolist()

        return {
            "x": arr(self.x), "f": arr(self.f), "phase": self.phase, "index": self.index, "iters": self.iters,
            "pending": arr(self.pending), "centroid": arr(self.centroid), "reflected": arr(self.reflected),
            "f_reflected": self.f_reflected,
            "coef": [self.alpha, self.gamma, self.rho, self.sigma, self.tol, self.max_iters],
        }

    def load_state_dict(self, state: dict) -> None:
        def arr(a):
            return None if a is None else np.asarray(a, dtype=np.float64)

        self.x, self.f = arr(state["x"]), arr(state["f"])
        self.phase, self.index, self.iters = state["phase"], int(state["index"]), int(state["iters"])
        self.pending, self.centroid, self.reflected = arr(state["pending"]), arr(state["centroid"]), arr(
            state["reflected"])
        self.f_reflected = state["f_reflected"]
        a, g, r, s, tol, it = state["coef"]
        self.alpha, self.gamma, self.rho, self.sigma, self.tol, self.max_iters = a, g, r, s, tol, int(it)


# ---- constrained (Moskovitz et al., ICLR 2024) --------------------------------------------------------------------


@register_reward_weighting("constrained")
class ConstrainedWeighting(_RewardWeightingBase):
    """Constrained RLHF with Lagrange multipliers (Moskovitz et al., ICLR 2024; ``tedmoskovitz/ConstrainedRL4LMs``,
    ``rl4lms/algorithms/constrained_ppo/constrained_ppo.py``).

    One reward is the *task* (the unconstrained objective; ``task`` = name or index, default 0 — their
    ``maximizing_reward="kl"`` setting, where the KL reward plays this role); each of the other ``n = K − 1`` rewards
    is a constraint ``J_i ≥ τ_i`` (``squash="sigmoid"``, inequality) or ``J_i = τ_i`` (``squash="tanh"``, equality;
    their ``equality_constraints=True``). Multipliers ``λ_i = squash(θ_i)``, ``θ_i = init`` (default 0: λ = 0.5 for
    sigmoid, 0 for tanh; their ``lagrange_init`` default).

    Weights (their mixed advantage ``(n − Σλ)·A_task + Σ_i λ_i A_i``): ``w_task = n − Σλ``, ``w_i = λ_i``. The weights
    returned for a batch use the multipliers *before* that batch's dual step (their order: the policy minibatch uses the
    current λ, then λ is stepped). The configured ``reward_weights`` are not used (a warning if they are not all 1).

    Dual step, once per generation batch (``dual_steps`` times): ``J_i`` = batch mean of reward i over its valid
    entries (no valid entry → no gradient for θ_i), loss ``L(θ) = Σ_i λ_i(θ_i)·(J_i − τ_i)`` (their
    ``lagrange_loss``), gradient ``g_i = squash'(θ_i)(J_i − τ_i)``, clipped to norm ``dual_grad_clip`` (their
    ``clip_grad_norm_([lagrange], max_grad_norm)``, SB3's default 0.5; ``None`` disables), then SGD with momentum
    exactly as ``torch.optim.SGD`` (dampening 0, no Nesterov): ``b ← g`` on the first step, else ``b ← μ·b + g``;
    ``θ ← θ − dual_lr·b``. A violated inequality (``J_i < τ_i``) gives ``g_i < 0``, so θ_i and λ_i grow.

    ``dual_lr``: default 0.1, the value of their shipped configs that learn λ (``gpt2_nm_ppo.yml``,
    ``gpt2_constrained_ppo.yml``); the constructor default in their code is 1e-2. 0.1 is used because their dual step
    runs once per PPO minibatch (n_epochs × minibatches ≈ 200 steps per rollout in those configs) while ours runs once
    per generation batch; ``dual_steps`` repeats the step on the same batch means to approach their cadence.
    ``momentum`` 0.1 (their latest code; an earlier version used 0.9).

    Mapping to TRL's aggregation — what is implemented exactly:

    - ``multi_objective_aggregation="normalize_then_sum"``: TRL z-scores each reward within its group, multiplies by
      these weights and sums, then standardizes the sum over the batch. That is their mixed advantage with
      per-objective z-scored advantages (they z-score per minibatch; TRL per group), up to one positive factor and
      shift common to all samples. This is the faithful setting.
    - ``"sum_then_normalize"`` (TRL's default): the weights multiply the *raw* rewards and the sum is normalized per
      group, so a reward with a larger spread dominates regardless of λ. ``scale_by_std=True`` divides each weight
      by that reward's batch std (population, NaN-robust; a constant reward gets weight 0), which approximates
      per-objective standardization with batch-level instead of group-level statistics.

    Nelder–Mead threshold search (``nelder_mead=True``; their ``NelderMeadTrainer``): the thresholds are searched
    within one run. The initial simplex is ``τ`` and ``τ + δ_i e_i`` (``δ_i = nm_step·|τ_i|``, or ``nm_step`` when
    ``τ_i = 0``). A candidate is "evaluated" when, at a validation (:meth:`observe_validation`), every constraint's
    validation score is within ``nm_reach_tolerance·|τ_i|`` of its threshold (their ``reached``: within ±5%), or after
    ``nm_patience`` validations (they keep training until the run ends); its value is ``−objective`` (the
    ``objective`` passed to :meth:`observe_validation`, default the task reward's validation score — they minimize
    their evaluation function's return value; here a score to maximize is expected). λ and the momentum are kept across
    candidates, as in their code. After the search the best vertex's thresholds stay.
    """

    def __init__(self, thresholds=None, task=0, squash: str = "sigmoid", dual_lr: float = 0.1, momentum: float = 0.1,
                 init=0.0, dual_grad_clip: float | None = 0.5, dual_steps: int = 1, scale_by_std: bool = False,
                 nelder_mead: bool = False, nm_alpha: float = 1.0, nm_gamma: float = 2.0, nm_rho: float = 0.5,
                 nm_sigma: float = 0.5, nm_tol: float = 0.01, nm_max_iters: int = 10, nm_step: float = 0.1,
                 nm_reach_tolerance: float = 0.05, nm_patience: int = 10):
        super().__init__(None)
        if thresholds is not None:
            _spec_items(thresholds, "thresholds", allow_none=True)
        self._thresholds_spec = thresholds
        if isinstance(task, bool) or not isinstance(task, int | str):
            raise ValueError(f"{_field('task')} must be a reward function name or index, got {task!r}.")
        self._task_spec = task
        self.squash = _choice(squash, "squash", ("sigmoid", "tanh"))
        self.dual_lr = _number(dual_lr, "dual_lr", low=0.0)
        self.momentum = _number(momentum, "momentum", low=0.0, high=1.0)
        if isinstance(init, int | float) and not isinstance(init, bool):
            _number(init, "init")
        else:
            _spec_items(init, "init")
        self._init_spec = init
        self.dual_grad_clip = None if dual_grad_clip is None else _number(dual_grad_clip, "dual_grad_clip", low=0.0,
                                                                          low_open=True)
        self.dual_steps = _integer(dual_steps, "dual_steps")
        if not isinstance(scale_by_std, bool):
            raise ValueError(f"{_field('scale_by_std')} must be True or False, got {scale_by_std!r}.")
        self.scale_by_std = scale_by_std
        if not isinstance(nelder_mead, bool):
            raise ValueError(f"{_field('nelder_mead')} must be True or False, got {nelder_mead!r}.")
        self.nelder_mead = nelder_mead
        self.needs_validation = nelder_mead
        self._nm_coef = dict(
            alpha=_number(nm_alpha, "nm_alpha", low=0.0, low_open=True),
            gamma=_number(nm_gamma, "nm_gamma", low=1.0, low_open=True),
            rho=_number(nm_rho, "nm_rho", low=0.0, low_open=True, high=0.5),
            sigma=_number(nm_sigma, "nm_sigma", low=0.0, low_open=True, high=1.0),
            tol=_number(nm_tol, "nm_tol", low=0.0),
            max_iters=_integer(nm_max_iters, "nm_max_iters", minimum=0),
        )
        self.nm_step = _number(nm_step, "nm_step", low=0.0, low_open=True)
        self.nm_reach_tolerance = _number(nm_reach_tolerance, "nm_reach_tolerance", low=0.0)
        self.nm_patience = _integer(nm_patience, "nm_patience")

    def _check_initial(self, w0):
        if not torch.equal(w0, torch.ones_like(w0)):
            warnings.warn(f"reward_weighting='constrained' sets the weights from its Lagrange multipliers; the configured "
                          f"reward_weights {w0.tolist()} are not used.", stacklevel=3)

    def _reset(self):
        names = self.reward_names
        k = len(names)
        task = self._task_spec
        if isinstance(task, str):
            if task not in names:
                raise ValueError(f"{_field('task')} = {task!r} is not a reward function; the K = {k} reward functions "
                                 f"are {names}.")
            task = names.index(task)
        elif not -k <= task < k:
            raise ValueError(f"{_field('task')} = {task} is out of range for K = {k} reward functions {names}.")
        self.task = task % k
        self.constraints = [i for i in range(k) if i != self.task]
        n = len(self.constraints)
        if n == 0:
            if self._thresholds_spec not in (None, [], {}):
                raise ValueError(f"{_field('thresholds')} was given but there is a single reward function {names}: "
                                 "nothing to constrain.")
            tau = []
        else:
            if self._thresholds_spec is None:
                raise ValueError(f"reward_weighting='constrained' needs {_field('thresholds')}: one threshold per "
                                 f"constraint reward {[names[i] for i in self.constraints]} (K = {k} reward functions "
                                 f"{names}; task {names[self.task]!r}).")
            resolved = _resolve_per_reward(self._thresholds_spec, names, "thresholds", skip=self.task)
            tau = [resolved[i] for i in self.constraints]
        self._tau = torch.tensor(tau, dtype=_F64)
        if isinstance(self._init_spec, int | float):
            theta = [float(self._init_spec)] * n
        else:
            vals = self._init_spec.tolist() if hasattr(self._init_spec, "tolist") else list(self._init_spec)
            if len(vals) != n:
                raise ValueError(f"{_field('init')} has {len(vals)} entries; expected one per constraint reward "
                                 f"({n}: {[names[i] for i in self.constraints]}).")
            theta = [float(v) for v in vals]
        self._theta = torch.tensor(theta, dtype=_F64)
        self._buf: torch.Tensor | None = None
        self._last_violation = [0.0] * n
        self._nm: NelderMead | None = None
        self._nm_validations = 0
        if self.nelder_mead and n > 0:
            simplex = [list(tau)]
            for i in range(n):
                v = list(tau)
                v[i] += self.nm_step * abs(tau[i]) if tau[i] != 0 else self.nm_step
                simplex.append(v)
            self._nm = NelderMead(simplex, **self._nm_coef)
            self._tau = torch.tensor(self._nm.ask(), dtype=_F64)
        self._last = self._mix()

    # -- multipliers --

    def _squash(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(theta) if self.squash == "sigmoid" else torch.tanh(theta)

    def _squash_grad(self, theta: torch.Tensor) -> torch.Tensor:
        if self.squash == "sigmoid":
            s = torch.sigmoid(theta)
            return s * (1 - s)
        t = torch.tanh(theta)
        return 1 - t * t

    @property
    def multipliers(self) -> torch.Tensor:
        """``λ = squash(θ)``, float64 ``(n,)`` in constraint order."""
        self._require_bound()
        return self._squash(self._theta)

    @property
    def thresholds(self) -> dict[str, float]:
        """Current thresholds by constraint reward name (Nelder–Mead moves them)."""
        self._require_bound()
        return {self.reward_names[i]: float(t) for i, t in zip(self.constraints, self._tau.tolist())}

    def _mix(self) -> torch.Tensor:
        k = len(self.reward_names)
        if k == 1:
            return self.initial_weights.clone()
        lam = self._squash(self._theta)
        w = torch.zeros(k, dtype=_F64)
        w[self.task] = len(self.constraints) - lam.sum()
        w[self.constraints] = lam
        return w

    def _compute(self, rewards, step):
        w = self._mix()
        if self.scale_by_std:
            _, _, var = column_stats(rewards)
            std = var.sqrt()
            scaled = torch.where(std > 0, w / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(w))
            w = scaled if (scaled != 0).any() else w
        self._dual_step(rewards)
        return w

    def _dual_step(self, rewards: torch.Tensor) -> None:
        if not self.constraints:
            return
        count, mean, _ = column_stats(rewards)
        seen = count[self.constraints] > 0
        violation = torch.where(seen, mean[self.constraints] - self._tau, torch.zeros_like(self._tau))
        self._last_violation = _floats(violation)
        for _ in range(self.dual_steps):
            g = self._squash_grad(self._theta) * violation
            if self.dual_grad_clip is not None:
                norm = float(g.norm())
                coef = min(1.0, self.dual_grad_clip / (norm + 1e-6))
                g = g * coef
            self._buf = g.clone() if self._buf is None else self.momentum * self._buf + g
            self._theta = self._theta - self.dual_lr * self._buf

    # -- Nelder–Mead --

    def observe_validation(self, scores, step: int, objective: float | None = None) -> None:
        """Nelder–Mead bookkeeping at a validation (only with ``nelder_mead=True``; otherwise ignored).

        ``scores`` are the per-reward validation means ``(K,)``; ``objective`` is the scalar to maximize (default the
        task reward's score). When the current candidate thresholds are reached (or patience runs out) the candidate's
        value is recorded and the next candidate becomes the thresholds from the next :meth:`weights` call.
        """
        self._require_bound()
        if self._nm is None or self._nm.done:
            return
        k = len(self.reward_names)
        s = _f64(scores).flatten()
        if s.numel() != k:
            raise ValueError(f"observe_validation got {s.numel()} scores; expected one per reward function "
                             f"(K = {k}: {self.reward_names}).")
        value = float(s[self.task]) if objective is None else float(objective)
        if not math.isfinite(value):
            raise ValueError(f"The Nelder–Mead objective must be finite, got {value} (scores {s.tolist()}).")
        self._nm_validations += 1
        c = s[self.constraints]
        reached = bool(torch.all((c - self._tau).abs() <= self.nm_reach_tolerance * self._tau.abs()).item()) and not (
            torch.isnan(c).any().item())
        if reached or self._nm_validations >= self.nm_patience:
            self._nm.tell(-value)
            self._nm_validations = 0
            nxt = self._nm.ask()
            self._tau = torch.tensor(self._nm.best() if nxt is None else nxt, dtype=_F64)

    # -- logging and state --

    def metrics(self):
        out = super().metrics()
        lam = self._squash(self._theta).tolist()
        for j, i in enumerate(self.constraints):
            name = self.reward_names[i]
            out[f"lagrange/{name}"] = lam[j]
            out[f"threshold/{name}"] = float(self._tau[j])
            out[f"violation/{name}"] = self._last_violation[j]
        return out

    def _state(self):
        return {
            "theta": _floats(self._theta),
            "buf": None if self._buf is None else _floats(self._buf),
            "tau": _floats(self._tau),
            "last_violation": list(self._last_violation),
            "nm": None if self._nm is None else self._nm.state_dict(),
            "nm_validations": self._nm_validations,
        }

    def _load(self, state):
        self._theta = torch.tensor(state["theta"], dtype=_F64)
        self._buf = None if state["buf"] is None else torch.tensor(state["buf"], dtype=_F64)
        self._tau = torch.tensor(state["tau"], dtype=_F64)
        self._last_violation = [float(v) for v in state["last_violation"]]
        if state["nm"] is not None:
            if self._nm is None:
                raise ValueError("The saved state has a Nelder–Mead search but nelder_mead=False in this run.")
            self._nm.load_state_dict(state["nm"])
        self._nm_validations = int(state["nm_validations"])
