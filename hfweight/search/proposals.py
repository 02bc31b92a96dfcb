"""Which mixtures the proxies train on: RegMix's Dirichlet proposals around the token-share prior, capped by how often
the final run may repeat each domain's data.

Source: RegMix (Liu et al. 2024, "RegMix: Data Mixture as Regression for Language Model Pre-training"), authors' code
``sail-sg/regmix``, ``mixture_config/synthesize_mixture.py`` (``generate_weights_dirichlet``). Their choices, kept
here as defaults: the prior is the token shares smoothed with temperature 0.5 (``p^0.5``, renormalized); each
proposal is one draw of ``Dirichlet(prior · s)`` with ``s`` picked uniformly among 15 log-spaced concentrations in
``[0.1, 5]``; a draw giving any domain more than ``max_repetition`` epochs of its data in the final run is rejected.

Divergences, and why:

- The cap. RegMix bounds ``x_i ≤ prior_i · 15`` (15 epochs, the prior being the share of all tokens, the final run
  using them all once). Here the final run's token budget is explicit (``final_tokens``), so the cap is Olmix's
  ``x_i ≤ tokens_i · max_repetition / final_tokens`` (Olmix, AllenAI 2026), with ``max_repetition = 4`` (the number
  RegMix's own comment calls safe, and Olmix's default).
- Small shares. RegMix zeroes shares below 2e-4 and rounds to that grid (≈ 100 examples of a 1B-token proxy). Proxies
  here are far smaller, so the floor is ``min_share = 1e-3`` and there is no rounding (proposals are deduplicated by
  their index in a seeded stream instead: the same seed gives the same proposals, and the first ``n`` of a longer
  stream are the ``n`` of a shorter one, so a study can be extended).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

PRIOR_TEMPERATURE = 0.5  # RegMix TEMP
MIN_CONCENTRATION, MAX_CONCENTRATION, N_CONCENTRATIONS = 0.1, 5.0, 15  # RegMix MIN_STRENGH, MAX_STRENGH, logspace(15)
MAX_REPETITION = 4.0  # Olmix's default; RegMix's comment: "repeating 4 epochs is okay"
MIN_SHARE = 1e-3
FINAL_TOKENS_FACTOR = 10.0  # default final budget = proxy budget × this (RegMix: 1B-token proxies, 25B-token final)
MAX_DRAWS_PER_PROPOSAL = 10_000  # rejection sampling gives up after this many draws per wanted proposal


def smoothed_prior(token_counts: np.ndarray, temperature: float = PRIOR_TEMPERATURE) -> np.ndarray:
    """``p_i ∝ (n_i / Σn)^temperature``: the token shares, flattened by ``temperature < 1`` (RegMix's ``prior**TEMP``)
    so that a domain with few tokens is still proposed often enough to be measured."""
    shares = np.asarray(token_counts, dtype=np.float64)
    shares = shares / shares.sum()
    smoothed = shares**temperature
    return smoothed / smoothed.sum()


def repetition_caps(token_counts: np.ndarray, final_tokens: float, max_repetition: float = MAX_REPETITION) -> np.ndarray:
    """Largest share each domain may take: ``min(1, tokens_i · max_repetition / final_tokens)`` (Olmix's caps): at
    share ``x_i`` the final run reads ``x_i · final_tokens`` tokens of domain ``i``, i.e. ``x_i · final_tokens /
    tokens_i`` epochs of it."""
    counts = np.asarray(token_counts, dtype=np.float64)
    return np.minimum(1.0, counts * max_repetition / float(final_tokens))


def check_caps_feasible(caps: np.ndarray, domains: list[str]) -> None:
    """The caps must leave room for a mixture (``Σ caps ≥ 1``), else no final run of that size avoids repeating some
    domain more than allowed."""
    if caps.sum() < 1.0:
        detail = ", ".join(f"{d} ≤ {c:.3g}" for d, c in zip(domains, caps))
        raise ValueError(
            f"The repetition caps ({detail}) sum to {caps.sum():.3g} < 1: the final run's token budget (final_tokens) "
            "is larger than max_repetition epochs of all the data. Lower final_tokens or raise max_repetition."
        )


def concentrations() -> np.ndarray:
    """RegMix's 15 Dirichlet strengths, log-spaced in ``[0.1, 5]``."""
    return np.logspace(np.log10(MIN_CONCENTRATION), np.log10(MAX_CONCENTRATION), N_CONCENTRATIONS)


def draw_dirichlet(prior: np.ndarray, strengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Dirichlet(prior · s) draw per entry of ``strengths``, ``(len(strengths), k)``, through normalized gamma
    variates (one vectorized call; rows whose gammas all underflow to 0 come back as NaN and are dropped later)."""
    gammas = rng.gamma(prior[None, :] * strengths[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return gammas / gammas.sum(axis=1, keepdims=True)


def admissible(x: np.ndarray, caps: np.ndarray, min_share: float = MIN_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Shares below ``min_share`` zeroed and rows renormalized; returns ``(rows, keep)`` where ``keep`` marks the
    finite rows within the caps (RegMix's rejection step)."""
    x = np.where(x < min_share, 0.0, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = x / x.sum(axis=1, keepdims=True)
    keep = np.isfinite(x).all(axis=1) & (x <= caps[None, :] + 1e-12).all(axis=1)
    return x, keep


def sample_mixtures(prior: np.ndarray, caps: np.ndarray, n: int, rng: np.random.Generator,
                    min_share: float = MIN_SHARE, batch: int = 1) -> np.ndarray:
    """``n`` mixtures ``(n, k)`` drawn from ``rng``: Dirichlet(prior · s), ``s`` uniform over :func:`concentrations`,
    made :func:`admissible`. ``batch = 1`` draws one at a time (the stream is prefix-stable in ``n``); a large batch
    is fast (the simulated candidates of :mod:`.choose`). Raises when the caps reject nearly every draw."""
    strengths = concentrations()
    accepted: list[np.ndarray] = []
    count, drawn = 0, 0
    while count < n and drawn < MAX_DRAWS_PER_PROPOSAL * max(n, 1):
        rows, keep = admissible(draw_dirichlet(prior, strengths[rng.integers(len(strengths), size=batch)], rng),
                                caps, min_share)
        drawn += batch
        if keep.any():
            accepted.append(rows[keep])
            count += int(keep.sum())
    if count < n:
        raise ValueError(
            f"Only {count} of {n} proposals passed the repetition caps {np.round(caps, 4).tolist()}; "
            "the caps are too tight for Dirichlet proposals. Lower final_tokens or raise max_repetition."
        )
    return np.concatenate(accepted)[:n] if accepted else np.zeros((0, prior.size))


def propose(prior: np.ndarray, caps: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The first ``n`` proposals of the stream seeded by ``seed`` (prefix-stable: ``propose(.., 64, s)[:32] ==
    propose(.., 32, s)``, so a study extended to more trials keeps its first proposals)."""
    return sample_mixtures(prior, caps, n, np.random.default_rng(seed))


def as_weights(x: np.ndarray, domains: list[str]) -> dict[str, float]:
    return {d: float(v) for d, v in zip(domains, x)}


def as_vector(weights: Mapping[str, float], domains: list[str]) -> np.ndarray:
    return np.array([float(weights.get(d, 0.0)) for d in domains], dtype=np.float64)
