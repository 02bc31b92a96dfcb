"""Offline mixture search: train small proxies on sampled mixtures, fit how the target loss depends on the mixture,
return the predicted-best static mixture (RegMix; Data Mixing Laws; Olmix). Optuna stores, schedules and records the
proxies (``pip install 'hfweight[search]'``). How it works: ``docs/search.md``.

Modules: :mod:`.proposals` (which mixtures the proxies train on), :mod:`.proxy` (one proxy run; data checks),
:mod:`.fit` (log-linear law and LightGBM, chosen by out-of-fold Spearman), :mod:`.choose` (top-k of simulated
mixtures with a KL-to-prior term and repetition caps), :mod:`.storage` and :mod:`.workers` (Optuna), :mod:`.report`,
:mod:`.cli` (``hfweight search-mixture``, ``python -m hfweight.search``).
"""

from .api import SearchResult, run_worker, search_mixture

__all__ = ["SearchResult", "run_worker", "search_mixture"]
