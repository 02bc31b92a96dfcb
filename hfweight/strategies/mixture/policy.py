"""``policy``: a user callable ``(history) -> weights`` as the mixture controller (the interface of learned mixers
such as Data Mixing Agent, 2025) (docs/methods.md#policy). Called every ``update_every`` steps (default 1); its
output is validated, normalized and floored.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import integer
from .base import F64, INITIAL_WEIGHTS, Controller, domain_vector, kwarg, weight_spec


def _load_callable(spec, field: str) -> Callable:
    """``spec`` itself when callable, else the object at its import path ``"package.module:function"``."""
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


@register_mixture("policy")
class PolicyMixture(Controller):
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
        self.policy = _load_callable(policy, kwarg("policy"))
        self.update_every = integer(update_every, kwarg("update_every"))
        self.history_size = None if history_size is None else integer(history_size, kwarg("history_size"))
        self.initial_weights = weight_spec(initial_weights, INITIAL_WEIGHTS)

    def _on_bind(self):
        self._set_probs(self._initial(self.initial_weights))
        self.history: list[dict] = []
        self._last_eval: tuple[int, dict] | None = None

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        self._require_bound()
        values = domain_vector(losses, self.k, "policy: the held-out losses").tolist()
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
        p = torch.tensor(values, dtype=F64)
        return p / p.sum()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": [dict(h) for h in self.history], "last_eval": self._last_eval}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = [dict(h) for h in state["history"]]
        self._last_eval = state["last_eval"]

