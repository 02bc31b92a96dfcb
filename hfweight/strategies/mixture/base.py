"""Domain-mixture controllers: the shared update and the common base (docs/methods.md#mixture-modes).

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

Run-time watches (warn once, checkpointed; :mod:`hfweight.strategies.watch`): :class:`StuckDomainWatch` (DoReMi, ODM:
a fed domain whose loss does not fall) and :class:`MemorizedDomainWatch` (learning progress: a domain learned far
better than the rest that it keeps feeding); DGA's inert-mixture check is in :mod:`.dga`.

Protocol the trainer glue implements (every hook is declared with a default on
:class:`~hfweight.strategies.base.MixtureController`; a controller overrides the ones it needs):

- ``set_total_steps(n)``: called once before training with the number of optimizer steps (``schedule`` needs it).
- ``observe(stats)``: once per optimizer step, every rank, all-reduced stats; ``stats.step`` = steps completed before.
- ``eval_requested() -> bool``: checked before training and after every :meth:`observe`; when True the glue computes
  per-domain held-out token-mean losses ``(k,)`` (NaN for a domain without held-out rows), all-reduced, and calls
  ``observe_eval(losses, step)`` *before the next optimizer step*. ``aioli`` and ``skillit`` raise if ``observe`` comes
  while their request is pending. Unrequested ``observe_eval`` calls are ignored by them.
- ``wants_probe() -> Tensor | None`` (built-ins only): Aioli's probe mixture while a probe runs; :meth:`probabilities`
  then returns the probe too, so the glue needs nothing else to train on it (resample or upweight).
- ``gradients_requested() -> bool`` / ``observe_gradients(inner_products, step)`` (``dga``, ``needs_target = True``).
- ``final_probabilities()``: the mixture to write as the run's result (DoReMi: the time-average).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ..base import DomainStats, MixtureController
from ..checks import in_range, integer, is_finite_number, kwargs_field, spec_items
from ..watch import StreakWatch, WindowWatch

F64 = torch.float64


def kwarg(name: str) -> str:
    """How the entry ``name`` of ``mixture_kwargs`` is named in errors: ``mixture_kwargs['name']``."""
    return kwargs_field("mixture", name)


INITIAL_WEIGHTS = kwarg("initial_weights")
_SIGNAL_CLIP = 1e100  # an infinite signal is clipped here: large enough to saturate, small enough to stay finite × η


# ---- weights given by the user ------------------------------------------------------------------------------------


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
    return torch.tensor(values, dtype=F64) / total


def load_weights_file(path, field: str = "mixture_kwargs['weights']") -> dict | list:
    """The mixture stored in a JSON file: ``{"weights": {domain: weight} | [weights]}`` (what every run writes to
    ``mixture_weights.json`` and ``hfweight search-mixture`` writes) or a bare ``{domain: weight}`` object or
    ``[weights]`` list (sorted-domain order). Value checks are :func:`weight_spec`'s; names are checked at bind."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{field}={path!r}: no such file; give a {{domain: weight}} dict, a list, or a JSON file path.")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{field}={path!r} is not readable JSON: {err}") from err
    if isinstance(data, Mapping) and isinstance(data.get("weights"), Mapping | list):
        data = data["weights"]
    if isinstance(data, Mapping):
        return dict(data)
    if isinstance(data, list):
        return data
    raise ValueError(
        f"{field}={path!r} must hold {{'weights': {{domain: weight}}}}, {{domain: weight}} or a list of weights in "
        f"sorted-domain order; it holds a {type(data).__name__}."
    )


def weight_spec(weights, field: str):
    """A weights spec checked at construction: a ``{domain: weight}`` dict or a list, or the path of a JSON file
    holding one (:func:`load_weights_file`), whose entries are finite numbers ≥ 0. Names are checked at bind
    (:func:`normalize_domain_weights`). ``None`` passes through."""
    if isinstance(weights, str | os.PathLike):
        weights = load_weights_file(weights, field)
    if weights is None:
        return None
    items = spec_items(weights)
    if items is None:
        raise ValueError(f"{field} must be a {{domain: weight}} dict or a list of weights, got {weights!r}.")
    for name, value in items:
        if not is_finite_number(value) or value < 0:
            raise ValueError(
                f"{field} gives domain {name!r} the weight {value!r}; weights must be finite numbers ≥ 0."
            )
    return weights


def domain_vector(values, k: int, what: str) -> torch.Tensor:
    """``values`` as a float64 ``(k,)`` tensor, one entry per domain (held-out losses, inner products, ...)."""
    tensor = torch.as_tensor(values, dtype=F64).flatten()
    if tensor.numel() != k:
        raise ValueError(f"{what} has {tensor.numel()} entries; expected one per domain ({k}).")
    return tensor


# ---- the update ---------------------------------------------------------------------------------------------------


def floor_probabilities(p: torch.Tensor, min_prob: float) -> torch.Tensor:
    """Probabilities with no entry below ``min_prob``; the floored entries' extra mass is taken from the others in
    proportion to their size (ratios among unfloored domains are preserved). Requires ``k · min_prob ≤ 1``."""
    p = torch.nan_to_num(p.to(F64), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
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
    log_p = torch.as_tensor(log_p, dtype=F64).flatten()
    k = log_p.numel()
    s = torch.as_tensor(signal, dtype=F64).flatten()
    s = torch.nan_to_num(s, nan=0.0, posinf=_SIGNAL_CLIP, neginf=-_SIGNAL_CLIP).clamp(-_SIGNAL_CLIP, _SIGNAL_CLIP)
    if A is not None:
        A = torch.as_tensor(A, dtype=F64)
        if A.dim() != 2 or A.shape != (k, s.numel()):
            raise ValueError(f"mix_update: A has shape {tuple(A.shape)}; expected ({k}, {s.numel()}).")
        s = A @ s
    elif s.numel() != k:
        raise ValueError(f"mix_update: the signal has {s.numel()} entries for {k} domains.")
    z = log_p + float(eta) * s
    z = torch.where(torch.isnan(z), torch.full_like(z, -math.inf), z)
    if torch.isposinf(z).any():  # the limit of the softmax: uniform over the +inf entries
        p = torch.isposinf(z).to(F64)
    elif torch.isfinite(z).any():
        p = torch.softmax(z, dim=0)
    else:  # nothing usable: keep the previous mixture
        prev = torch.where(torch.isfinite(log_p), log_p, torch.full_like(log_p, -math.inf))
        p = torch.softmax(prev, dim=0) if torch.isfinite(prev).any() else torch.full((k,), 1.0 / k, dtype=F64)
    if smoothing:
        p = (1 - smoothing) * p + smoothing / k
    return torch.log(floor_probabilities(p, min_prob))


# ---- shared base --------------------------------------------------------------------------------------------------


class Controller(MixtureController):
    """The built-ins' common plumbing: the shared kwargs, binding checks, flooring, and state.

    Args:
        min_prob: Floor of every domain's probability (``0 ≤ min_prob``, ``k · min_prob ≤ 1``).
        domains: Ignored by the controller; the glue reads it for datasets without a domain column.
    """

    def __init__(self, *, min_prob: float = 1e-4, domains=None):
        self.min_prob = in_range(min_prob, kwarg("min_prob"), 0, 1, high_open=True)
        self.domains = domains
        self.domain_names: list[str] = []
        self._sizes: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None
        self._total_steps: int | None = None
        self.evaluated: torch.Tensor | None = None  # which domains the user measures (set_evaluated_domains)
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
        self._sizes = None if domain_sizes is None else torch.as_tensor(domain_sizes, dtype=F64).flatten()
        if self._sizes is not None and self._sizes.numel() != self.k:
            raise ValueError(f"bind(): {self._sizes.numel()} domain sizes for {self.k} domains {self.domain_names}.")
        self._bound = True
        self._on_bind()
        if self._probs is None:
            self._set_probs(torch.full((self.k,), 1.0 / self.k, dtype=F64))

    def _on_bind(self) -> None:
        """Subclass hook: build the initial state once the domains are known."""

    def _watch_domains(self, method: str, step: int, loss: torch.Tensor, checks) -> None:
        """Feed one update to the domain watches, ``checks`` = ``(watch, why, instead)`` each (a None watch: off):
        tell each which domains the user measures (:meth:`set_evaluated_domains`), then :func:`warn_if_stuck` with the
        update's domain ``loss``, the mixture and the initial mixture (``_initial_probs``, kept by the controllers that
        watch their domains)."""
        for watch, why, instead in checks:
            if watch is not None:
                watch.evaluated = self.evaluated
            warn_if_stuck(watch, method, self.domain_names, step, loss, self._probs, self._initial_probs, why, instead)

    def set_evaluated_domains(self, names) -> None:
        """The domains the user measures (the trainer passes the names of its per-domain held-out sets). The domain
        watches treat a domain among them as wanted (:class:`ConcentratedDomainWatch`, :class:`StuckDomainWatch`).
        Names that are not training domains are ignored. Which domains are wanted stays unknown (None) when none is
        left, and also when *every* domain is measured: held-out sets of all domains (what ``hfweight pretrain``
        evaluates, for its report) say nothing about which ones matter."""
        self._require_bound()
        named = {str(n) for n in names}
        chosen = [name in named for name in self.domain_names]
        self.evaluated = torch.tensor(chosen) if any(chosen) and not all(chosen) else None

    def _require_bound(self) -> None:
        if not self._bound:
            raise RuntimeError(f"mixture={self.name!r}: call bind(domain_names, domain_sizes) first.")

    def _initial(self, weights, field: str = INITIAL_WEIGHTS) -> torch.Tensor:
        """The starting mixture: ``weights`` (a spec checked by :func:`weight_spec`) normalized, or uniform."""
        if weights is None:
            return torch.full((self.k,), 1.0 / self.k, dtype=F64)
        return normalize_domain_weights(weights, self.domain_names, field)

    def _set_probs(self, p: torch.Tensor) -> None:
        self._probs = torch.ones(1, dtype=F64) if self.k == 1 else floor_probabilities(p, self.min_prob)

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

    def wants_probe(self) -> torch.Tensor | None:
        """Aioli's probe mixture while a probe runs; ``None`` for every other controller."""
        return None

    def set_total_steps(self, n: int) -> None:
        """The number of optimizer steps of the run (called by the glue before training), kept in the state."""
        self._total_steps = integer(n, "set_total_steps(n)")

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
        self._probs = None if state["probs"] is None else state["probs"].clone().to(F64)
        self._total_steps = state.get("total_steps")


def measured(evaluated: torch.Tensor | None, d: int) -> bool:
    """Whether a per-domain eval set measures domain ``d`` (``evaluated``: a watch's bool per domain, None when the
    trainer could not say): a domain the user measures is wanted, so the domain watches spare it."""
    return evaluated is not None and bool(evaluated[d])


def finite_others(values: torch.Tensor, d: int) -> torch.Tensor:
    """The finite entries of a per-domain vector other than domain ``d``'s (what a watch compares domain ``d`` with)."""
    others = torch.cat([values[:d], values[d + 1:]])
    return others[torch.isfinite(others)]


class StuckDomainWatch(WindowWatch):
    """The failure signature of a mixture that feeds a domain the model cannot learn, seen once per run.

    ODM's reward is the training loss and DoReMi's the clipped excess loss over a reference: a domain neither model can
    learn (random characters, corrupted text) keeps the highest score for ever, and the mixture feeds it more and more
    data. Seen from the per-step domain losses:
    comparing the mean of the first ``window`` updates with the last ``window``, once ``3·window`` were seen
    (:class:`~hfweight.strategies.watch.WindowWatch`), the other domains' losses fell (median fall ≥ ``min_drop``)
    while the upweighted domain's fell by at most ``tail_ratio`` × that, its loss is the highest, and it gets ≥
    ``lift`` × its initial weight — unless a per-domain eval set measures that domain (:attr:`evaluated`, set by the
    controller from the trainer's eval sets): a hard domain the user wants is not junk. On the tuning corpora that
    spared one false alarm (ODM on ``builtin``, seed 2: its clean ``code`` domain, in a run better than stratified;
    ``benchmarks/results/concentration_watch.json`` holds the traces).
    """

    def __init__(self, window: int = 10, min_drop: float = 0.05, tail_ratio: float = 0.2, lift: float = 1.2):
        super().__init__(window)
        self.min_drop, self.tail_ratio, self.lift = min_drop, tail_ratio, lift
        self.evaluated: torch.Tensor | None = None  # bool per domain, set by the controller; None: not known

    def observe(self, step: int, loss: torch.Tensor, probs: torch.Tensor, initial: torch.Tensor) -> int | None:
        """Record one update's domain losses (NaN: absent); the index of a stuck, upweighted domain the first time
        the signature holds, else None. ``describe`` then gives the words."""
        if loss.numel() < 2 or not self.record(step, loss):
            return None
        self.early_mean, self.late_mean = self.means()
        drop = self.early_mean - self.late_mean
        d = int(torch.nan_to_num(self.late_mean, nan=-math.inf).argmax())
        others = finite_others(drop, d)
        if others.numel() == 0 or not math.isfinite(float(drop[d])):
            return None
        self.others_drop = float(others.median())
        wanted = measured(self.evaluated, d)  # a domain the user measures is not junk
        if (self.others_drop >= self.min_drop and float(drop[d]) <= self.tail_ratio * self.others_drop
                and float(probs[d]) >= self.lift * float(initial[d]) and not wanted):
            self.fire()
            return d
        return None

    def describe(self, d: int, name: str, probs: torch.Tensor, initial: torch.Tensor) -> str:
        return (f"domain {name!r} now gets {float(probs[d]):.2f} of the data (initial {float(initial[d]):.2f}) because "
                f"its training loss is the highest and does not fall ({float(self.early_mean[d]):.2f} → "
                f"{float(self.late_mean[d]):.2f} between steps {self.first_step} and {self.last_step}, while the other "
                f"domains' fell by {self.others_drop:.2f})")


class MemorizedDomainWatch(StreakWatch):
    """The failure signature of a mixture that keeps feeding a domain the model has already learned far better than
    the rest (memorizable data: near-duplicates, templates, boilerplate), seen once per run.

    Learning progress rewards how fast a domain's loss falls. Near-duplicate text is learned fastest of all, so it is
    upweighted first; once memorized its progress stops and the bandit moves on — unless the domain keeps yielding a
    little progress (templates with varied fillers), then it keeps a large share while the clean domains starve.
    Seen from the per-step domain losses and the mixture, comparing the first ``window`` updates with the last
    ``window`` (:class:`~hfweight.strategies.watch.WindowWatch`), the most upweighted domain ``d`` (largest late
    weight / initial weight):

    - gets ≥ ``lift`` × its initial weight (late-window mean),
    - its late loss is ≤ ``ratio`` × the median of the other domains' late losses (learned far better than the rest),
    - and its loss fell the most of all domains since the first window (it is the one being memorized),

    for ``patience`` consecutive updates. A transient episode does not fire: a domain memorized outright (exact
    duplicates) stops yielding progress once its loss flattens, and the bandit drops it within a few dozen updates.

    Defaults (``window`` 20, ``lift`` 1.3, ``ratio`` 0.3, ``patience`` 80) from per-step traces of learning progress
    with its defaults on the tuning corpora of ``benchmarks/corpora.py`` (200 steps): on ``builtin``, where it is
    0.09 nats worse than stratified, the near-duplicate domain held the signature for 98-120 consecutive updates
    (seeds 0-2); on ``pydocs``, ``records`` and ``ops`` (seeds 0-2; ``records`` seed 2 traced after the thresholds
    were set), where it meets the standard, the longest episode (boilerplate or exact duplicates, memorized outright
    and then dropped) lasted 57 (``benchmarks/results/learning_progress_watch.md``). The earliest
    warning comes after ``3·window + patience − 1`` = 139 updates; on ``builtin`` it came at steps 160-175.
    """

    def __init__(self, window: int = 20, lift: float = 1.3, ratio: float = 0.3, patience: int = 80):
        super().__init__(window, patience)
        self.lift, self.ratio = lift, ratio

    def observe(self, step: int, loss: torch.Tensor, probs: torch.Tensor, initial: torch.Tensor) -> int | None:
        """Record one update's domain losses (NaN: absent) and mixture; the index of the memorized, upweighted domain
        the first time the signature has held for ``patience`` updates, else None. ``describe`` gives the words."""
        k = loss.numel()
        if k < 2 or not self.record(step, torch.cat([loss.to(torch.float64), probs.to(torch.float64)])):
            return None
        early, late = self.means()
        self.early_loss, self.late_loss, self.late_probs = early[:k], late[:k], late[k:]
        lift = self.late_probs / initial
        d = int(torch.nan_to_num(lift, nan=-math.inf).argmax())
        drop = torch.nan_to_num(self.early_loss - self.late_loss, nan=-math.inf)
        others = finite_others(self.late_loss, d)
        self.others_median = float(others.median()) if others.numel() else math.nan
        holds = (others.numel() > 0 and float(lift[d]) >= self.lift and math.isfinite(float(drop[d]))
                 and float(self.late_loss[d]) <= self.ratio * self.others_median and int(drop.argmax()) == d)
        return d if self.streak(holds, d) else None

    def describe(self, d: int, name: str, probs: torch.Tensor, initial: torch.Tensor) -> str:
        return (f"domain {name!r} has got {float(self.late_probs[d]):.2f} of the data (initial "
                f"{float(initial[d]):.2f}) for the last {self.held} updates although its training loss is far below the "
                f"other domains' ({float(self.early_loss[d]):.2f} → {float(self.late_loss[d]):.2f} between steps "
                f"{self.first_step} and {self.last_step}, the fastest fall; the others' median is "
                f"{self.others_median:.2f})")


class ConcentratedDomainWatch(StreakWatch):
    """The failure signature of a mixture that spends the data on the domain the model is worst at, when that domain
    is not one the user evaluates, seen once per run.

    ODM's reward is the training loss and DoReMi's the excess loss over a reference: both send the most data to the
    domain with the highest loss (or the largest lag behind the reference). When that domain's loss is high because
    it is mostly noise that is still *partly* learnable (random bytes in a learnable layout: the ``records`` corpus'
    hex dumps), the loss keeps falling slowly, so :class:`StuckDomainWatch` stays silent, and the mixture spends 0.4
    to 0.7 of the data on it; on ``records`` DoReMi ended +0.045 and ODM +0.075 nats from stratified (3 seeds each).
    The same picture on a hard domain the user *does* want (an order-2 Markov text on the ``language`` corpus) is
    the method working as designed, and there ODM beat stratified. What tells the two apart is what the user
    measures: when the trainer has per-domain held-out sets (an ``eval_dataset`` dict keyed by domain names, or one
    with the domain column), :attr:`evaluated` marks those domains and the watch only fires on a domain outside them;
    without them it fires on the concentration alone and says so.

    The signature, on the mean of the last ``window`` updates (:class:`~hfweight.strategies.watch.WindowWatch`), for
    ``patience`` consecutive updates: the domain ``d`` with the largest weight / initial weight gets ≥ ``lift`` × its
    initial weight, its training loss is the highest of all domains, and it is not evaluated.

    Defaults (``window`` 10, ``lift`` 1.5, ``patience`` 50) from per-update traces of DoReMi and ODM with their
    defaults on the tuning corpora of ``benchmarks/corpora.py`` (200 steps; ``benchmarks/trace_watches.py``,
    ``benchmarks/results/concentration_watch.md``, 3 seeds each): on ``records`` the hex dumps held the signature for
    the last 115-136 updates (it fired at steps 114-135 in 6 of 6 runs); elsewhere the longest episode was 5 updates
    with the run's eval sets, and 33 replayed without them (DoReMi on ``builtin``, on its clean ``prose``, a run 0.11
    nats better than stratified). The earliest warning comes after ``3·window + patience − 1`` updates.
    """

    def __init__(self, window: int = 10, lift: float = 1.5, patience: int = 50):
        super().__init__(window, patience)
        self.lift = lift
        self.evaluated: torch.Tensor | None = None  # bool per domain, set by the controller; None: not known

    def observe(self, step: int, loss: torch.Tensor, probs: torch.Tensor, initial: torch.Tensor) -> int | None:
        """Record one update's domain losses (NaN: absent) and mixture; the index of the concentrated domain the
        first time the signature has held for ``patience`` updates, else None. ``describe`` gives the words."""
        k = loss.numel()
        if k < 2 or not self.record(step, torch.cat([loss.to(F64), probs.to(F64)])):
            return None
        late = self.means()[1]
        self.late_loss, self.late_probs = late[:k], late[k:]
        lift = self.late_probs / initial
        d = int(torch.nan_to_num(lift, nan=-math.inf).argmax())
        hardest = int(torch.nan_to_num(self.late_loss, nan=-math.inf).argmax())
        others = finite_others(self.late_loss, d)
        self.others_median = float(others.median()) if others.numel() else math.nan
        wanted = measured(self.evaluated, d)
        holds = others.numel() > 0 and float(lift[d]) >= self.lift and hardest == d and not wanted
        return d if self.streak(holds, d) else None

    def describe(self, d: int, name: str, probs: torch.Tensor, initial: torch.Tensor) -> str:
        measured = ("it is not one of the domains your eval_dataset measures" if self.evaluated is not None else
                    "no per-domain eval_dataset says which domains you measure")
        return (f"domain {name!r} has got {float(self.late_probs[d]):.2f} of the data (initial {float(initial[d]):.2f}) "
                f"for the last {self.held} updates because its training loss is the highest "
                f"({float(self.late_loss[d]):.2f}; the others' median {self.others_median:.2f}), and {measured}")


NOT_WANTED = ("If you do not want the model to learn that domain, leave it out (a static weight of 0) or use "
              "mixture='dga' with target= held-out sets of the domains you do want; if you do want it, pass an "
              "eval_dataset with per-domain held-out sets that include it")
LEAVE_IT_OUT = ("Leave that domain out (a static weight of 0, or filter it) or use another mixture (docs/guidance.md)")


def warn_if_stuck(watch: StuckDomainWatch | None, method: str, names: list[str], step: int, loss: torch.Tensor,
                  probs: torch.Tensor, initial: torch.Tensor, why: str, instead: str = LEAVE_IT_OUT) -> None:
    """Feed one update to a domain ``watch`` (None: watching is off; any watch with ``observe(step, loss, probs,
    initial) -> index | None`` and ``describe``) and warn once, the first time it sees the signature:
    ``"<method>: <what it saw>. <why> <instead>; <how to silence>"``."""
    if watch is None:
        return
    d = watch.observe(step, loss, probs, initial)
    if d is not None:
        warnings.warn(
            f"{method}: {watch.describe(d, names[d], probs, initial)}. {why} {instead}; "
            "mixture_kwargs={'watch': False} silences this check.",
            stacklevel=4,
        )
