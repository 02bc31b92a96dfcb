"""Nelder–Mead minimization as an ask/tell state machine (docs/methods.md#nelder-mead): the threshold search of
constrained RLHF (Moskovitz et al., ICLR 2024; ``tedmoskovitz/ConstrainedRL4LMs``, ``NelderMeadTrainer``), where
one evaluation spans many training steps and the search must survive a checkpoint. Coefficients: α 1, γ 2, ρ 0.5,
σ 0.5, tol 0.01, max_iters 10 (the authors' ``gpt2_nm_ppo.yml``).
"""

from __future__ import annotations

import math

import numpy as np


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
        if self.phase in ("init", "shrink"):
            self._record_vertex(value)
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

    def _record_vertex(self, value: float) -> None:
        """Initial simplex or after a shrink: store the value of vertex ``index``, then ask for the next vertex, or
        start an iteration once every vertex has its value."""
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
