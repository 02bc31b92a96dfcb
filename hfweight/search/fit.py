"""How the target loss depends on the mixture: two regressors fitted on the proxies, one chosen by out-of-fold rank
correlation.

- :func:`fit_loglinear`: the log-linear mixing law ``L(x) = exp(a) + exp(t · x)``, one law per target name, the
  prediction being their mean. Data Mixing Laws (Ye et al. 2024, eq. ``L_i(r) = c_i + k_i · exp(Σ_j t_ij r_j)``,
  fitted with a Huber loss from many restarts) and Olmix (AllenAI 2026, ``exp(c) + exp(x · t)``). Divergence: DML's
  ``k_i`` is dropped because on the simplex (``Σ x = 1``) ``k · exp(t · x) = exp((t + log k) · x)``, so it is not
  identifiable; ``exp(a)`` keeps the constant positive (Olmix's form). A small ridge on ``t`` keeps the fit defined
  with as few proxies as parameters (``k + 1``).
- :func:`fit_lightgbm`: RegMix's gradient-boosted trees (Liu et al. 2024, ``sail-sg/regmix``,
  ``regression_fitting/regression.ipynb``: LightGBM, 1000 iterations, learning rate 1e-2, early stopping on a held-out
  split), on the mean target directly. Divergence: RegMix fits 512 proxies; with the tens of proxies a small search
  has, LightGBM's defaults (``min_child_samples = 20``) would never split, so leaves need only 3 rows and trees have at
  most 7 leaves; one thread, deterministic; the early-stopping split is 20 % of the proxies (at least 2).
- :func:`select_model`: both are scored by the Spearman correlation between their out-of-fold predictions and the
  measured target (K-fold, ``K = min(5, n)``); the law is used unless LightGBM scores more than 0.05 higher (our
  rule, set after the ``pydocs`` benchmark: see the function); both scores are reported. RegMix reports
  Spearman because only the ranking of mixtures matters to the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]  # (n, k) mixtures → (n,) predicted mean target loss
Fitter = Callable[[np.ndarray, np.ndarray, int], Predictor]  # (X (n, k), Y (n, m) per-target losses, seed)

LOGLINEAR_RESTARTS = 8
LOGLINEAR_RIDGE = 1e-4
HUBER_SCALE = 0.05  # nats: residuals beyond this count linearly (a proxy that diverged does not drag the law)
LGBM_ROUNDS = 1000
LGBM_PARAMS = {"objective": "regression", "learning_rate": 1e-2, "num_leaves": 7, "min_data_in_leaf": 3,
               "min_data_in_bin": 1, "verbose": -1, "num_threads": 1, "deterministic": True}
LGBM_STOPPING_ROUNDS = 50
MAX_FOLDS = 5
PREFER_SIMPLER_WITHIN = 0.05  # Spearman margin by which LightGBM must beat the law to be used (see select_model)


def loglinear_law(params: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``exp(a) + exp(X @ t)`` with ``params = [a, t_1..t_k]``."""
    return np.exp(params[0]) + np.exp(X @ params[1:])


def fit_loglinear_one(X: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """``[a, t]`` of one target's law, by Huber-loss least squares (:func:`scipy.optimize.least_squares`) from
    :data:`LOGLINEAR_RESTARTS` starts; the lowest-cost fit wins (Data Mixing Laws' restarts)."""
    from scipy.optimize import least_squares

    rng = np.random.default_rng(seed)
    k = X.shape[1]
    floor = max(float(y.min()), 1e-6)

    ridge = np.sqrt(LOGLINEAR_RIDGE)

    def residuals(params):
        return np.concatenate([loglinear_law(params, X) - y, ridge * params[1:]])

    def jacobian(params):  # d/da = exp(a); d/dt_j = exp(t·x) x_j; the ridge rows: ridge · I on t
        law_rows = np.column_stack([np.full(len(X), np.exp(params[0])), np.exp(X @ params[1:])[:, None] * X])
        ridge_rows = np.column_stack([np.zeros(k), ridge * np.eye(k)])
        return np.vstack([law_rows, ridge_rows])

    best = None
    for restart in range(LOGLINEAR_RESTARTS):
        constant_share = 0.5 if restart == 0 else rng.uniform(0.05, 0.95)
        start = np.concatenate([[np.log(constant_share * floor)],
                                np.log((1 - constant_share) * float(y.mean())) + rng.normal(0.0, 0.5 * (restart > 0), k)])
        result = least_squares(residuals, start, jac=jacobian, loss="huber", f_scale=HUBER_SCALE, max_nfev=2000)
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def fit_loglinear(X: np.ndarray, Y: np.ndarray, seed: int = 0) -> Predictor:
    """One law per target column of ``Y``; predicts their mean."""
    params = [fit_loglinear_one(X, Y[:, j], seed + j) for j in range(Y.shape[1])]

    def predict(Z: np.ndarray) -> np.ndarray:
        return np.mean([loglinear_law(p, Z) for p in params], axis=0)

    predict.params = params  # for the report and the tests
    return predict


def fit_lightgbm(X: np.ndarray, Y: np.ndarray, seed: int = 0) -> Predictor:
    """LightGBM on the mean target, early-stopped on a random 20 % of the rows (when there are at least 10)."""
    import lightgbm

    y = Y.mean(axis=1)
    params = {**LGBM_PARAMS, "seed": seed}
    n = len(y)
    if n >= 10:
        order = np.random.default_rng(seed).permutation(n)
        held, fit_rows = order[: max(2, n // 5)], order[max(2, n // 5):]
        train_set = lightgbm.Dataset(X[fit_rows], y[fit_rows], params=params)
        valid_set = lightgbm.Dataset(X[held], y[held], reference=train_set, params=params)
        model = lightgbm.train(params, train_set, LGBM_ROUNDS, valid_sets=[valid_set],
                               callbacks=[lightgbm.early_stopping(LGBM_STOPPING_ROUNDS, verbose=False)])
    else:
        model = lightgbm.train(params, lightgbm.Dataset(X, y, params=params), LGBM_ROUNDS)

    def predict(Z: np.ndarray) -> np.ndarray:
        return model.predict(Z)

    return predict


FITTERS: dict[str, Fitter] = {"loglinear": fit_loglinear, "lightgbm": fit_lightgbm}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (NaN when either side is constant)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def out_of_fold(fitter: Fitter, X: np.ndarray, Y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each proxy's prediction by a model fitted without it: K-fold, ``K = min(5, n)``, seeded random folds."""
    n = len(X)
    folds = np.array_split(np.random.default_rng(seed).permutation(n), min(MAX_FOLDS, n))
    predictions = np.empty(n)
    for held in folds:
        kept = np.setdiff1d(np.arange(n), held)
        predictions[held] = fitter(X[kept], Y[kept], seed)(X[held])
    return predictions


@dataclass
class FitResult:
    """The chosen regressor (fitted on every proxy) and how each candidate ranked the proxies out of fold."""

    chosen: str
    predict: Predictor
    spearman: dict[str, float]
    out_of_fold: dict[str, list[float]]
    in_sample: dict[str, list[float]] = field(default_factory=dict)


def select_model(X: np.ndarray, Y: np.ndarray, seed: int = 0, fitters: dict[str, Fitter] | None = None) -> FitResult:
    """Fit every regressor, score each by out-of-fold Spearman against the mean target, and keep the first listed
    (the simplest: the log-linear law, ``k + 1`` parameters) whose score is within :data:`PREFER_SIMPLER_WITHIN` of
    the best. Why the margin: the choice ranks 100,000 simulated mixtures, not the proxies, and LightGBM's
    piecewise-constant predictions tie over many of them; the top-k average then spreads over the tie and the KL
    term drags it to the prior (on the ``pydocs`` benchmark, seed 0, LightGBM at 0.91 vs the law's 0.89 kept 24 % of a
    junk domain). So trees are used only when they rank the proxies clearly better."""
    fitters = fitters or FITTERS
    target = Y.mean(axis=1)
    oof = {name: out_of_fold(fitter, X, Y, seed) for name, fitter in fitters.items()}
    rho = {name: spearman(pred, target) for name, pred in oof.items()}
    scores = {name: -np.inf if np.isnan(value) else value for name, value in rho.items()}
    best = max(scores.values())
    chosen = next(name for name in fitters if scores[name] >= best - PREFER_SIMPLER_WITHIN)
    predict = fitters[chosen](X, Y, seed)
    return FitResult(chosen=chosen, predict=predict, spearman=rho,
                     out_of_fold={name: pred.tolist() for name, pred in oof.items()},
                     in_sample={chosen: predict(X).tolist()})
