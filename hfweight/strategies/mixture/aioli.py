"""Aioli (Chen et al. 2024): the mixing-law matrix ``A`` estimated online from short probe runs, then
``p ← p ⊙ exp(η Σ_i A_ij)`` (docs/methods.md#aioli).

Defaults: ``eta`` 1, ``ema`` 0.1, ``normalize_A``, rounds of ``min(200, run)`` steps with probes bounded by
``probe_fraction`` 0.1 of each round, probe mass ``min(0.75, 1.5/k)``, two sweeps per LearnParams in antithetic order. Source: ``HazyResearch/aioli``, ``trainer/aioli_trainer.py``
(``AioliTrainer.train``, ``learn_params_subroutine``); defaults from ``scripts/full/aioli/run.sh``.
"""

from __future__ import annotations

import warnings

import torch

from ...registry import register_mixture
from ..base import DomainStats
from ..checks import in_range, integer, number
from .base import F64, Controller, domain_vector, kwarg, mix_update, weight_spec


def probe_mixture(k: int, index: int, one_hot_factor: float) -> torch.Tensor:
    """Aioli's near-one-hot probe: ``one_hot_factor`` on ``index``, the rest spread evenly."""
    if k == 1:
        return torch.ones(1, dtype=F64)
    p = torch.full((k,), (1 - one_hot_factor) / (k - 1), dtype=F64)
    p[index] = one_hot_factor
    return p


def probe_sequence(k: int, sweeps: int, order: str, generator: torch.Generator) -> torch.Tensor:
    """The domains probed in one LearnParams phase, ``sweeps`` sweeps of all ``k``.

    ``"random"`` (the authors' ``np.concatenate([np.random.permutation(k) for _ in range(lp_rounds)])``): an
    independent permutation per sweep. ``"antithetic"``: one permutation, every odd sweep in reverse, so with an even
    number of sweeps every domain's probes sit at positions summing to the same total: a loss that falls by the same
    amount per step whatever is trained on (the learning curve of a young model) adds the same drop to every column of
    ``G`` instead of crediting whichever domain happened to be probed first.
    """
    if order == "random":
        return torch.cat([torch.randperm(k, generator=generator) for _ in range(sweeps)])
    perm = torch.randperm(k, generator=generator)
    return torch.cat([perm if sweep % 2 == 0 else perm.flip(0) for sweep in range(sweeps)])


PROBE_CONTRAST = 1.5
"""Default probe mass on the probed domain, as a multiple of the uniform share 1/k (capped at 0.75)."""


def default_one_hot_factor(k: int) -> float:
    """The default probe mass ``min(0.75, 1.5 / k)`` (1 for a single domain): the authors' 3-domain setting (0.5 =
    1.5/3, ``scripts/arxiv_books_stackexchange/aioli/run.sh``) for every k, and never above their 7-domain 0.75.

    Why not their 0.75 for k = 7 (5× uniform): a probe is training, and at a young model's high learning rate a few
    steps that put 75% of the batch on one domain — a junk one included — leave a lasting dent (issue 23: on the
    ``records`` corpus, 20 probe steps at 0.75 left the model 0.56 nats behind stratified at step 200 although the
    learned mixture was near uniform; the same run with probes at 0.26 ended within 0.01 of stratified).
    """
    return 1.0 if k <= 1 else min(0.75, PROBE_CONTRAST / k)


@register_mixture("aioli")
class AioliMixture(Controller):
    """Aioli (Chen et al. 2024): estimate the mixing-law matrix ``A`` online from short probe runs, then
    ``p ← p ⊙ exp(η Σ_i A_ij)``.

    Source: ``HazyResearch/aioli``, ``trainer/aioli_trainer.py`` (``AioliTrainer.train``,
    ``learn_params_subroutine``); defaults from ``scripts/full/aioli/run.sh`` (``--lp_rounds 2 --lp_steps 10 --eta 1
    --update_steps 200 --one_hot_factor 0.75 --ema 0.1 --aioli_normalize_A --aioli_prior 1 … --prior_steps 0``).

    Rounds. Training is cut into rounds of ``update_every`` optimizer steps. Each round starts with LearnParams:

    1. held-out per-domain losses ``L⁰`` (an eval request);
    2. for each probe ``j`` of ``lp_rounds`` sweeps of the domains (:func:`probe_sequence`): train ``lp_steps`` steps on the probe
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
    else two sweeps of ``lp_steps = ⌊probe_fraction · update_every / 2k⌋`` (issue 23: two sweeps in opposite orders
    cancel the learning curve's trend, which one sweep credits to the first-probed domain), else one sweep with
    ``lp_steps = min(10, ⌊probe_fraction · update_every / k⌋)``; if not even one step per domain fits, Aioli warns and
    keeps its prior for the run (no probes, no evals). Explicit ``lp_rounds``/``lp_steps`` are used as given, with a
    warning when they exceed the bound. No round starts at the run's last step.

    Repairs for short runs on unfamiliar data (issue 23; docs/methods.md#aioli). With the issue-15 defaults (one sweep
    of 4-step probes at 0.75, η = k) Aioli lost 0.42 nats to stratified on a corpus it was not tuned on and 0.56 on
    ``records``: (1) the probes themselves did the damage — at a young model's high learning rate, steps with 75% of
    the batch on one domain left a lasting dent while the learned mixture stayed near uniform (probes at 0.26: within
    0.01 of stratified); hence the probe mass ``min(0.75, 1.5/k)``; (2) one sweep credits the learning curve's fall
    to whichever domain is probed first: hence two antithetic sweeps; (3) η = k turned a noisy ``A`` into a mixture
    far from the prior: back to the authors' η = 1. The "0.75 on one domain" seen as the final mixture was a probe
    started at the last step (a display artifact, now gone).

    Held-out sets for only some domains (the common case: held-out data for the domains you care about, none for the
    junk). A domain whose held-out loss is NaN at the start of a round is *uncovered*: its row of ``A`` (how training
    helps it) is left out — zero, and excluded from ``normalize_A``'s shift and scale — while its column stays: an
    uncovered domain is still probed and weighted by how much training on it lowers the covered domains' losses.

    Protocol (see :mod:`hfweight.strategies.mixture.base`): the glue checks :meth:`eval_requested` before training
    and after each :meth:`observe` and then calls :meth:`observe_eval`; while a probe runs, :meth:`wants_probe` and
    :meth:`probabilities` return the probe mixture. ``observe`` with an eval pending is an error (the round cannot
    continue without it). NaN held-out losses count as a zero drop. The probe order comes from a generator seeded with
    ``seed`` and the round number, so every rank agrees and a resumed run draws the same order.

    Args:
        lp_rounds: Sweeps through the domains per LearnParams (default ``None``: 2, or 1 when two do not fit the probe
            share).
        lp_steps: Optimizer steps per probe (default ``None``: 10, fewer when they do not fit the probe share).
        probe_fraction: Bound on the share of each round's steps spent in probes (default 0.1; in ``(0, 1)``).
        eta: Step size (default 1, the authors' full-scale script; their 2- and 3-domain scripts use 0.2 and 0.1).
            With ``normalize_A`` (``ΣA = 1``) a domain's log-weight moves by at most η from the prior. Issue 15 had
            raised it to k; issue 23 measured k worse than 1 once the probes stopped doing damage (seed 0, 200 steps:
            built-in +0.162 vs +0.059, ``records`` +0.073 vs +0.019 nats over stratified) — with k, a noisy ``A``
            from one LearnParams at a random init moved 0.47 of the built-in data onto the noise domain.
        ema: EMA weight of the previous ``A`` (default 0.1); ``None`` for the cumulative update.
        update_every: Round length in optimizer steps (default ``None``: ``min(200, total_steps)``, the authors' 200
            when the run length is unknown).
        one_hot_factor: Probe mass on the probed domain (default ``None``: :func:`default_one_hot_factor`,
            ``min(0.75, 1.5/k)``; the authors' scripts: 0.625 for 2 domains, 0.5 for 3, 0.75 for 7; must exceed
            ``1/k``).
        probe_order: ``"antithetic"`` (default: the second sweep probes in reverse order, :func:`probe_sequence`) or
            ``"random"`` (the authors' independent permutation per sweep).
        normalize_A: Shift and scale ``A`` before the update (default True, ``--aioli_normalize_A``).
        diagonal: Keep only ``A``'s diagonal (the authors' ablation).
        prior: Initial weights ``p₀`` (default uniform, the authors' ``--aioli_prior 1 1 …``).
        seed: Seed of the probe order (default 0).
        min_prob: Floor of the learned mixture (default 1e-4; probes are not floored).
    """

    needs_eval = True

    AUTHORS_LP_ROUNDS, AUTHORS_LP_STEPS, AUTHORS_UPDATE_EVERY = 2, 10, 200
    MIN_ROUNDS = 3  # fewer LearnParams rounds in the run: a warning (measured, issue 23)

    def __init__(self, lp_rounds: int | None = None, lp_steps: int | None = None, eta: float = 1.0,
                 ema: float | None = 0.1, update_every: int | None = None, one_hot_factor: float | None = None,
                 normalize_A: bool = True, diagonal: bool = False, prior=None, seed: int = 0, min_prob: float = 1e-4,
                 probe_fraction: float = 0.1, probe_order: str = "antithetic", domains=None):
        super().__init__(min_prob=min_prob, domains=domains)
        self.given = {
            "lp_rounds": None if lp_rounds is None else integer(lp_rounds, kwarg("lp_rounds")),
            "lp_steps": None if lp_steps is None else integer(lp_steps, kwarg("lp_steps")),
            "update_every": None if update_every is None else integer(update_every, kwarg("update_every")),
        }
        self.probe_fraction = in_range(probe_fraction, kwarg("probe_fraction"), 0, 1, high_open=True)
        if self.probe_fraction == 0:
            raise ValueError("mixture_kwargs['probe_fraction'] must be > 0: Aioli learns only from its probes.")
        self.lp_rounds = self.given["lp_rounds"] or self.AUTHORS_LP_ROUNDS
        self.lp_steps = self.given["lp_steps"] or self.AUTHORS_LP_STEPS
        self.eta = number(eta, kwarg("eta"), low=0, low_open=True)
        self.ema = None if ema is None else in_range(ema, kwarg("ema"), 0, 1, high_open=True)
        self.update_every = self.given["update_every"] or self.AUTHORS_UPDATE_EVERY
        self.probing = True
        self.one_hot_given = one_hot_factor is not None  # None: PROBE_CONTRAST / k, set at bind
        self.one_hot_factor = None if one_hot_factor is None else in_range(one_hot_factor, kwarg("one_hot_factor"), 0, 1)
        self.normalize_A, self.diagonal = bool(normalize_A), bool(diagonal)
        self.prior = weight_spec(prior, kwarg("prior"))
        self.seed = integer(seed, kwarg("seed"), 0)
        if probe_order not in ("antithetic", "random"):
            raise ValueError(f"mixture_kwargs['probe_order'] must be 'antithetic' or 'random', got {probe_order!r}.")
        self.probe_order = probe_order

    def _resolve_cadence(self, total_steps: int | None) -> None:
        """Round length and probe sizes from the given values, the probe share and the run length (class docstring)."""
        k, given = self.k, self.given
        self.update_every = given["update_every"] or (
            self.AUTHORS_UPDATE_EVERY if total_steps is None else min(self.AUTHORS_UPDATE_EVERY, total_steps))
        budget = self.probe_fraction * self.update_every
        self.probing = True
        if given["lp_rounds"] is None and given["lp_steps"] is None:
            rounds, steps = self.AUTHORS_LP_ROUNDS, self.AUTHORS_LP_STEPS
            if k * rounds * steps > budget:  # shorter probes first: two sweeps cancel the learning curve's trend
                steps = min(self.AUTHORS_LP_STEPS, int(budget // (k * rounds)))
            if steps < 1:
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
        rounds = None if self._total_steps is None else -(-self._total_steps // self.update_every)
        if self.probing and rounds is not None and rounds < self.MIN_ROUNDS and not getattr(self, "_warned_short", False):
            self._warned_short = True
            warnings.warn(
                f"aioli: this {self._total_steps}-step run has {rounds} LearnParams round(s) of {self.update_every} "
                f"steps; with so few, the probes ({probe_steps} steps per round on probe mixtures) cost about what the "
                "learned mixture gains (issue 23, 200-step runs on five corpora: between -0.002 and +0.066 nats vs "
                "stratified, docs/guidance.md). Aioli is made for runs of many rounds (the authors: 20-200); for a short "
                "run prefer mixture='doremi' with a reference model, or stratified sampling.",
                stacklevel=3,
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
        if not self.one_hot_given:
            self.one_hot_factor = default_one_hot_factor(k)
        if k > 1:
            if self.one_hot_factor <= 1.0 / k:
                raise ValueError(
                    f"mixture_kwargs['one_hot_factor']={self.one_hot_factor} must exceed 1/k = {1 / k:.4g} for {k} "
                    "domains (otherwise the probes are uniform and A cannot be identified)."
                )
            self._resolve_cadence(self._total_steps)
        p0 = self._initial(self.prior, kwarg("prior"))
        self._set_probs(p0)
        self._log_p0 = torch.log(self._probs)
        self._log_p = self._log_p0.clone()
        self._step = 0
        self._round = 0
        self._phase = "mix"
        self._pending = "round_start" if k > 1 and self.probing else None
        self._order = torch.zeros(0, dtype=torch.long)
        self._probe_idx = self._probe_step = 0
        self._prev_loss = torch.zeros(k, dtype=F64)
        self._graph = torch.zeros(k, k, dtype=F64)
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
        elif (self.k > 1 and self.probing and self._step % self.update_every == 0
              and (self._total_steps is None or self._step < self._total_steps)):
            # no round at the run's last step: its eval would be wasted and its probe shown as the final mixture
            self._pending = "round_start"

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        self._require_bound()
        if self._pending is None:
            return
        losses = domain_vector(losses, self.k, "aioli: the held-out losses")
        if self._pending == "round_start":
            self._covered = torch.isfinite(losses)
        losses = torch.where(torch.isfinite(losses), losses, torch.zeros_like(losses))
        if self._pending == "round_start":
            self._order = probe_sequence(self.k, self.lp_rounds, self.probe_order,
                                         torch.Generator().manual_seed(self.seed * 1_000_003 + self._round))
            self._prev_loss = losses
            self._graph = torch.zeros(self.k, self.k, dtype=F64)
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
        G = graph.to(F64) / self.lp_rounds
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

