"""Mixtures fixed in advance: ``static`` (given weights), ``temperature`` (``α_d ∝ n_d^{1/τ}``) and ``schedule``
(staged temperatures or weights over the fraction of training done) (docs/methods.md#static-mixture,
#temperature, #schedule).

None of them learns from the training signal; ``schedule`` only needs the run length (:meth:`set_total_steps`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import number
from .base import F64, Controller, kwarg, load_weights_file, normalize_domain_weights, weight_spec

WEIGHTS = kwarg("weights")
SIZES = kwarg("sizes")


def as_temperature(value, what: str = kwarg("temperature")) -> float:
    """A temperature τ > 0, or ``inf`` (also the string ``"inf"``: uniform)."""
    return number(value, what, low=0, low_open=True, finite=False, hint=" (1 = proportional, 'inf' = uniform)")


@register_mixture("static")
class StaticMixture(Controller):
    """A fixed mixture ``α`` given as ``weights`` (normalized to probabilities), applied exactly (no floor).

    Args:
        weights: ``{domain: weight}``, a list in sorted-domain order, or the path of a JSON file holding either
            (bare or under a ``"weights"`` key) — the ``mixture_weights.json`` every run writes to its output dir, so a
            learned mixture (e.g. DoReMi's average) is reused with ``mixture_kwargs={"weights": "run/mixture_weights.json"}``,
            and the file ``hfweight search-mixture`` writes. A file must name exactly the dataset's domains (an error
            names the missing and extra ones). ``None`` means the natural mixture (proportional to domain sizes),
            which in ``upweight`` mode changes nothing.
    """

    def __init__(self, weights=None, domains=None):
        self.weights_file = os.fspath(weights) if isinstance(weights, str | os.PathLike) else None
        if self.weights_file is not None:
            weights = load_weights_file(self.weights_file, WEIGHTS)
        weights = weight_spec(weights, self._field())
        super().__init__(min_prob=0.0, domains=domains)
        self.weights = weights

    def _field(self) -> str:
        """How the weights are named in errors: the kwarg, and the file they came from."""
        return WEIGHTS if self.weights_file is None else f"{WEIGHTS} (file {self.weights_file!r})"

    def _on_bind(self):
        if self.weights is None:
            if self._sizes is None:
                raise ValueError("mixture='static' without weights needs the domain sizes of a map-style dataset.")
            self._set_probs(self._sizes / self._sizes.sum())
            return
        if self.weights_file is not None:
            check_file_domains(self.weights, self.domain_names, self.weights_file)
        self._set_probs(normalize_domain_weights(self.weights, self.domain_names, self._field()))


def check_file_domains(weights, domain_names: list[str], path: str) -> None:
    """A weights file must name exactly the dataset's domains (a file written for another dataset — other names,
    or a domain missing — is a mistake, not a request for weight 0); a list must have one entry per domain."""
    if isinstance(weights, Mapping):
        named = set(map(str, weights))
        missing, extra = sorted(set(domain_names) - named), sorted(named - set(domain_names))
        if missing or extra:
            raise ValueError(
                f"The weights file {path!r} ({WEIGHTS}) does not match the dataset's domains {domain_names}: "
                f"missing {missing}, extra {extra}. Use the file written for this dataset, or fix the names in it "
                "(give 0 to leave a domain out)."
            )
    elif len(weights) != len(domain_names):
        raise ValueError(
            f"The weights file {path!r} ({WEIGHTS}) holds a list of {len(weights)} weights but the dataset has "
            f"{len(domain_names)} domains {domain_names} (a list is read in sorted-domain order)."
        )


def _temperature_mixture(sizes: torch.Tensor, tau: float) -> torch.Tensor:
    """``α_d ∝ n_d^{1/τ}``, computed in log space (τ = inf → uniform)."""
    if math.isinf(tau):
        return torch.full_like(sizes, 1.0 / sizes.numel())
    return torch.softmax(torch.log(sizes) / tau, dim=0)


def _sizes_for(controller: Controller, sizes_kwarg) -> torch.Tensor | None:
    if sizes_kwarg is not None:
        if isinstance(sizes_kwarg, Mapping):
            missing = sorted(set(controller.domain_names) - set(map(str, sizes_kwarg)))
            if missing:
                raise ValueError(f"mixture_kwargs['sizes'] has no size for domain(s) {missing}.")
        sizes = normalize_domain_weights(sizes_kwarg, controller.domain_names, SIZES)
    else:
        sizes = controller._sizes
    if sizes is not None and (sizes <= 0).any():
        empty = [n for n, s in zip(controller.domain_names, sizes.tolist()) if s <= 0]
        raise ValueError(f"Domain(s) {empty} have size 0; a temperature mixture needs every size > 0.")
    return sizes


@register_mixture("temperature")
class TemperatureMixture(Controller):
    """Temperature sampling ``α_d ∝ n_d^{1/τ}`` (τ = 1 proportional to domain sizes, τ = inf uniform).

    Args:
        temperature: τ > 0, or ``"inf"``. Default 1.
        sizes: Optional ``{domain: size}`` / list overriding the row counts (needed for streaming datasets, whose
            sizes the glue cannot count).
        min_prob: Floor (default 1e-4).
    """

    def __init__(self, temperature=1.0, sizes=None, min_prob: float = 1e-4, domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.temperature = as_temperature(temperature)
        self.sizes = weight_spec(sizes, SIZES)

    def _on_bind(self):
        sizes = _sizes_for(self, self.sizes)
        if sizes is None:
            if not math.isinf(self.temperature):
                raise ValueError(
                    "mixture='temperature' needs the domain sizes: use a map-style dataset with a domain column or "
                    "give mixture_kwargs['sizes']."
                )
            sizes = torch.ones(self.k, dtype=F64)
        self._set_probs(_temperature_mixture(sizes, self.temperature))


@register_mixture("schedule")
class ScheduleMixture(Controller):
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
            until = number(stage["until"], f"{where}['until']", low=0)
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
                parsed.append({"until": until, "temperature": as_temperature(stage["temperature"], f"{where}['temperature']")})
            else:
                parsed.append({"until": until, "weights": weight_spec(stage["weights"], f"{where}['weights']")})
        if parsed[-1]["until"] != 1.0:
            raise ValueError(f"The last stage of mixture_kwargs['stages'] must end at until: 1.0, not {parsed[-1]['until']}.")
        self.stages = parsed
        self.interpolate = bool(interpolate)
        self.sizes = weight_spec(sizes, SIZES)
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
                anchors.append(_temperature_mixture(sizes if sizes is not None else torch.ones(self.k, dtype=F64), stage["temperature"]))
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

