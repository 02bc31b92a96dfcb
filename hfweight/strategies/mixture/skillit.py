"""Skill-it (Chen et al. 2023): online multiplicative weights over skills through a skills graph
(docs/methods.md#skillit).

Every ``update_every`` steps, from the initial weights: ``p ∝ p₀ ⊙ exp(η · A · Σ_{last window evals} L_eval)``.
Defaults: ``eta`` 0.5, ``window`` 3, ``update_every`` 1000. Source: ``HazyResearch/skill-it``,
``trainer/mw_trainer.py`` (``MWTrainer.train``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import integer, number
from .base import F64, INITIAL_WEIGHTS, Controller, domain_vector, kwarg, mix_update, weight_spec


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
class SkillItMixture(Controller):
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
        self.eta = number(eta, kwarg("eta"), low=0, low_open=True)
        self.window = integer(window, kwarg("window"))
        self.update_every = integer(update_every, kwarg("update_every"))
        self.initial_weights = weight_spec(initial_weights, INITIAL_WEIGHTS)

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
        return torch.tensor(spec, dtype=F64)

    def _on_bind(self):
        self.A = self._resolve_graph()
        p0 = self._initial(self.initial_weights)
        self._log_p0 = torch.log(p0)
        self._log_p = mix_update(self._log_p0, torch.ones(self.k, dtype=F64), self.eta, A=self.A, min_prob=self.min_prob)
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
        self._history = (self._history + [domain_vector(losses, self.k, "skillit: the held-out losses")])[-self.window:]
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

