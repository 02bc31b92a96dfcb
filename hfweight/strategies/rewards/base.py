"""Multi-objective reward weighting for GRPO / RLOO: the common base and helpers (docs/methods.md#rewards).

Each strategy turns the rewards of one generation batch ``(N, K)`` — K reward functions, gathered over all ranks, NaN
where a reward function returned None — into the weights ``(K,)`` that TRL multiplies them by
(``self.reward_weights``, a float32 CPU tensor read right after ``_calculate_rewards``). Strategies are pure math plus
explicit state: no Trainer, no process group. Every rank sees the same inputs and computes the same weights.

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
1. **Every generation batch.** After TRL's ``_calculate_rewards`` (rewards gathered over all ranks):
   ``self.reward_weights = weighter.weights(rewards_per_func.float().cpu(), step=self.state.global_step)`` when the
   model is training, or ``weighter.current_weights()`` when evaluating. TRL reads ``self.reward_weights`` right
   after, in both ``sum_then_normalize`` and ``normalize_then_sum``.
2. **Validation** (``needs_validation`` is True: ``hypervolume``; ``constrained`` with ``nelder_mead=True``). Once
   before the first training generation batch (this sets the hypervolume reference), then every
   ``reward_validation_steps`` optimizer steps (the authors validate after every step): generate on the held-out
   prompts, score with the same reward functions, gather over ranks, take the NaN-robust mean per reward →
   ``scores (K,)``, and call ``observe_validation(scores, step)`` on every rank with identical numbers. The new weights
   apply from the *next* ``weights()`` call, i.e. the next generation batch (the authors also apply the multiplier to
   the next step).
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

from collections.abc import Mapping

import numpy as np
import torch

from ..base import RewardWeighting
from ..checks import is_finite_number, kwargs_field, spec_items

F64 = torch.float64


def kwarg(name: str) -> str:
    """How the entry ``name`` of ``reward_weighting_kwargs`` is named in errors."""
    return kwargs_field("reward_weighting", name)


def per_reward_spec(spec, name: str, allow_none: bool = False) -> list:
    """Construction-time check of a per-reward spec (list or dict of numbers); names are checked at bind."""
    items = spec_items(spec)
    if items is None:
        raise ValueError(f"{kwarg(name)} must be a list (one entry per reward function) or a {{reward name: value}} "
                         f"dict, got {spec!r}.")
    for key, value in items:
        if value is None and allow_none:
            continue
        if not is_finite_number(value):
            raise ValueError(f"{kwarg(name)} gives {key!r} the value {value!r}; expected a finite number.")
    return items


def resolve_per_reward(spec, names: list[str], name: str, *, allow_none: bool = False, skip: int | None = None):
    """A per-reward spec as a list aligned with ``names`` (``None`` where allowed and absent).

    A list must have one entry per reward (or, with ``skip``, one per reward other than ``names[skip]``). A dict must
    name rewards that exist; with ``allow_none`` missing names give ``None``, otherwise they are an error.
    """
    k = len(names)
    wanted = [i for i in range(k) if i != skip]
    if isinstance(spec, Mapping):
        if len(set(names)) != k:
            raise ValueError(f"{kwarg(name)} is a dict but the reward function names {names} are not unique; give a "
                             "list in reward order instead.")
        unknown = sorted(set(map(str, spec)) - set(names))
        if unknown:
            raise ValueError(f"{kwarg(name)} names unknown reward function(s) {unknown}; the {k} reward functions are "
                             f"{names}.")
        by_name = {str(key): value for key, value in spec.items()}
        if skip is not None and names[skip] in by_name and by_name[names[skip]] is not None:
            raise ValueError(f"{kwarg(name)} gives a value to {names[skip]!r}, which is the task reward (it has no "
                             f"threshold). Constraint rewards: {[names[i] for i in wanted]}.")
        missing = [names[i] for i in wanted if names[i] not in by_name]
        if missing and not allow_none:
            raise ValueError(f"{kwarg(name)} has no entry for reward function(s) {missing}; the {k} reward functions "
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
        raise ValueError(f"{kwarg(name)} has {len(values)} entries; expected {target}.")
    out = [None] * k
    for i, value in zip(wanted, values):
        if value is None and not allow_none:
            raise ValueError(f"{kwarg(name)} has no value for reward function {names[i]!r}.")
        out[i] = None if value is None else float(value)
    return out


def as_f64(x) -> torch.Tensor:
    """float64 CPU tensor from a tensor, an array or (nested) lists, without a float32 round trip."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", F64)
    return torch.from_numpy(np.array(x, dtype=np.float64))


def valid_rewards(rewards, k: int) -> torch.Tensor:
    """The batch as float64 ``(M, K)`` with rows where every reward is NaN removed."""
    r = as_f64(rewards)
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
    count = valid.sum(dim=0).to(F64)
    x = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = x.sum(dim=0) / count.clamp(min=1)
    dev = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    var = (dev * dev).sum(dim=0) / count.clamp(min=1)
    return count, mean, var


def floats(t: torch.Tensor) -> list[float]:
    """A tensor as a list of Python floats (the form the states are saved in)."""
    return [float(v) for v in t.tolist()]


def simplex_log_weights(w0: torch.Tensor) -> torch.Tensor:
    """``log(w0 / Σ w0)``: the starting log-weights ``log p`` of a strategy whose weights are ``(Σ w0)·softmax(log p)``
    (``hypervolume`` per objective, ``gradient``); zeros when some ``w0 ≤ 0`` (those strategies refuse it for K > 1)."""
    return (w0 / w0.sum()).log() if (w0 > 0).all() else torch.zeros_like(w0)


def keep_total(w0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w`` rescaled so that ``Σ|w| = Σ|w0|`` (the initial weights' total); ``w0`` itself when ``w`` is all zero.

    RLOO's advantages (and its KL penalty folded into the reward) scale with the weights, so a weighter that only
    means to change the *ratios* between rewards must leave their total where the user put it."""
    target, total = w0.abs().sum(), w.abs().sum()
    if not total > 0:
        return w0.clone()
    return w * (target / total)


class Weighter(RewardWeighting):
    """The built-ins' shared plumbing: binding, input checks, the last weights, state and metrics.

    A subclass implements :meth:`_compute` and, when it has state, :meth:`_reset`, :meth:`_state` and :meth:`_load`.
    """

    def __init__(self, weights=None):
        if weights is not None:
            per_reward_spec(weights, "weights")
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
            w0 = torch.ones(k, dtype=F64)
        else:
            w0 = as_f64(initial_weights).flatten()
        if w0.numel() != k:
            raise ValueError(f"`reward_weights` has {w0.numel()} entries but there are K = {k} reward functions "
                             f"{names}; give one weight per reward function.")
        if not torch.isfinite(w0).all():
            raise ValueError(f"`reward_weights` {w0.tolist()} contain NaN or infinite values.")
        if self._weights_spec is not None:
            w0 = torch.tensor(resolve_per_reward(self._weights_spec, names, "weights"), dtype=F64)
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
                             f"{kwarg('weights')}).")

    def _require_bound(self) -> None:
        if self.initial_weights is None:
            raise RuntimeError(f"reward_weighting={self.name!r} was used before `bind(reward_names, initial_weights)`.")

    # -- weights --

    def weights(self, rewards: torch.Tensor, step: int) -> torch.Tensor:
        self._require_bound()
        r = valid_rewards(rewards, len(self.reward_names))
        if len(self.reward_names) == 1 and self._single_is_initial():
            w = self.initial_weights.clone()
        else:
            w = self._compute(r, int(step))
        w = torch.nan_to_num(w.to(F64), nan=0.0)
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
            "initial_weights": floats(self.initial_weights),
            "last": floats(self._last),
            **self._state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._require_bound()
        if list(state.get("reward_names", [])) != self.reward_names:
            raise ValueError(f"The saved reward weighting state is for reward functions {state.get('reward_names')}, "
                             f"but this run has {self.reward_names}. Resume with the same reward functions.")
        self.initial_weights = torch.tensor(state["initial_weights"], dtype=F64)
        self._last = torch.tensor(state["last"], dtype=F64)
        self._load(state)

    def _state(self) -> dict:
        return {}

    def _load(self, state: dict) -> None:
        del state

