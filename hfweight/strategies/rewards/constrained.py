"""Constrained RLHF with Lagrange multipliers (Moskovitz et al., ICLR 2024; ``tedmoskovitz/ConstrainedRL4LMs``)
(docs/methods.md#constrained).

One task reward and ``n = K − 1`` constraints ``J_i ≥ τ_i`` (or ``= τ_i``); multipliers ``λ_i = squash(θ_i)``
stepped by SGD with momentum on ``Σ_i λ_i (J_i − τ_i)``; weights ``w_task = n − Σλ``, ``w_i = λ_i``. Defaults:
``dual_lr`` 0.1, ``momentum`` 0.1, ``dual_grad_clip`` 0.5, ``squash="sigmoid"``. Optional Nelder–Mead search of the
thresholds (:mod:`.nelder_mead`).
"""

from __future__ import annotations

import math
import warnings

import torch

from ...registry import register_reward_weighting
from ..checks import choice, flag, integer, number
from .base import F64, Weighter, as_f64, column_stats, floats, kwarg, per_reward_spec, resolve_per_reward
from .nelder_mead import NelderMead


@register_reward_weighting("constrained")
class ConstrainedWeighting(Weighter):
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
            per_reward_spec(thresholds, "thresholds", allow_none=True)
        self._thresholds_spec = thresholds
        if isinstance(task, bool) or not isinstance(task, int | str):
            raise ValueError(f"{kwarg('task')} must be a reward function name or index, got {task!r}.")
        self._task_spec = task
        self.squash = choice(squash, kwarg("squash"), ("sigmoid", "tanh"))
        self.dual_lr = number(dual_lr, kwarg("dual_lr"), low=0.0)
        self.momentum = number(momentum, kwarg("momentum"), low=0.0, high=1.0)
        if isinstance(init, int | float) and not isinstance(init, bool):
            number(init, kwarg("init"))
        else:
            per_reward_spec(init, "init")
        self._init_spec = init
        self.dual_grad_clip = None if dual_grad_clip is None else number(dual_grad_clip, kwarg("dual_grad_clip"), low=0.0,
                                                                          low_open=True)
        self.dual_steps = integer(dual_steps, kwarg("dual_steps"))
        self.scale_by_std = flag(scale_by_std, kwarg("scale_by_std"))
        self.nelder_mead = flag(nelder_mead, kwarg("nelder_mead"))
        self.needs_validation = nelder_mead
        self._nm_coef = dict(
            alpha=number(nm_alpha, kwarg("nm_alpha"), low=0.0, low_open=True),
            gamma=number(nm_gamma, kwarg("nm_gamma"), low=1.0, low_open=True),
            rho=number(nm_rho, kwarg("nm_rho"), low=0.0, low_open=True, high=0.5),
            sigma=number(nm_sigma, kwarg("nm_sigma"), low=0.0, low_open=True, high=1.0),
            tol=number(nm_tol, kwarg("nm_tol"), low=0.0),
            max_iters=integer(nm_max_iters, kwarg("nm_max_iters"), minimum=0),
        )
        self.nm_step = number(nm_step, kwarg("nm_step"), low=0.0, low_open=True)
        self.nm_reach_tolerance = number(nm_reach_tolerance, kwarg("nm_reach_tolerance"), low=0.0)
        self.nm_patience = integer(nm_patience, kwarg("nm_patience"))

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
                raise ValueError(f"{kwarg('task')} = {task!r} is not a reward function; the K = {k} reward functions "
                                 f"are {names}.")
            task = names.index(task)
        elif not -k <= task < k:
            raise ValueError(f"{kwarg('task')} = {task} is out of range for K = {k} reward functions {names}.")
        self.task = task % k
        self.constraints = [i for i in range(k) if i != self.task]
        n = len(self.constraints)
        if n == 0:
            if self._thresholds_spec not in (None, [], {}):
                raise ValueError(f"{kwarg('thresholds')} was given but there is a single reward function {names}: "
                                 "nothing to constrain.")
            tau = []
        else:
            if self._thresholds_spec is None:
                raise ValueError(f"reward_weighting='constrained' needs {kwarg('thresholds')}: one threshold per "
                                 f"constraint reward {[names[i] for i in self.constraints]} (K = {k} reward functions "
                                 f"{names}; task {names[self.task]!r}).")
            resolved = resolve_per_reward(self._thresholds_spec, names, "thresholds", skip=self.task)
            tau = [resolved[i] for i in self.constraints]
        self._tau = torch.tensor(tau, dtype=F64)
        if isinstance(self._init_spec, int | float):
            theta = [float(self._init_spec)] * n
        else:
            vals = self._init_spec.tolist() if hasattr(self._init_spec, "tolist") else list(self._init_spec)
            if len(vals) != n:
                raise ValueError(f"{kwarg('init')} has {len(vals)} entries; expected one per constraint reward "
                                 f"({n}: {[names[i] for i in self.constraints]}).")
            theta = [float(v) for v in vals]
        self._theta = torch.tensor(theta, dtype=F64)
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
            self._tau = torch.tensor(self._nm.ask(), dtype=F64)
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
        w = torch.zeros(k, dtype=F64)
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
        self._last_violation = floats(violation)
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
        s = as_f64(scores).flatten()
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
            self._tau = torch.tensor(self._nm.best() if nxt is None else nxt, dtype=F64)

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
            "theta": floats(self._theta),
            "buf": None if self._buf is None else floats(self._buf),
            "tau": floats(self._tau),
            "last_violation": list(self._last_violation),
            "nm": None if self._nm is None else self._nm.state_dict(),
            "nm_validations": self._nm_validations,
        }

    def _load(self, state):
        self._theta = torch.tensor(state["theta"], dtype=F64)
        self._buf = None if state["buf"] is None else torch.tensor(state["buf"], dtype=F64)
        self._tau = torch.tensor(state["tau"], dtype=F64)
        self._last_violation = [float(v) for v in state["last_violation"]]
        if state["nm"] is not None:
            if self._nm is None:
                raise ValueError("The saved state has a Nelder–Mead search but nelder_mead=False in this run.")
            self._nm.load_state_dict(state["nm"])
        self._nm_validations = int(state["nm_validations"])
