"""From the fitted regressor to one mixture: simulate many admissible mixtures, score them, average the best.

RegMix (Liu et al. 2024, ``sail-sg/regmix``, ``regression_fitting/regression.ipynb``): predict the target for 100,000
mixtures drawn from the proposal distribution and return the mean of the 128 best. Olmix (AllenAI 2026): minimize the
predicted loss plus ``λ · KL(x ‖ prior)`` under the repetition caps ``x_i ≤ tokens_i · repetition / final_tokens``, so a
noisy fit cannot send the whole budget to one corner. Here both: the candidates are RegMix's simulated sample, drawn
from the same capped Dirichlet proposals as the proxies (:func:`.proposals.sample_mixtures`, so every candidate
respects the caps), each scored ``predicted(x) + kl_weight · KL(x ‖ prior)``, and the top ``top_k`` are averaged. The
average of capped mixtures is capped (the caps and the simplex are convex), so the result respects them too.

Divergence: Olmix solves the penalized problem by convex optimization of its log-linear law; here the regressor may
be LightGBM (not convex, not differentiable), so the minimization is RegMix's sample-and-average for both.
``kl_weight = 0.01`` nats of predicted loss per nat of KL is our default (not a published number): moving from a
uniform prior over five domains to a one-hot mixture costs ``0.01 · log 5 ≈ 0.016`` nats, less than the loss
differences between mixtures a search is meant to find, more than the fit's noise between near-equal mixtures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fit import Predictor
from .proposals import sample_mixtures

N_CANDIDATES = 100_000  # RegMix
TOP_K = 128  # RegMix
KL_WEIGHT = 0.01
CANDIDATE_BATCH = 20_000


def kl_divergence(X: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """``KL(x ‖ prior) = Σ_i x_i log(x_i / prior_i)`` per row (``0 · log 0 = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(X > 0, X * np.log(X / prior[None, :]), 0.0)
    return terms.sum(axis=1)


@dataclass
class Choice:
    weights: np.ndarray  # (k,) the chosen mixture
    predicted: float  # the regressor's prediction at it
    kl_to_prior: float
    top: np.ndarray  # (top_k, k) the averaged candidates


def choose_mixture(predict: Predictor, prior: np.ndarray, caps: np.ndarray, seed: int = 0,
                   n_candidates: int = N_CANDIDATES, top_k: int = TOP_K, kl_weight: float = KL_WEIGHT) -> Choice:
    """Mean of the ``top_k`` simulated mixtures with the lowest ``predict(x) + kl_weight · KL(x ‖ prior)``."""
    candidates = sample_mixtures(prior, caps, n_candidates, np.random.default_rng(seed), batch=CANDIDATE_BATCH)
    scores = predict(candidates) + kl_weight * kl_divergence(candidates, prior)
    best = candidates[np.argsort(scores, kind="stable")[: min(top_k, len(candidates))]]
    weights = best.mean(axis=0)
    weights = weights / weights.sum()
    return Choice(weights=weights, predicted=float(predict(weights[None, :])[0]),
                  kl_to_prior=float(kl_divergence(weights[None, :], prior)[0]), top=best)
