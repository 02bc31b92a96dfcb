"""Domain-mixture controllers (docs/methods.md#mixture-modes).

Every controller keeps a mixture ``α`` over the ``k`` domains of the training set (sorted names, bound by the glue with
:meth:`MixtureController.bind`) and returns it as a float64 ``(k,)`` tensor from :meth:`probabilities`. Controllers
are pure math plus explicit state: no Trainer, no process group. The glue calls :meth:`observe` once per optimizer
step, on every rank, with all-reduced :class:`DomainStats`, so every rank computes the same update.

The linear mixing law
---------------------
Most methods are one update (Aioli's "linear mixing law" view): ``log α ← log α + η · A·signal``, renormalized, smoothed
towards uniform and floored. :func:`mix_update` is that update, written once; DoReMi (excess loss), Aioli (held-out
loss drops), Skill-it (skills graph × held-out losses) and DGA (gradient alignment) differ only in the signal and
``A``. ODM's EXP3 is the exception (its exploration term mixes in ``ε_t`` additively).

Guards shared by every controller except ``static`` (whose user weights are applied exactly):

- ``min_prob`` (default ``1e-4``): no domain ever falls below it (:func:`floor_probabilities`, mass taken
  proportionally from the others); set 0 to allow a domain to vanish. ``k · min_prob`` must be ≤ 1.
- NaN in a signal entry means "no information about this domain this time" and leaves its log-weight unchanged; an
  infinite signal is clipped; a mixture that would come out NaN keeps the previous one. Probabilities are never NaN.
- A single domain always has probability 1.

Protocol the trainer glue implements (all methods exist on every built-in controller; user controllers may lack them,
so the glue uses ``getattr``):

- ``set_total_steps(n)``: called once before training with the number of optimizer steps (``schedule`` needs it).
- ``observe(stats)``: once per optimizer step, every rank, all-reduced stats; ``stats.step`` = steps completed before.
- ``eval_requested() -> bool``: checked before training and after every :meth:`observe`; when True the glue computes
  per-domain held-out token-mean losses ``(k,)`` (NaN for a domain without held-out rows), all-reduced, and calls
  ``observe_eval(losses, step)`` *before the next optimizer step*. ``aioli`` and ``skillit`` raise if ``observe`` comes
  while their request is pending. Unrequested ``observe_eval`` calls are ignored by them.
- ``wants_probe() -> Tensor | None``: Aioli's probe mixture while a probe runs; :meth:`probabilities` then returns the
  probe too, so the glue needs nothing else to train on it (resample or upweight).
- ``gradients_requested() -> bool`` / ``observe_gradients(inner_products, step)`` (``dga``, ``needs_target = True``).
- ``final_probabilities()``: the mixture to write as the run's result (DoReMi: the time-average).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ..registry import register_mixture
from .base import DomainStats, MixtureController

_F64 = torch.float64
_SIGNAL_CLIP = 1e100  # an infinite signal is clipped here: large enough to saturate, small enough to stay finite × η


# ---- helpers ------------------------------------------------------------------------------------------------------


def normalize_domain_weights(weights, domain_names: list[str], field: str = "mixture_kwargs['weights']") -> torch.Tensor:
    """Turn user weights (a ``{domain: weight}`` dict or a list in domain order) into probabilities ``(k,)``.

    Domains missing from a dict get weight 0. Errors name the offending domain and what would fix it.
    """
    k = len(domain_names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(map(str, weights)) - set(domain_names))
        if unknown:
            raise ValueError(
                f"{field} names unknown domain(s) {unknown}; the dataset's domains are {domain_names}. "
                "Fix the names or the dataset's domain column."
            )
        by_name = {str(name): value for name, value in weights.items()}
        values = [float(by_name.get(name, 0.0)) for name in domain_names]
    else:
        if isinstance(weights, torch.Tensor | np.ndarray):
            weights = weights.tolist()
        values = [float(w) for w in weights]
        if len(values) != k:
            raise ValueError(
                f"{field} has {len(values)} entries but the dataset has {k} domains {domain_names}; "
                "give one weight per domain or use a {domain: weight} dict."
            )
    for name, value in zip(domain_names, values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{field} gives domain {name!r} the weight {value}; weights must be finite and ≥ 0.")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"{field} gives every domain weight 0; at least one weight must be positive.")
    return torch.tensor(values, dtype=_F64) / total


def load_weights_file(path, field: str = "mixture_kwargs['weights']") -> dict:
    """Read a mixture from a JSON file: ``{"weights": {domain: weight}}`` (what the trainer writes to
    ``mixture_weights.json`` at the end of every run) or a bare ``{domain: weight}`` object."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{field}={path!r}: no such file; give a {{domain: weight}} dict, a list, or a JSON file path.")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{field}={path!r} is not readable JSON: {err}") from err
    if isinstance(data, Mapping) and isinstance(data.get("weights"), Mapping):
        data = data["weights"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{field}={path!r} must hold {{'weights': {{domain: weight}}}} or {{domain: weight}}.")
    return dict(data)


def _resolve_weight_spec(weights, field: str):
    """A weights spec with a file path replaced by the mapping it holds (see :func:`load_weights_file`)."""
    if isinstance(weights, str | os.PathLike):
        return load_weights_file(weights, field)
    return weights


def _check_weight_spec(weights, field: str) -> None:
    """Construction-time check of a weights spec (dict or list): numbers, finite, ≥ 0. Names are checked at bind."""
    if weights is None:
        return
    if isinstance(weights, Mapping):
        items = list(weights.items())
    elif isinstance(weights, Sequence | torch.Tensor | np.ndarray) and not isinstance(weights, str):
        items = list(enumerate(weights.tolist() if hasattr(weights, "tolist") else weights))
    else:
        raise ValueError(f"{field} must be a {{domain: weight}} dict or a list of weights, got {weights!r}.")
    for name, value in items:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{field} gives domain {name!r} the weight {value!r}; weights must be finite numbers ≥ 0."
            )


def _positive(value, name: str, allow_zero: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"mixture_kwargs['{name}'] must be a number, got {value!r}.") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"mixture_kwargs['{name}'] must be a finite number {bound}, got {value!r}.")
    return value


def _fraction(value, name: str, *, closed_right: bool = False) -> float:
    value = _positive(value, name, allow_zero=True)
    if value > 1 or (value == 1 and not closed_right):
        raise ValueError(f"mixture_kwargs['{name}'] must be in [0, 1{']' if closed_right else ')'}, got {value!r}.")
    return value


def _count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"mixture_kwargs['{name}'] must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


def _temperature(value, name: str = "temperature") -> float:
    if isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
        return math.inf
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"mixture_kwargs['{name}'] must be a number > 0 or 'inf', got {value!r}.") from None
    if math.isnan(value) or value <= 0:
        raise ValueError(f"mixture_kwargs['{name}'] must be > 0 (1 = proportional, 'inf' = uniform), got {value!r}.")
    return value


def _vector(values, k: int, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=_F64).flatten()
    if tensor.numel() != k:
        raise ValueError(f"{what} has {tensor.numel()} entries; expected one per domain ({k}).")
    return tensor


def floor_probabilities(p: torch.Tensor, min_prob: float) -> torch.Tensor:
    """Probabilities with no entry below ``min_prob``; the floored entries' extra mass is taken from the others in
    proportion to their size (ratios among unfloored domains are preserved). Requires ``k · min_prob ≤ 1``."""
    p = torch.nan_to_num(p.to(_F64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    k = p.numel()
    total = p.sum()
    p = p / total if total > 0 else torch.full_like(p, 1.0 / k)
    if min_prob <= 0:
        return p
    if min_prob * k >= 1 - 1e-12:
        return torch.full_like(p, 1.0 / k)
    fixed = torch.zeros(k, dtype=torch.bool)
    for _ in range(k):
        low = ~fixed & (p < min_prob)
        if not low.any():
            break
        fixed |= low
        free = p[~fixed].sum()
        scale = (1 - fixed.sum().item() * min_prob) / free
        p = torch.where(fixed, torch.full_like(p, min_prob), p * scale)
    return p


def mix_update(
    log_p: torch.Tensor,
    signal: torch.Tensor,
    eta: float,
    A: torch.Tensor | None = None,
    smoothing: float = 0.0,
    min_prob: float = 0.0,
) -> torch.Tensor:
    """The exponentiated (mirror-descent) mixture update shared by DoReMi, Aioli, Skill-it and DGA.

    ``z = log_p + η · (A @ signal)`` (``A`` defaults to the identity); ``α = softmax(z)``;
    ``α ← (1 − c)·α + c/k`` (``c = smoothing``, DoReMi's uniform smoothing); then :func:`floor_probabilities`.

    Guards: a NaN signal entry counts as 0, i.e. that domain's log-weight is left unchanged (DoReMi keeps an absent
    domain's *previous score* instead: its controller substitutes that score before calling this); ±inf is clipped
    to ±1e100 (saturates without overflowing); if every ``z`` is −inf or NaN the previous mixture is kept.

    Returns:
        The new log-probabilities (float64 ``(k,)``), ``−inf`` only where a probability is exactly 0 (possible only
        with ``smoothing = 0`` and ``min_prob = 0``).
    """
    log_p = torch.as_tensor(log_p, dtype=_F64).flatten()
    k = log_p.numel()
    s = torch.as_tensor(signal, dtype=_F64).flatten()
    s = torch.nan_to_num(s, nan=0.0, posinf=_SIGNAL_CLIP, neginf=-_SIGNAL_CLIP).clamp(-_SIGNAL_CLIP, _SIGNAL_CLIP)
    if A is not None:
        A = torch.as_tensor(A, dtype=_F64)
        if A.dim() != 2 or A.shape != (k, s.numel()):
            raise ValueError(f"mix_update: A has shape {tuple(A.shape)}; expected ({k}, {s.numel()}).")
        s = A @ s
    elif s.numel() != k:
        raise ValueError(f"mix_update: the signal has {s.numel()} entries for {k} domains.")
    z = log_p + float(eta) * s
    z = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z)
    if torch.isposinf(z).any():  # the limit of the softmax: uniform over the +inf entries
        p = torch.isposinf(z).to(_F64)
    elif torch.isfinite(z).any():
        p = torch.softmax(z, dim=0)
    else:  # nothing usable: keep the previous mixture
        prev = torch.where(torch.isfinite(log_p), log_p, torch.full_like(log_p, -math.inf))
        p = torch.softmax(prev, dim=0) if torch.isfinite(prev).any() else torch.full((k,), 1.0 / k, dtype=_F64)
    if smoothing:
        p = (1 - smoothing) * p + smoothing / k
    return torch.log(floor_probabilities(p, min_prob))


def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.to(_F64))


def _load_callable(spec, field: str) -> Callable:
    if callable(spec):
        return spec
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            module_name, _, attr = spec.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"{field}={spec!r} cannot be imported ({err}); use 'package.module:function'.") from err
        if callable(obj):
            return obj
    raise ValueError(f"{field} must be a callable or an import path 'package.module:function', got {spec!r}.")


# ---- shared base --------------------------------------------------------------------------------------------------


class _Controller(MixtureController):
    """Common plumbing: kwargs shared by the built-ins, binding checks, flooring, and the optional protocol methods.

    Args:
        min_prob: Floor of every domain's probability (``0 ≤ min_prob``, ``k · min_prob ≤ 1``).
        domains: Ignored by the controller; the glue reads it for datasets without a domain column.
    """

    needs_target: bool = False
    """Whether the controller needs a target set (DGA); the glue errors at setup when none is configured."""

    def __init__(self, *, min_prob: float = 1e-4, domains=None):
        self.min_prob = _fraction(min_prob, "min_prob")
        self.domains = domains
        self.domain_names: list[str] = []
        self._sizes: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None
        self._total_steps: int | None = None
        self._bound = False

    # binding ----------------------------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return len(self.domain_names)

    def bind(self, domain_names: list[str], domain_sizes: torch.Tensor | None = None) -> None:
        super().bind(domain_names, domain_sizes)
        if not self.domain_names:
            raise ValueError(f"mixture={self.name!r} needs at least one domain; the dataset has none.")
        if self.min_prob * self.k > 1:
            raise ValueError(
                f"mixture_kwargs['min_prob']={self.min_prob} is too large for {self.k} domains (k · min_prob > 1)."
            )
        self._sizes = None if domain_sizes is None else torch.as_tensor(domain_sizes, dtype=_F64).flatten()
        if self._sizes is not None and self._sizes.numel() != self.k:
            raise ValueError(f"bind(): {self._sizes.numel()} domain sizes for {self.k} domains {self.domain_names}.")
        self._bound = True
        self._on_bind()
        if self._probs is None:
            self._set_probs(torch.full((self.k,), 1.0 / self.k, dtype=_F64))

    def _on_bind(self) -> None:
        """Subclass hook: build the initial state once the domains are known."""

    def _require_bound(self) -> None:
        if not self._bound:
            raise RuntimeError(f"mixture={self.name!r}: call bind(domain_names, domain_sizes) first.")

    def _initial(self, weights, field: str) -> torch.Tensor:
        if weights is None:
            return torch.full((self.k,), 1.0 / self.k, dtype=_F64)
        return normalize_domain_weights(weights, self.domain_names, field)

    def _set_probs(self, p: torch.Tensor) -> None:
        self._probs = torch.ones(1, dtype=_F64) if self.k == 1 else floor_probabilities(p, self.min_prob)

    def _check_stats(self, stats: DomainStats) -> None:
        self._require_bound()
        for field in ("loss_sum", "token_count", "sample_count"):
            value = getattr(stats, field)
            if value is None or value.numel() != self.k:
                got = None if value is None else value.numel()
                raise ValueError(f"DomainStats.{field} has {got} entries; mixture {self.name!r} has {self.k} domains.")

    # the mixture -------------------------------------------------------------------------------------------------
    def probabilities(self) -> torch.Tensor:
        self._require_bound()
        return self._probs.clone()

    def final_probabilities(self) -> torch.Tensor:
        """The mixture to report as the run's result (written to ``mixture_weights.json``)."""
        return self.probabilities()

    # optional protocol ------------------------------------------------------------------------------------------
    def set_total_steps(self, n: int) -> None:
        """The number of optimizer steps of the run (called by the glue before training)."""
        self._total_steps = _count(n, "total_steps")

    def eval_requested(self) -> bool:
        return False

    def wants_probe(self) -> torch.Tensor | None:
        return None

    def gradients_requested(self) -> bool:
        return False

    # state ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "domain_names": list(self.domain_names),
            "probs": None if self._probs is None else self._probs.clone(),
            "total_steps": self._total_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self._require_bound()
        if state.get("domain_names") != self.domain_names:
            raise ValueError(
                f"mixture {self.name!r}: the saved state is for domains {state.get('domain_names')} but this run has "
                f"{self.domain_names}; resume with the same dataset."
            )
        self._probs = None if state["probs"] is None else state["probs"].clone().to(_F64)
        self._total_steps = state.get("total_steps")


# ---- static / temperature / schedule ------------------------------------------------------------------------------


@register_mixture("static")
class StaticMixture(_Controller):
    """A fixed mixture ``α`` given as ``weights`` (normalized to probabilities), applied exactly (no floor).

    Args:
        weights: ``{domain: weight}``, a list in sorted-domain order, or the path of a JSON file holding either
            ``{"weights": {domain: weight}}`` — the ``mixture_weights.json`` every run writes to its output dir, so a
            learned mixture (e.g. DoReMi's average) is reused with ``mixture_kwargs={"weights": "run/mixture_weights.json"}``
            — or a bare ``{domain: weight}``. ``None`` means the natural mixture (proportional to domain sizes), which in
            ``upweight`` mode changes nothing.
    """

    def __init__(self, weights=None, domains=None):
        weights = _resolve_weight_spec(weights, "mixture_kwargs['weights']")
        _check_weight_spec(weights, "mixture_kwargs['weights']")
        super().__init__(min_prob=0.0, domains=domains)
        self.weights = weights

    def _on_bind(self):
        if self.weights is None:
            if self._sizes is None:
                raise ValueError("mixture='static' without weights needs the domain sizes of a map-style dataset.")
            self._set_probs(self._sizes / self._sizes.sum())
        else:
            self._set_probs(normalize_domain_weights(self.weights, self.domain_names))

    def probabilities(self) -> torch.Tensor:
        if self._probs is None:
            raise RuntimeError("StaticMixture.probabilities() called before bind().")
        return self._probs.clone()


def _temperature_mixture(sizes: torch.Tensor, tau: float) -> torch.Tensor:
    """``α_d ∝ n_d^{1/τ}``, computed in log space (τ = inf → uniform)."""
    if math.isinf(tau):
        return torch.full_like(sizes, 1.0 / sizes.numel())
    return torch.softmax(torch.log(sizes) / tau, dim=0)


def _sizes_for(controller: _Controller, sizes_kwarg) -> torch.Tensor | None:
    if sizes_kwarg is not None:
        if isinstance(sizes_kwarg, Mapping):
            missing = sorted(set(controller.domain_names) - set(map(str, sizes_kwarg)))
            if missing:
                raise ValueError(f"mixture_kwargs['sizes'] has no size for domain(s) {missing}.")
        sizes = normalize_domain_weights(sizes_kwarg, controller.domain_names, "mixture_kwargs['sizes']")
    else:
        sizes = controller._sizes
    if sizes is not None and (sizes <= 0).any():
        empty = [n for n, s in zip(controller.domain_names, sizes.tolist()) if s <= 0]
        raise ValueError(f"Domain(s) {empty} have size 0; a temperature mixture needs every size > 0.")
    return sizes


@register_mixture("temperature")
class TemperatureMixture(_Controller):
    """Temperature sampling ``α_d ∝ n_d^{1/τ}`` (τ = 1 proportional to domain sizes, τ = inf uniform).

    Args:
        temperature: τ > 0, or ``"inf"``. Default 1.
        sizes: Optional ``{domain: size}`` / list overriding the row counts (needed for streaming datasets, whose
            sizes the glue cannot count).
        min_prob: Floor (default 1e-4).
    """

    def __init__(self, temperature=1.0, sizes=None, min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.temperature = _temperature(temperature)
        _check_weight_spec(sizes, "mixture_kwargs['sizes']")
        self.sizes = sizes

    def _on_bind(self):
        sizes = _sizes_for(self, self.sizes)
        if sizes is None:
            if not math.isinf(self.temperature):
                raise ValueError(
                    "mixture='temperature' needs the domain sizes: use a map-style dataset with a domain column or "
                    "give mixture_kwargs['sizes']."
                )
            sizes = torch.ones(self.k, dtype=_F64)
        self._set_probs(_temperature_mixture(sizes, self.temperature))


@register_mixture("schedule")
class ScheduleMixture(_Controller):
    """A mixture that changes with the fraction of training done: staged temperatures or explicit weights.

    Covers Cooldown-style temperature decay (Li et al. 2025: τ decays from high to 1) and end-of-training upsampling
    (Blakeney et al. 2024: switch to a domain-upsampled mixture for the last 10–20 % of training)::

        stages: [{until: 0.8, temperature: 5}, {until: 1.0, weights: {math: 3, code: 1, prose: 1}}]

    Stage ``i`` covers the fraction ``[until_{i−1}, until_i)`` of training (``until_{−1} = 0``); fractions are
    ``steps completed / total steps``; ``until`` must increase strictly and the last must be 1.0.

    With ``interpolate: true`` the mixture moves *geometrically* (linearly in log space) from stage ``i−1``'s mixture
    to stage ``i``'s across stage ``i``: ``α ∝ m_{i−1}^{1−t} · m_i^{t}``, ``t`` the position within the stage; stage 0
    stays constant (give it ``until: 0`` to start decaying at once). Between two temperature stages this is exactly a
    decay of ``1/τ`` linear in time, i.e. a smooth τ decay.

    The total number of steps is not known at bind time: the glue must call :meth:`set_total_steps` before training;
    :meth:`observe` advances to ``stats.step + 1`` completed steps.

    Args:
        stages: List of ``{until, temperature | weights}`` dicts.
        interpolate: Geometric interpolation between stages (default False: piecewise constant).
        sizes: Optional domain sizes for temperature stages (streaming datasets).
        min_prob: Floor (default 1e-4).
    """

    def __init__(self, stages=None, interpolate: bool = False, sizes=None, min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        if not isinstance(stages, Sequence) or isinstance(stages, str) or not stages:
            raise ValueError(
                "mixture='schedule' needs mixture_kwargs['stages'], a non-empty list such as "
                "[{'until': 0.8, 'temperature': 5}, {'until': 1.0, 'weights': {...}}]."
            )
        parsed, previous = [], -math.inf
        for i, stage in enumerate(stages):
            where = f"mixture_kwargs['stages'][{i}]"
            if not isinstance(stage, Mapping):
                raise ValueError(f"{where} must be a dict with 'until' and 'temperature' or 'weights', got {stage!r}.")
            unknown = sorted(set(stage) - {"until", "temperature", "weights"})
            if unknown:
                raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: until, temperature, weights.")
            if "until" not in stage:
                raise ValueError(f"{where} has no 'until' (the fraction of training where the stage ends).")
            until = _positive(stage["until"], f"stages'][{i}]['until", allow_zero=True)
            if until > 1:
                raise ValueError(f"{where}['until']={until} is past the end of training; 'until' is a fraction ≤ 1.")
            if until <= previous:
                raise ValueError(
                    f"mixture_kwargs['stages'] must have strictly increasing 'until'; stage {i} ends at {until} "
                    f"after a stage ending at {previous}."
                )
            previous = until
            if ("temperature" in stage) == ("weights" in stage):
                raise ValueError(f"{where} must give exactly one of 'temperature' or 'weights'.")
            if "temperature" in stage:
                parsed.append({"until": until, "temperature": _temperature(stage["temperature"], f"stages'][{i}]['temperature")})
            else:
                _check_weight_spec(stage["weights"], f"{where}['weights']")
                parsed.append({"until": until, "weights": stage["weights"]})
        if parsed[-1]["until"] != 1.0:
            raise ValueError(f"The last stage of mixture_kwargs['stages'] must end at until: 1.0, not {parsed[-1]['until']}.")
        self.stages = parsed
        self.interpolate = bool(interpolate)
        _check_weight_spec(sizes, "mixture_kwargs['sizes']")
        self.sizes = sizes
        self._step = 0
        self._anchors: list[torch.Tensor] = []

    def _on_bind(self):
        sizes = _sizes_for(self, self.sizes)
        anchors = []
        for i, stage in enumerate(self.stages):
            if "weights" in stage:
                anchors.append(normalize_domain_weights(stage["weights"], self.domain_names, f"mixture_kwargs['stages'][{i}]['weights']"))
            else:
                if sizes is None and not math.isinf(stage["temperature"]):
                    raise ValueError(
                        f"mixture_kwargs['stages'][{i}] uses a temperature, which needs the domain sizes: use a map-style "
                        "dataset with a domain column or give mixture_kwargs['sizes']."
                    )
                anchors.append(_temperature_mixture(sizes if sizes is not None else torch.ones(self.k, dtype=_F64), stage["temperature"]))
        self._anchors = anchors
        self._refresh()

    def mixture_at(self, fraction: float) -> torch.Tensor:
        """The (unfloored) scheduled mixture at a fraction of training."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        bounds = [s["until"] for s in self.stages]
        i = next((j for j, u in enumerate(bounds) if fraction < u), len(bounds) - 1)
        if not self.interpolate or i == 0:
            return self._anchors[i]
        start, end = bounds[i - 1], bounds[i]
        t = 1.0 if end <= start else min(max((fraction - start) / (end - start), 0.0), 1.0)
        p = torch.pow(self._anchors[i - 1], 1 - t) * torch.pow(self._anchors[i], t)  # 0**0 = 1: zeros stay exact
        if p.sum() <= 0:  # disjoint supports: fall back to the arithmetic mix
            p = (1 - t) * self._anchors[i - 1] + t * self._anchors[i]
        return p / p.sum()

    def _refresh(self):
        if self._step > 0 and self._total_steps is None:
            raise RuntimeError(
                "mixture='schedule' needs the total number of optimizer steps: the trainer must call "
                "set_total_steps(max_steps) before training."
            )
        fraction = 0.0 if self._step == 0 else self._step / self._total_steps
        self._set_probs(self.mixture_at(fraction))

    def set_total_steps(self, n: int) -> None:
        super().set_total_steps(n)
        if self._bound:
            self._refresh()

    def observe(self, stats: DomainStats) -> None:
        self._require_bound()
        self._step = int(stats.step) + 1
        self._refresh()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._step = int(state["step"])
        self._refresh()


# ---- DoReMi -------------------------------------------------------------------------------------------------------


@register_mixture("doremi")
class DoReMiMixture(_Controller):
    """DoReMi (Xie et al. 2023): Group-DRO over domains on the excess loss of a proxy over a reference model.

    Source: ``sangmichaelxie/doremi``, ``doremi/trainer.py`` (``DoReMiTrainer.update_domain_weights``, ``doremiv1``)
    and ``doremi/train.py`` (buffers ``train_domain_weights``, ``avg_domain_weights``, ``perdomain_scores``).
    Per optimizer step:

    1. score ``λ_d = Σ_t max(ℓ_t − ℓ_ref,t, 0) / #tokens_d`` — per-token clipping, then the token mean
       (``stats.excess_sum / stats.token_count``); a domain absent from the step (or whose score is NaN) keeps its
       previous score, as the authors' code does (the domain still moves: the update uses the kept score);
    2. ``log α ← log α + η·λ``, softmax, ``α ← (1 − c)·α + c/k`` (:func:`mix_update`), then the ``min_prob`` floor;
    3. the running time-average ``ᾱ`` (initialized with the starting weights, counter 1, as in ``write_weights``).

    ``probabilities()`` returns the *current* ``α``: the paper trains the proxy with the current weights. The paper's
    output — the mixture for the final run — is the average: :meth:`average_probabilities` and
    :meth:`final_probabilities` (which the glue writes to ``mixture_weights.json``).

    Used online — the final model trained on the current weights — DoReMi loses to stratified sampling on data with junk
    (built-in data, 200 steps: +0.42 ± 0.23 nats): the per-token clipping ``max(ℓ − ℓ_ref, 0)`` has a positive mean
    wherever token losses are noisy, so random characters and near-duplicates keep high scores (0.26 and 0.28 of the
    mixture). That is the method as published, not a deviation; the paper retrains with the *averaged* weights:
    ``mixture="static"`` with the proxy run's ``mixture_weights.json`` (``docs/guidance.md``).

    Args:
        eta: Step size η (default 1.0; the README advises 0.1 if it collapses to one domain).
        smoothing: Uniform smoothing c (default 1e-3 as in the paper; the code's default and run scripts use 1e-4).
        initial_weights: Starting mixture (default uniform, the authors' ``pile_uniform.json``).
        initial_score: Score of a domain not yet seen. The authors initialize ``perdomain_scores`` to
            ``log(vocab_size)`` (a uniform model's loss), which pushes unseen domains up; the vocabulary is unknown here,
            so the default 0 leaves them unchanged — pass ``math.log(vocab_size)`` to match the code exactly.
        min_prob: Floor (default 1e-4).
    """

    needs_reference = True

    def __init__(self, eta: float = 1.0, smoothing: float = 1e-3, initial_weights=None, initial_score: float = 0.0,
                 min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.eta = _positive(eta, "eta")
        self.smoothing = _fraction(smoothing, "smoothing", closed_right=True)
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights
        self.initial_score = float(initial_score)
        if not math.isfinite(self.initial_score):
            raise ValueError(f"mixture_kwargs['initial_score'] must be finite, got {initial_score!r}.")
        self._warned_nan = False

    def _on_bind(self):
        p0 = self._initial(self.initial_weights, "mixture_kwargs['initial_weights']")
        self._set_probs(p0)
        self._log_p = _log(self._probs)
        self._scores = torch.full((self.k,), self.initial_score, dtype=_F64)
        self._avg = self._probs.clone()
        self._updates = 1

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        if stats.excess_sum is None:
            raise ValueError(
                "mixture='doremi' needs per-domain excess losses over a reference model (DomainStats.excess_sum): "
                "set `reference_model` or give the dataset a `ref_logps` column."
            )
        if self.k == 1:
            return
        tokens = stats.token_count.to(_F64)
        score = stats.excess_sum.to(_F64).clamp_min(0) / tokens.clamp_min(1)
        fresh = (tokens > 0) & torch.isfinite(score)
        if ((tokens > 0) & ~torch.isfinite(score)).any() and not self._warned_nan:
            warnings.warn("doremi: a non-finite excess loss was ignored (the domain keeps its last score).", stacklevel=2)
            self._warned_nan = True
        self._scores = torch.where(fresh, score, self._scores)
        self._log_p = mix_update(self._log_p, self._scores, self.eta, smoothing=self.smoothing, min_prob=self.min_prob)
        self._set_probs(torch.exp(self._log_p))
        self._updates += 1
        self._avg = (self._avg * (self._updates - 1) + self._probs) / self._updates

    def average_probabilities(self) -> torch.Tensor:
        """Time-average of ``α`` over the updates (including the starting weights): DoReMi's output mixture."""
        self._require_bound()
        return self._avg / self._avg.sum()

    def final_probabilities(self) -> torch.Tensor:
        return self.average_probabilities()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_p": self._log_p.clone(), "scores": self._scores.clone(),
                "avg": self._avg.clone(), "updates": self._updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._log_p, self._scores, self._avg = state["log_p"].clone(), state["scores"].clone(), state["avg"].clone()
        self._updates = int(state["updates"])


# ---- ODM ----------------------------------------------------------------------------------------------------------


@register_mixture("odm")
class ODMMixture(_Controller):
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
    """

    AUTHORS_WARMUP = 2000
    WARMUP_FRACTION = 0.1

    def __init__(self, warmup_steps: int | None = None, update_every: int = 1, reward: str = "exp3",
                 smoothing_factor: float = 0.9, reward_scale: float = 0.1, initial_weights=None,
                 min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.warmup_given = warmup_steps is not None
        self.warmup_steps = self.AUTHORS_WARMUP if warmup_steps is None else _count(warmup_steps, "warmup_steps", minimum=0)
        self.update_every = _count(update_every, "update_every")
        if reward not in ("exp3", "smoothed_mean"):
            raise ValueError(f"mixture_kwargs['reward'] must be 'exp3' or 'smoothed_mean', got {reward!r}.")
        self.reward = reward
        self.smoothing_factor = _fraction(smoothing_factor, "smoothing_factor")
        self.reward_scale = _positive(reward_scale, "reward_scale")
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights, "mixture_kwargs['initial_weights']"))
        self._rewards = torch.zeros(self.k, dtype=_F64)
        self._eps = 1.0 / self.k

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
        loss = stats.mean_loss.to(_F64)
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

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rewards": self._rewards.clone(), "eps": self._eps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._rewards, self._eps = state["rewards"].clone(), float(state["eps"])


# ---- Aioli --------------------------------------------------------------------------------------------------------


def probe_mixture(k: int, index: int, one_hot_factor: float) -> torch.Tensor:
    """Aioli's near-one-hot probe: ``one_hot_factor`` on ``index``, the rest spread evenly."""
    if k == 1:
        return torch.ones(1, dtype=_F64)
    p = torch.full((k,), (1 - one_hot_factor) / (k - 1), dtype=_F64)
    p[index] = one_hot_factor
    return p


@register_mixture("aioli")
class AioliMixture(_Controller):
    """Aioli (Chen et al. 2024): estimate the mixing-law matrix ``A`` online from short probe runs, then
    ``p ← p ⊙ exp(η Σ_i A_ij)``.

    Source: ``HazyResearch/aioli``, ``trainer/aioli_trainer.py`` (``AioliTrainer.train``,
    ``learn_params_subroutine``); defaults from ``scripts/full/aioli/run.sh`` (``--lp_rounds 2 --lp_steps 10 --eta 1
    --update_steps 200 --one_hot_factor 0.75 --ema 0.1 --aioli_normalize_A --aioli_prior 1 … --prior_steps 0``).

    Rounds. Training is cut into rounds of ``update_every`` optimizer steps. Each round starts with LearnParams:

    1. held-out per-domain losses ``L⁰`` (an eval request);
    2. for each probe ``j`` of ``lp_rounds`` random permutations of the domains: train ``lp_steps`` steps on the probe
       mixture (``one_hot_factor`` on ``j``), evaluate, add the drop ``L_prev − L_new`` to column ``j`` of ``G``;
    3. ``G /= lp_rounds``; unmix the probes: row ``i`` of ``A`` solves ``W·A_i = G_i`` with ``W`` the probe mixtures
       (``diagonal=True``: ``A = diag(G)/one_hot_factor``); ``normalize_A``: shift so ``min A ≥ 0``, divide by ``ΣA``;
    4. ``ema`` set: ``Ā = (1 − ema)·A + ema·Ā`` (``Ā = A`` the first round) and ``p = p₀ ⊙ exp(η Σ_i Ā_ij)``;
       ``ema=None``: ``p ← p ⊙ exp(η Σ_i A_ij)`` cumulatively (both via :func:`mix_update`).

    The rest of the round trains on ``p``. The probe phase (``k · lp_rounds · lp_steps`` steps) counts towards the
    round's ``update_every`` steps and must be shorter than it. (The authors' loop subtracts the probe steps from the
    round's *sample* budget — a unit mix-up — so their rounds are slightly longer; here the step budget is exact.)

    The probe share (issue 15). Probes train on near-one-hot mixtures — ``one_hot_factor`` on a junk domain too — so
    every probe step is a step of a bad mixture: at the full-scale script's setting (``lp_rounds`` 2 × ``lp_steps`` 10
    per domain, rounds of 200 steps) five domains spend *half* of every round probing, and a 200-step run on the
    built-in data lost 1.45 nats to stratified sampling. ``probe_fraction`` (default 0.1) bounds the share of each
    round spent probing. Unset cadences are derived from it and from the run length: ``update_every = min(200,
    total_steps)``; then ``(lp_rounds, lp_steps) = (2, 10)`` if ``2·10·k`` fits in ``probe_fraction · update_every``,
    else one sweep with ``lp_steps = min(10, ⌊probe_fraction · update_every / k⌋)``; if not even one step per domain
    fits, Aioli warns and keeps its prior for the run (no probes, no evals). Explicit ``lp_rounds``/``lp_steps`` are
    used as given, with a warning when they exceed the bound.

    Held-out sets for only some domains (the common case: held-out data for the domains you care about, none for the
    junk). A domain whose held-out loss is NaN at the start of a round is *uncovered*: its row of ``A`` (how training
    helps it) is left out — zero, and excluded from ``normalize_A``'s shift and scale — while its column stays: an
    uncovered domain is still probed and weighted by how much training on it lowers the covered domains' losses.

    Protocol (see the module docstring): the glue checks :meth:`eval_requested` before training and after each
    :meth:`observe` and then calls :meth:`observe_eval`; while a probe runs, :meth:`wants_probe` and
    :meth:`probabilities` return the probe mixture. ``observe`` with an eval pending is an error (the round cannot
    continue without it). NaN held-out losses count as a zero drop. The probe order comes from a generator seeded with
    ``seed`` and the round number, so every rank agrees and a resumed run draws the same order.

    Args:
        lp_rounds: Sweeps through the domains per LearnParams (default ``None``: 2, or 1 when two do not fit the probe
            share).
        lp_steps: Optimizer steps per probe (default ``None``: 10, fewer when they do not fit the probe share).
        probe_fraction: Bound on the share of each round's steps spent in probes (default 0.1; in ``(0, 1)``).
        eta: Step size (default 1).
        ema: EMA weight of the previous ``A`` (default 0.1); ``None`` for the cumulative update.
        update_every: Round length in optimizer steps (default ``None``: ``min(200, total_steps)``, the authors' 200
            when the run length is unknown).
        one_hot_factor: Probe mass on the probed domain (default 0.75; must exceed ``1/k``).
        normalize_A: Shift and scale ``A`` before the update (default True, ``--aioli_normalize_A``).
        diagonal: Keep only ``A``'s diagonal (the authors' ablation).
        prior: Initial weights ``p₀`` (default uniform, the authors' ``--aioli_prior 1 1 …``).
        seed: Seed of the probe order (default 0).
        min_prob: Floor of the learned mixture (default 1e-4; probes are not floored).
    """

    needs_eval = True

    AUTHORS_LP_ROUNDS, AUTHORS_LP_STEPS, AUTHORS_UPDATE_EVERY = 2, 10, 200

    def __init__(self, lp_rounds: int | None = None, lp_steps: int | None = None, eta: float = 1.0,
                 ema: float | None = 0.1, update_every: int | None = None, one_hot_factor: float = 0.75,
                 normalize_A: bool = True, diagonal: bool = False, prior=None, seed: int = 0, min_prob: float = 1e-4,
                 probe_fraction: float = 0.1, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.given = {
            "lp_rounds": None if lp_rounds is None else _count(lp_rounds, "lp_rounds"),
            "lp_steps": None if lp_steps is None else _count(lp_steps, "lp_steps"),
            "update_every": None if update_every is None else _count(update_every, "update_every"),
        }
        self.probe_fraction = _fraction(probe_fraction, "probe_fraction")
        if self.probe_fraction == 0:
            raise ValueError("mixture_kwargs['probe_fraction'] must be > 0: Aioli learns only from its probes.")
        self.lp_rounds = self.given["lp_rounds"] or self.AUTHORS_LP_ROUNDS
        self.lp_steps = self.given["lp_steps"] or self.AUTHORS_LP_STEPS
        self.eta = _positive(eta, "eta")
        self.ema = None if ema is None else _fraction(ema, "ema")
        self.update_every = self.given["update_every"] or self.AUTHORS_UPDATE_EVERY
        self.probing = True
        self.one_hot_factor = _fraction(one_hot_factor, "one_hot_factor", closed_right=True)
        self.normalize_A, self.diagonal = bool(normalize_A), bool(diagonal)
        prior = _resolve_weight_spec(prior, "mixture_kwargs['prior']")
        _check_weight_spec(prior, "mixture_kwargs['prior']")
        self.prior = prior
        self.seed = _count(seed, "seed", minimum=0)

    def _resolve_cadence(self, total_steps: int | None) -> None:
        """Round length and probe sizes from the given values, the probe share and the run length (class docstring)."""
        k, given = self.k, self.given
        self.update_every = given["update_every"] or (
            self.AUTHORS_UPDATE_EVERY if total_steps is None else min(self.AUTHORS_UPDATE_EVERY, total_steps))
        budget = self.probe_fraction * self.update_every
        self.probing = True
        if given["lp_rounds"] is None and given["lp_steps"] is None:
            rounds, steps = self.AUTHORS_LP_ROUNDS, self.AUTHORS_LP_STEPS
            if k * rounds * steps > budget:
                rounds, steps = 1, min(self.AUTHORS_LP_STEPS, int(budget // k))
            if steps < 1:
                self.probing = False
                warnings.warn(
                    f"aioli: probing each of the {k} domains for one step takes {k} steps, more than probe_fraction "
                    f"({self.probe_fraction}) of a {self.update_every}-step round; Aioli keeps its prior mixture for "
                    "this run. Raise mixture_kwargs['probe_fraction'] or train longer.",
                    stacklevel=3,
                )
                rounds, steps = 1, 1
            self.lp_rounds, self.lp_steps = rounds, steps
        else:
            self.lp_rounds = given["lp_rounds"] or self.AUTHORS_LP_ROUNDS
            self.lp_steps = given["lp_steps"] or self.AUTHORS_LP_STEPS
        probe_steps = k * self.lp_rounds * self.lp_steps
        if self.probing and probe_steps >= self.update_every:
            raise ValueError(
                f"aioli: one LearnParams phase takes k·lp_rounds·lp_steps = {k}·{self.lp_rounds}·{self.lp_steps} = "
                f"{probe_steps} steps, not shorter than a round (update_every={self.update_every}). Raise "
                "update_every or lower lp_steps/lp_rounds."
            )
        if self.probing and probe_steps > budget:
            warnings.warn(
                f"aioli: probes take {probe_steps} of every {self.update_every} steps ({probe_steps / self.update_every:.0%}), "
                f"more than probe_fraction={self.probe_fraction}; every probe step trains on a near-one-hot mixture. "
                "Lower lp_steps/lp_rounds, raise update_every, or leave them unset to fit the bound.",
                stacklevel=3,
            )

    def set_total_steps(self, n: int) -> None:
        super().set_total_steps(n)
        if self._bound and self.k > 1:
            self._resolve_cadence(self._total_steps)
            if not self.probing and self._step == 0:
                self._pending = None

    def _on_bind(self):
        k = self.k
        if k > 1:
            if self.one_hot_factor <= 1.0 / k:
                raise ValueError(
                    f"mixture_kwargs['one_hot_factor']={self.one_hot_factor} must exceed 1/k = {1 / k:.4g} for {k} "
                    "domains (otherwise the probes are uniform and A cannot be identified)."
                )
            self._resolve_cadence(self._total_steps)
        p0 = self._initial(self.prior, "mixture_kwargs['prior']")
        self._set_probs(p0)
        self._log_p0 = _log(self._probs)
        self._log_p = self._log_p0.clone()
        self._step = 0
        self._round = 0
        self._phase = "mix"
        self._pending = "round_start" if k > 1 and self.probing else None
        self._order = torch.zeros(0, dtype=torch.long)
        self._probe_idx = self._probe_step = 0
        self._prev_loss = torch.zeros(k, dtype=_F64)
        self._graph = torch.zeros(k, k, dtype=_F64)
        self._ema_A: torch.Tensor | None = None
        self.last_A: torch.Tensor | None = None
        self._covered = torch.ones(k, dtype=torch.bool)

    # protocol ------------------------------------------------------------------------------------------------------
    def eval_requested(self) -> bool:
        self._require_bound()
        return self._pending is not None

    def wants_probe(self) -> torch.Tensor | None:
        self._require_bound()
        if self._phase != "probe":
            return None
        return probe_mixture(self.k, int(self._order[self._probe_idx]), self.one_hot_factor)

    def probabilities(self) -> torch.Tensor:
        probe = self.wants_probe()
        return probe if probe is not None else super().probabilities()

    def final_probabilities(self) -> torch.Tensor:
        """The learned mixture (never a probe)."""
        return super().probabilities()

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        if self._pending is not None:
            raise RuntimeError(
                f"aioli requested held-out per-domain losses after step {self._step} (eval_requested() was True) but "
                "observe() for the next step came first: the trainer must call observe_eval(losses, step) before "
                "training on (it needs an eval dataset with the domain column)."
            )
        self._step = int(stats.step) + 1
        if self._phase == "probe":
            self._probe_step += 1
            if self._probe_step >= self.lp_steps:
                self._pending = "probe_end"
        elif self.k > 1 and self.probing and self._step % self.update_every == 0:
            self._pending = "round_start"

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        self._require_bound()
        if self._pending is None:
            return
        losses = _vector(losses, self.k, "aioli: the held-out losses")
        if self._pending == "round_start":
            self._covered = torch.isfinite(losses)
        losses = torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses))
        if self._pending == "round_start":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self._round)
            self._order = torch.cat([torch.randperm(self.k, generator=g) for _ in range(self.lp_rounds)])
            self._prev_loss = losses
            self._graph = torch.zeros(self.k, self.k, dtype=_F64)
            self._probe_idx = self._probe_step = 0
            self._phase = "probe"
        else:
            j = int(self._order[self._probe_idx])
            self._graph[:, j] += self._prev_loss - losses
            self._prev_loss = losses
            self._probe_idx += 1
            self._probe_step = 0
            if self._probe_idx == self._order.numel():
                self._finish_round()
        self._pending = None

    def estimate_A(self, graph: torch.Tensor, covered: torch.Tensor | None = None) -> torch.Tensor:
        """``A`` from the accumulated loss drops ``G`` (``G[i, j]``: drop of eval domain ``i`` over the probes of
        training domain ``j``, summed over the LearnParams sweeps). ``covered`` (bool ``(k,)``, default all): the
        domains with held-out data; the other rows of ``A`` are 0 and take no part in ``normalize_A``."""
        k, f = self.k, self.one_hot_factor
        covered = torch.ones(k, dtype=torch.bool) if covered is None else torch.as_tensor(covered, dtype=torch.bool)
        G = graph.to(_F64) / self.lp_rounds
        if self.diagonal:
            A = torch.diag(torch.diagonal(G) / f)
        elif f != 1:
            W = torch.stack([probe_mixture(k, i, f) for i in range(k)])
            A = torch.linalg.solve(W, G.T).T  # row i: W · A_i = G_i
        else:
            A = G
        A = torch.where(covered[:, None], A, torch.zeros_like(A))
        if self.normalize_A and covered.any():
            low = A[covered].min()
            if low < 0:
                A = torch.where(covered[:, None], A - low, A)
            total = A.sum()
            if total > 0:
                A = A / total
        return A

    def _finish_round(self) -> None:
        A = self.estimate_A(self._graph, self._covered)
        self.last_A = A
        if self.ema is not None:
            self._ema_A = A if self._ema_A is None else (1 - self.ema) * A + self.ema * self._ema_A
            self._log_p = mix_update(self._log_p0, self._ema_A.sum(dim=0), self.eta, min_prob=self.min_prob)
        else:
            self._log_p = mix_update(self._log_p, A.sum(dim=0), self.eta, min_prob=self.min_prob)
        self._set_probs(torch.exp(self._log_p))
        self._phase = "mix"
        self._round += 1

    _STATE = ("_step", "_round", "_phase", "_pending", "_probe_idx", "_probe_step")
    _TENSORS = ("_log_p0", "_log_p", "_order", "_prev_loss", "_graph", "_ema_A", "last_A", "_covered")

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({name: getattr(self, name) for name in self._STATE})
        state.update({name: None if getattr(self, name) is None else getattr(self, name).clone() for name in self._TENSORS})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in self._STATE:
            setattr(self, name, state[name])
        for name in self._TENSORS:
            setattr(self, name, None if state[name] is None else state[name].clone())


# ---- Skill-it -----------------------------------------------------------------------------------------------------


def _load_graph(graph) -> np.ndarray:
    if isinstance(graph, str | os.PathLike):
        path = os.fspath(graph)
        if not os.path.exists(path):
            raise ValueError(f"mixture_kwargs['graph'] points to {path!r}, which does not exist.")
        if path.endswith(".npy"):
            graph = np.load(path)
        elif path.endswith(".json"):
            with open(path) as f:
                graph = json.load(f)
        else:
            raise ValueError(f"mixture_kwargs['graph']={path!r}: give a .json (list of lists) or a .npy file.")
    if isinstance(graph, Mapping):
        return graph  # {train_domain: {eval_domain: weight}}: resolved against the domain names at bind
    try:
        array = np.asarray(graph.tolist() if isinstance(graph, torch.Tensor) else graph, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"mixture_kwargs['graph'] must be a k×k matrix of numbers: {err}") from err
    if array.ndim != 2 or not np.isfinite(array).all():
        raise ValueError(f"mixture_kwargs['graph'] must be a finite 2-D k×k matrix, got shape {array.shape}.")
    return array


@register_mixture("skillit")
class SkillItMixture(_Controller):
    """Skill-it (Chen et al. 2023): online multiplicative weights over skills through a skills graph.

    Source: ``HazyResearch/skill-it``, ``trainer/mw_trainer.py`` (``MWTrainer.train``); also Aioli's re-implementation
    ``HazyResearch/aioli`` ``trainer/aioli_trainer.py`` (``skillit_subroutine``). The update, every ``update_every``
    steps, from the *initial* weights (not cumulative):

        p ∝ p₀ ⊙ exp(η · A · Σ_{last `window` evals} L_eval)

    ``A[i, j]``: how much training on domain ``i`` helps domain ``j`` (rows: training domains, whose weights are
    updated; columns: evaluated domains). Before the first update the authors use ``L = 1`` (``loss_init``), so the
    starting mixture is ``p₀ ⊙ exp(η · A · 1)``; reproduced here.

    Evals: the controller asks for held-out losses (``eval_requested()``) before training and every ``update_every``
    steps; each requested eval is recorded, and one at step > 0 triggers the update with the window of the last
    ``window`` recorded evals (the step-0 one included, as in the authors' code). NaN losses (a domain without held-out
    rows) contribute 0. Divergences: the authors' code rewrites off-diagonal entries equal to 1 into 0.5 ("for
    synthetics") and supports a target mask (non-square ``A``); here the graph is used as given and must be k×k.

    Args:
        graph: The k×k skills graph: list of lists, a ``{train_domain: {eval_domain: weight}}`` dict, or a path to a
            ``.json`` / ``.npy`` file.
        eta: Step size (default 0.5, LEGO; the paper uses 0.2 for Natural Instructions).
        window: Number of recent evals summed (default 3).
        update_every: Update cadence in optimizer steps (default 1000).
        initial_weights: ``p₀`` (default uniform, the authors' ones).
        min_prob: Floor (default 1e-4).
    """

    needs_eval = True

    def __init__(self, graph=None, eta: float = 0.5, window: int = 3, update_every: int = 1000, initial_weights=None,
                 min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        if graph is None:
            raise ValueError("mixture='skillit' needs mixture_kwargs['graph'], the k×k skills graph (list of lists or "
                             "a path to a .json/.npy file).")
        self.graph_spec = _load_graph(graph)
        self.eta = _positive(eta, "eta")
        self.window = _count(window, "window")
        self.update_every = _count(update_every, "update_every")
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights

    def _resolve_graph(self) -> torch.Tensor:
        k, names = self.k, self.domain_names
        spec = self.graph_spec
        if isinstance(spec, Mapping):
            matrix = np.zeros((k, k))
            for src, row in spec.items():
                if str(src) not in names or not isinstance(row, Mapping) or any(str(d) not in names for d in row):
                    raise ValueError(f"mixture_kwargs['graph'] names domains outside {names}: {src!r} → {row!r}.")
                for dst, value in row.items():
                    matrix[names.index(str(src)), names.index(str(dst))] = float(value)
            spec = matrix
        if spec.shape != (k, k):
            raise ValueError(
                f"mixture_kwargs['graph'] has shape {spec.shape[0]}×{spec.shape[1]}; expected {k}×{k} for the domains "
                f"{names} (rows: training domains, columns: evaluated domains, in this order)."
            )
        return torch.tensor(spec, dtype=_F64)

    def _on_bind(self):
        self.A = self._resolve_graph()
        p0 = self._initial(self.initial_weights, "mixture_kwargs['initial_weights']")
        self._log_p0 = _log(p0)
        self._log_p = mix_update(self._log_p0, torch.ones(self.k, dtype=_F64), self.eta, A=self.A, min_prob=self.min_prob)
        self._set_probs(torch.exp(self._log_p))
        self._history: list[torch.Tensor] = []
        self._step = 0
        self._pending = self.k > 1

    def eval_requested(self) -> bool:
        self._require_bound()
        return self._pending

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        if self._pending:
            raise RuntimeError(
                f"skillit requested held-out per-domain losses after step {self._step} but observe() for the next step "
                "came first: the trainer must call observe_eval(losses, step) when eval_requested() is True."
            )
        self._step = int(stats.step) + 1
        if self.k > 1 and self._step % self.update_every == 0:
            self._pending = True

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        self._require_bound()
        if not self._pending:
            return
        self._pending = False
        self._history = (self._history + [_vector(losses, self.k, "skillit: the held-out losses")])[-self.window:]
        if self._step == 0:
            return
        total = torch.stack(self._history).nan_to_num(nan=0.0).sum(dim=0)
        self._log_p = mix_update(self._log_p0, total, self.eta, A=self.A, min_prob=self.min_prob)
        self._set_probs(torch.exp(self._log_p))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_p": self._log_p.clone(), "history": [h.clone() for h in self._history],
                "step": self._step, "pending": self._pending}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._log_p = state["log_p"].clone()
        self._history = [h.clone() for h in state["history"]]
        self._step, self._pending = int(state["step"]), bool(state["pending"])


# ---- DGA ----------------------------------------------------------------------------------------------------------


def alignment_signal(inner_products, squared_norms, eps: float = 1e-6) -> torch.Tensor:
    """DGA's per-domain signal from the gradient inner products with the target, normalized as DoGE does:

        s_d = ⟨g_d, g_target⟩ / (mean_j ‖g_j‖ + eps)

    (``HazyResearch/aioli`` ``trainer/doge_trainer.py``, ``DogeTrainer.update_domain_weights``: ``scores / (avg_norm +
    1e-6)``, ``avg_norm`` the mean over domains of the domain-gradient norms; their ``lr`` factor and the division by
    ``μ`` are folded into DGA's η). Domains with a NaN inner product (absent from the step) are left out of the mean
    and keep NaN, which :meth:`DGAMixture.observe_gradients` reads as "no information". All NaN → all NaN.
    """
    ip = torch.as_tensor(inner_products, dtype=_F64).flatten()
    sq = torch.as_tensor(squared_norms, dtype=_F64).flatten()
    if ip.shape != sq.shape:
        raise ValueError(f"alignment_signal: {ip.numel()} inner products but {sq.numel()} squared norms.")
    present = torch.isfinite(ip) & torch.isfinite(sq)
    if not present.any():
        return torch.full_like(ip, float("nan"))
    mean_norm = sq[present].clamp_min(0).sqrt().mean()
    return torch.where(present, ip / (mean_norm + eps), torch.full_like(ip, float("nan")))


@register_mixture("dga")
class DGAMixture(_Controller):
    """Dynamic Gradient Alignment (Fan et al. 2024): upweight domains whose gradient aligns with a target set's.

    No public code for DGA. The update follows the paper and the authors' earlier DoGE code (``Olivia-fsm/DoGE``, as
    adapted in ``HazyResearch/aioli`` ``trainer/doge_trainer.py``: ``log α += lr·⟨g_d, g_tgt⟩ / (μ·avg‖g‖)``):

        log α ← log α + η · ⟨g_d, g_target⟩ / mean_j ‖g_j‖      (then renormalized and floored, :func:`mix_update`)

    ``g_d``: the gradient of domain ``d``'s token-mean training loss on the current step's batch (all micro-batches,
    all ranks); ``g_target``: the gradient of the token-mean loss on a batch of the target set. The glue
    (:meth:`hfweight.mixin.WeightingMixin._align_gradients`) computes the inner products and norms every
    ``update_every`` steps (``gradients_requested()``), at the start of the step, without touching the optimizer's
    gradients; :func:`alignment_signal` normalizes them and :meth:`observe_gradients` applies them. A NaN entry (a
    domain absent from the step) leaves that domain's weight unchanged. With ``ema=β`` the exposed mixture is an EMA of
    the raw one, ``ᾱ ← β·ᾱ + (1 − β)·α``. Divergences from DoGE: no per-domain gradient clipping before the inner
    products, and no clipping of the scores to ``[0, 5·lr]``.

    Args:
        target: What the target set is — required by the trainer: a key (or list of keys) of an ``eval_dataset`` dict,
            a domain value (or list) of ``eval_dataset``'s domain column, or ``"eval"`` for the whole ``eval_dataset``.
            E.g. ``{"target": "arithmetic"}`` aligns training with the held-out arithmetic rows.
        target_batch_size: Target rows per alignment, over all ranks (default: one per-device batch per rank). The
            rows are taken in order from the target set, cycling, so successive alignments see different rows.
        eta: Step size η (default 1e-3; it plays DoGE's ``lr/μ``. With the normalized signal, values around 0.1–1 move
            the mixture within tens of updates). Measured (``docs/guidance.md``): 1e-3 barely moves the mixture in a
            200-step run; 1.0 collapses onto the first aligned domain (+0.96 nats vs stratified on the built-in data);
            0.5 with ``ema`` 0.5 closed about half the junk gap on issue 15's held-out corpus but 0.2 with ``ema`` 0.5
            was +0.36 on the built-in data — no single value fits both; sweep it on a short run.
        update_every: Gradient cadence in optimizer steps (default 10).
        ema: EMA weight β of the previous mixture (default ``None``: no EMA).
        initial_weights: Starting mixture (default uniform).
        min_prob: Floor (default 1e-4).
    """

    needs_target = True

    def __init__(self, target=None, target_batch_size: int | None = None, eta: float = 1e-3, update_every: int = 10,
                 ema: float | None = None, initial_weights=None, min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        if target is not None:
            targets = [target] if isinstance(target, str | int) else list(target) if isinstance(target, Sequence) else None
            if not targets or any(not isinstance(t, str | int) or isinstance(t, bool) for t in targets):
                raise ValueError(
                    f"mixture_kwargs['target'] must name the target set: a key of the eval_dataset dict, a domain of "
                    f"eval_dataset, a list of those, or 'eval'; got {target!r}."
                )
            target = targets
        self.target = target
        self.target_batch_size = None if target_batch_size is None else _count(target_batch_size, "target_batch_size")
        self.eta = _positive(eta, "eta")
        self.update_every = _count(update_every, "update_every")
        self.ema = None if ema is None else _fraction(ema, "ema")
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights, "mixture_kwargs['initial_weights']"))
        self._log_p = _log(self._probs)
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
        ip = _vector(inner_products, self.k, "dga: the gradient inner products")
        if self.k == 1:
            return
        self._log_p = mix_update(self._log_p, ip, self.eta, min_prob=self.min_prob)
        raw = torch.exp(self._log_p)
        self._set_probs(raw if self.ema is None else self.ema * self._probs + (1 - self.ema) * raw)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_p": self._log_p.clone(), "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._log_p, self._step = state["log_p"].clone(), int(state["step"])


# ---- policy -------------------------------------------------------------------------------------------------------


@register_mixture("policy")
class PolicyMixture(_Controller):
    """A user policy ``(history) -> weights`` (the interface of learned mixers such as Data Mixing Agent, 2025).

    After every ``update_every`` optimizer steps the callable receives the history, a list of dicts (oldest first)::

        {"step": 12,                                   # optimizer steps completed
         "probabilities": {"code": 0.4, ...},          # the mixture used for that step
         "losses": {"code": 2.1, "prose": None, ...},  # training token-mean loss (None: domain absent)
         "eval_losses": {...} or None, "eval_step": 10 or None}  # latest held-out losses received, if any

    and returns weights: a ``{domain: weight}`` dict (missing domains get 0) or a list in domain order. The output is
    validated every call — an unknown domain, a wrong length, a negative, NaN or infinite weight, or all zeros is an
    error naming the callable and its output — then normalized and floored.

    Args:
        policy: The callable, or an import path ``"package.module:function"`` (usable from YAML). A lambda or a
            closure works too: the ``training_args.bin`` of each checkpoint records its qualified name instead of the
            object (which pickle cannot store), and a resumed run gets it back from the code that builds the trainer.
        update_every: Call cadence in optimizer steps (default 1).
        initial_weights: Mixture before the first call (default uniform).
        history_size: Entries kept (default 1000; ``None`` keeps all). Saved in checkpoints.
        min_prob: Floor (default 1e-4).
    """

    def __init__(self, policy=None, update_every: int = 1, initial_weights=None, history_size: int | None = 1000,
                 min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        if policy is None:
            raise ValueError("mixture='policy' needs mixture_kwargs['policy'], a callable (history) -> weights.")
        self.policy = _load_callable(policy, "mixture_kwargs['policy']")
        self.update_every = _count(update_every, "update_every")
        self.history_size = None if history_size is None else _count(history_size, "history_size")
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights, "mixture_kwargs['initial_weights']"))
        self.history: list[dict] = []
        self._last_eval: tuple[int, dict] | None = None

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        self._require_bound()
        values = _vector(losses, self.k, "policy: the held-out losses").tolist()
        self._last_eval = (int(step), {n: (v if math.isfinite(v) else None) for n, v in zip(self.domain_names, values)})

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        step = int(stats.step) + 1
        losses = [v if (c > 0 and math.isfinite(v)) else None for v, c in zip(stats.mean_loss.tolist(), stats.sample_count.tolist())]
        self.history.append({
            "step": step,
            "probabilities": dict(zip(self.domain_names, self._probs.tolist())),
            "losses": dict(zip(self.domain_names, losses)),
            "eval_losses": None if self._last_eval is None else dict(self._last_eval[1]),
            "eval_step": None if self._last_eval is None else self._last_eval[0],
        })
        if self.history_size is not None:
            del self.history[: max(0, len(self.history) - self.history_size)]
        if self.k > 1 and step % self.update_every == 0:
            self._set_probs(self._validate(self.policy(list(self.history))))

    def _validate(self, output) -> torch.Tensor:
        who = getattr(self.policy, "__qualname__", None) or repr(self.policy)
        where = f"The mixture policy {who} returned {output!r}"
        if isinstance(output, Mapping):
            unknown = sorted(set(map(str, output)) - set(self.domain_names))
            if unknown:
                raise ValueError(f"{where}: unknown domain(s) {unknown}; the domains are {self.domain_names}.")
            by_name = {str(n): v for n, v in output.items()}
            raw = [by_name.get(n, 0.0) for n in self.domain_names]
        else:
            try:
                raw = output.tolist() if hasattr(output, "tolist") else list(output)
            except TypeError:
                raise ValueError(f"{where}: expected a {{domain: weight}} dict or a list of {self.k} weights.") from None
            if len(raw) != self.k:
                raise ValueError(f"{where}: {len(raw)} weights for {self.k} domains {self.domain_names}.")
        values = []
        for name, value in zip(self.domain_names, raw):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: the weight of {name!r} is not a number.") from None
            if math.isnan(value) or math.isinf(value) or value < 0:
                raise ValueError(f"{where}: the weight of {name!r} is {value}; weights must be finite and ≥ 0.")
            values.append(value)
        if sum(values) <= 0:
            raise ValueError(f"{where}: every weight is 0; at least one must be positive.")
        p = torch.tensor(values, dtype=_F64)
        return p / p.sum()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": [dict(h) for h in self.history], "last_eval": self._last_eval}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = [dict(h) for h in state["history"]]
        self._last_eval = state["last_eval"]


# ---- learning progress (Graves et al. 2017) -----------------------------------------------------------------------


def rescale_progress(raw: torch.Tensor, history: torch.Tensor, low_q: float, high_q: float) -> torch.Tensor:
    """Graves et al.'s reward rescaling: map raw progress to ``[−1, 1]`` by the ``low_q``/``high_q`` quantiles
    ``q_lo``, ``q_hi`` of the recent raw values ``history``:

        r = −1 if x < q_lo;  +1 if x > q_hi;  2·(x − q_lo)/(q_hi − q_lo) − 1 otherwise

    so the scale of the loss never matters. Quantiles by linear interpolation (``torch.quantile``). An empty history or
    ``q_hi == q_lo`` (nothing to rank against yet) gives 0 for every entry.
    """
    raw = torch.as_tensor(raw, dtype=_F64)
    history = torch.as_tensor(history, dtype=_F64).flatten()
    if history.numel() == 0:
        return torch.zeros_like(raw)
    bounds = torch.quantile(history, torch.tensor([low_q, high_q], dtype=_F64))
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
    z = torch.as_tensor(weights, dtype=_F64) + eta * torch.as_tensor(rewards, dtype=_F64)
    k = z.numel()
    if k == 1:
        return torch.zeros(1, dtype=_F64)
    others = torch.stack([torch.logsumexp(torch.cat([z[:i], z[i + 1:]]), dim=0) for i in range(k)])
    if share > 0:
        w = torch.logaddexp(math.log1p(-share) + z, math.log(share / (k - 1)) + others)
    else:
        w = z
    return w - w.max()


@register_mixture("learning_progress")
class LearningProgressMixture(_Controller):
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
    """

    def __init__(self, eta: float = 0.2, epsilon: float = 0.05, share: float = 1e-3, ema: float = 0.9,
                 quantiles=(0.2, 0.8), history_size: int = 500, importance_weighting: bool = False,
                 per_share: bool = True, update_every: int = 1, initial_weights=None, min_prob: float = 1e-4,
                 domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.eta = _positive(eta, "eta")
        self.epsilon = _fraction(epsilon, "epsilon", closed_right=True)
        self.share = _fraction(share, "share")
        self.ema = _fraction(ema, "ema")
        try:
            low, high = (float(q) for q in quantiles)
        except (TypeError, ValueError):
            raise ValueError(f"mixture_kwargs['quantiles'] must be two fractions (low, high), got {quantiles!r}.") from None
        if not 0 <= low < high <= 1:
            raise ValueError(f"mixture_kwargs['quantiles'] must satisfy 0 ≤ low < high ≤ 1, got {quantiles!r}.")
        self.quantiles = (low, high)
        self.history_size = _count(history_size, "history_size", minimum=2)
        self.importance_weighting = bool(importance_weighting)
        self.per_share = bool(per_share)
        self.update_every = _count(update_every, "update_every")
        initial_weights = _resolve_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        _check_weight_spec(initial_weights, "mixture_kwargs['initial_weights']")
        self.initial_weights = initial_weights

    def _on_bind(self):
        p0 = self._initial(self.initial_weights, "mixture_kwargs['initial_weights']")
        self._weights = torch.log(p0.clamp_min(1e-300))
        self._weights = self._weights - self._weights.max()
        self._loss_ema = torch.full((self.k,), float("nan"), dtype=_F64)
        self._history = torch.zeros(0, dtype=_F64)
        self.last_progress = torch.full((self.k,), float("nan"), dtype=_F64)
        self.last_reward = torch.zeros(self.k, dtype=_F64)
        self._set_probs(self._policy())

    def _policy(self) -> torch.Tensor:
        return (1 - self.epsilon) * torch.softmax(self._weights, dim=0) + self.epsilon / self.k

    def observe(self, stats: DomainStats) -> None:
        self._check_stats(stats)
        if self.k == 1:
            return
        t = int(stats.step) + 1
        loss = stats.mean_loss.to(_F64)
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

    _TENSORS = ("_weights", "_loss_ema", "_history", "last_progress", "last_reward")

    def state_dict(self) -> dict:
        return {**super().state_dict(), **{name: getattr(self, name).clone() for name in self._TENSORS}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for name in self._TENSORS:
            setattr(self, name, state[name].clone())
