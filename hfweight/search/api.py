"""``search_mixture``: choose a static domain mixture from small proxy runs (RegMix / Data Mixing Laws / Olmix), with
Optuna as the store, scheduler and record of the proxies. How it works: ``docs/search.md``."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import choose as choose_mod
from . import proposals as prop
from .fit import FitResult, select_model
from .proxy import domain_token_counts, named_eval_sets, proxy_budget_tokens, train_proxy
from .report import plot_report, report_paths, write_json
from .storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, MAX_RETRY, open_store
from .workers import (
    IMPORT_ATTR,
    LOSSES_ATTR,
    META_ATTR,
    WORKER_ATTR,
    check_study_meta,
    completed,
    enqueue_proposals,
    import_results,
    load_study,
    make_objective,
    proposal_index,
    run_trials,
    write_results_table,
)

DEFAULT_STUDY = "mixture_search"
WEAK_RANKING = 0.5  # out-of-fold Spearman below which the search warns that its fit is not to be trusted


@dataclass
class SearchPlan:
    """Everything checked and computed before any storage is touched."""

    domains: list[str]
    token_counts: dict[str, float]
    prior: np.ndarray
    caps: np.ndarray
    proxy_tokens: float
    final_tokens: float
    eval_sets: dict
    targets: list[str]
    proposals: np.ndarray
    proposal_seconds: float

    def meta(self, seed: int) -> dict:
        return {"domains": self.domains, "targets": self.targets, "seed": seed,
                "prior": self.prior.tolist(), "caps": self.caps.tolist(), "final_tokens": self.final_tokens}


def plan_search(args, train_dataset, eval_dataset, target, n_trials: int, seed: int, *, domains=None,
                final_tokens: float | None = None, max_repetition: float = prop.MAX_REPETITION) -> SearchPlan:
    """Check the inputs (clear errors, nothing written) and draw the proposals."""
    from ..config import WeightedTrainingArguments

    if not isinstance(args, WeightedTrainingArguments):
        raise TypeError(f"args must be a WeightedTrainingArguments describing one proxy run, got {type(args).__name__}.")
    column = args.domain_column
    token_counts = domain_token_counts(train_dataset, column, domains)
    names = list(token_counts)
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < len(names) + 1:
        raise ValueError(f"n_trials={n_trials!r} is below the number of domains + 1 ({len(names)} + 1 = "
                         f"{len(names) + 1}): the mixing law has one parameter per domain plus a constant, so fewer "
                         "proxies cannot determine it. RegMix and Olmix use many more (Olmix: ~linear in domains).")
    if not (isinstance(max_repetition, int | float) and max_repetition > 0):
        raise ValueError(f"max_repetition must be a positive number of epochs, got {max_repetition!r}.")
    eval_sets, targets = named_eval_sets(eval_dataset, column, target)
    counts = np.array([token_counts[d] for d in names])
    proxy_tokens = proxy_budget_tokens(args, token_counts, len(train_dataset))
    if final_tokens is None:
        final_tokens = prop.FINAL_TOKENS_FACTOR * proxy_tokens
    elif not (isinstance(final_tokens, int | float) and final_tokens > 0):
        raise ValueError(f"final_tokens must be a positive token count, got {final_tokens!r}.")
    prior = prop.smoothed_prior(counts)
    caps = prop.repetition_caps(counts, final_tokens, max_repetition)
    prop.check_caps_feasible(caps, names)
    started = time.perf_counter()
    proposals = prop.propose(prior, caps, n_trials, seed)
    return SearchPlan(names, token_counts, prior, caps, proxy_tokens, float(final_tokens), eval_sets, targets,
                      proposals, time.perf_counter() - started)


@dataclass
class SearchResult:
    """The searched mixture. ``weights``: ``{domain: share}`` summing to 1; ``report``: everything the search measured
    and fitted (see ``docs/search.md``); ``study``: the Optuna study (one trial per proxy)."""

    weights: dict[str, float]
    report: dict
    study: Any = field(repr=False)
    fit: FitResult | None = field(default=None, repr=False)

    def save(self, path: str) -> dict[str, str]:
        """Write ``path`` (``{"weights": {...}, ...}``: ``mixture="static"`` reads it with
        ``mixture_kwargs={"weights": path}``) and, beside it, ``<stem>_report.json``, ``<stem>_report.png`` and
        ``<stem>_proxies.csv``. Returns the paths written."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        paths = report_paths(path)
        write_json(path, {"weights": self.weights, "targets": self.report["targets"],
                          "predicted_target_loss": self.report["predicted_target_loss"],
                          "method": "hfweight.search_mixture", "report": os.path.basename(paths["json"])})
        write_json(paths["json"], self.report)
        proxies = self.report["proxies"]
        write_results_table(paths["csv"], np.array([[p["weights"][d] for d in self.weights] for p in proxies]),
                            [p["eval_losses"] for p in proxies], list(self.weights))
        written = {"weights": path, "json": paths["json"], "csv": paths["csv"]}
        if plot_report(self.report, paths["png"]):
            written["png"] = paths["png"]
        return written


def search_mixture(
    model_init: Callable[[], Any],
    args,
    train_dataset,
    eval_dataset,
    target: str | Sequence[str] | None = None,
    n_trials: int = 32,
    storage: str | os.PathLike | None = None,
    seed: int = 0,
    data_collator=None,
    processing_class=None,
    *,
    study_name: str = DEFAULT_STUDY,
    domains: Sequence[str] | None = None,
    final_tokens: float | None = None,
    max_repetition: float = prop.MAX_REPETITION,
    top_k: int = choose_mod.TOP_K,
    n_candidates: int = choose_mod.N_CANDIDATES,
    kl_weight: float = choose_mod.KL_WEIGHT,
    import_from: str | os.PathLike | None = None,
    run: bool = True,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    max_retry: int = MAX_RETRY,
) -> SearchResult | None:
    """Search a static domain mixture from small proxy runs and return it (see ``docs/search.md``).

    Each of ``n_trials`` proposals (RegMix's capped Dirichlet draws around the smoothed token shares) is one Optuna
    trial: a fresh ``model_init()`` trained with :class:`~hfweight.WeightedTrainer` on ``args`` with
    ``mixture="static"`` (resample mode) at the proposal's shares, then evaluated on every set of ``eval_dataset``.
    A log-linear mixing law and LightGBM are fitted to the proxies, the one ranking them better out of fold is
    used, and the mean of the best ``top_k`` of ``n_candidates`` simulated mixtures (scored by prediction plus
    ``kl_weight · KL(x ‖ prior)``, all within the repetition caps) is returned.

    Args:
        model_init: zero-argument callable returning a fresh proxy model (as ``Trainer.hyperparameter_search``).
        args: :class:`~hfweight.WeightedTrainingArguments` of one proxy run (``max_steps``, batch, optimizer); its
            mixture fields are replaced per trial; proxies write to ``<output_dir>/trial_<n>``, no checkpoints.
        train_dataset: map-style dataset with the domain column ``args.domain_column``.
        eval_dataset: a dataset or a dict of named datasets.
        target: eval names (or domains of the eval data) whose mean loss the mixture should minimize; default all.
        n_trials: number of proposals (≥ number of domains + 1). A larger value on an existing study adds the next
            proposals of the same stream; a smaller one fits the first ``n_trials`` only (nothing is trained).
        storage: ``None`` (in memory), a journal file path, or a database URL (PostgreSQL for a cluster).
        seed: seed of the proposals, the fits' folds and the simulated candidates (proxies use ``args.seed``).
        study_name: the Optuna study; rerunning with the same storage and name resumes it.
        domains: the domains to mix (default: every value of the domain column); each must have rows.
        final_tokens: the final run's token budget, for the repetition caps (default: 10 × one proxy's budget).
        max_repetition: most epochs of any domain the final run may read (default 4).
        import_from: a results table (CSV: one share column per domain, one loss column per eval name) of proxies
            trained elsewhere, added as complete trials.
        run: False only creates the study and enqueues the proposals (workers then train them); returns None.
        heartbeat_interval, grace_period, max_retry: dead-worker detection and retries (seconds, seconds, count).
    """
    plan = plan_search(args, train_dataset, eval_dataset, target, n_trials, seed, domains=domains,
                       final_tokens=final_tokens, max_repetition=max_repetition)
    store = open_store(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period, max_retry=max_retry)
    study = load_study(store, study_name, create=True)
    check_study_meta(study, plan.meta(seed))
    if import_from is not None:
        import_results(study, os.fspath(import_from), plan.domains, plan.targets)
    enqueue_proposals(study, plan.proposals, plan.domains)
    if not run:
        return None

    def train(weights: dict[str, float], number: int) -> dict[str, float]:
        return train_proxy(weights, model_init=model_init, args=args, train_dataset=train_dataset,
                           eval_sets=plan.eval_sets, data_collator=data_collator, processing_class=processing_class,
                           run_name=f"trial_{number}")

    run_trials(study, store, make_objective(store, plan.domains, plan.targets, train))
    return fit_and_choose(study, store, plan, seed, top_k=top_k, n_candidates=n_candidates, kl_weight=kl_weight,
                          study_name=study_name)


def fit_and_choose(study, store, plan: SearchPlan, seed: int, *, top_k: int, n_candidates: int, kl_weight: float,
                   study_name: str) -> SearchResult:
    """Fit the finished proxies, choose the mixture, assemble the report."""
    X, Y, trials = completed(study, plan.domains, plan.targets, len(plan.proposals))
    k = len(plan.domains)
    if len(X) < k + 1:
        raise RuntimeError(f"Only {len(X)} proxies of study {study_name!r} finished with every target measured; the "
                           f"fit needs at least {k + 1}. Rerun to retry the failed ones (see the study's FAIL trials).")
    started = time.perf_counter()
    fit = select_model(X, Y, seed)
    choice = choose_mod.choose_mixture(fit.predict, plan.prior, plan.caps, seed, n_candidates=n_candidates,
                                       top_k=top_k, kl_weight=kl_weight)
    search_seconds = time.perf_counter() - started + plan.proposal_seconds
    notes = []
    rho = fit.spearman[fit.chosen]
    if not rho >= WEAK_RANKING:  # NaN too
        notes.append(f"The best fit ({fit.chosen}) ranks the proxies poorly out of fold (Spearman {rho:.2f} < "
                     f"{WEAK_RANKING}): the proxies differ by little more than noise. Train more or longer proxies "
                     "before trusting the mixture (it is pulled toward the prior only by the KL term).")
        warnings.warn(notes[-1], stacklevel=3)
    weights = {d: float(v) for d, v in zip(plan.domains, choice.weights)}
    target_loss = Y.mean(axis=1)
    proxies = [{
        "trial": t.number, "proposal": proposal_index(t), "weights": {d: float(v) for d, v in zip(plan.domains, x)},
        "eval_losses": t.user_attrs.get(LOSSES_ATTR), "target_loss": float(loss),
        "seconds": t.user_attrs.get("seconds"), "worker": t.user_attrs.get(WORKER_ATTR),
        "imported": t.user_attrs.get(IMPORT_ATTR) is not None,
    } for t, x, loss in zip(trials, X, target_loss)]
    proxy_seconds = float(sum(p["seconds"] or 0.0 for p in proxies))
    best = int(np.argmin(target_loss))
    report = {
        "method": "RegMix proposals + {log-linear law, LightGBM} chosen by out-of-fold Spearman + top-k mean with "
                  "KL-to-prior and repetition caps (docs/search.md)",
        "study": study_name, "storage": store.describe(), "seed": seed,
        "domains": plan.domains, "targets": plan.targets,
        "weights": weights, "predicted_target_loss": choice.predicted, "kl_to_prior": choice.kl_to_prior,
        "prior": {d: float(v) for d, v in zip(plan.domains, plan.prior)},
        "token_counts": plan.token_counts,
        "caps": {d: float(v) for d, v in zip(plan.domains, plan.caps)},
        "proxy_tokens": plan.proxy_tokens, "final_tokens": plan.final_tokens,
        "settings": {"n_trials": len(plan.proposals), "top_k": top_k, "n_candidates": n_candidates,
                     "kl_weight": kl_weight, "prior_temperature": prop.PRIOR_TEMPERATURE},
        "fit": {"chosen": fit.chosen, "spearman": fit.spearman, "out_of_fold": fit.out_of_fold,
                "in_sample": fit.in_sample},
        "best_proxy": {"trial": proxies[best]["trial"], "weights": proxies[best]["weights"],
                       "target_loss": proxies[best]["target_loss"]},
        "proxies": proxies, "notes": notes,
        "timing": {"proxy_seconds": proxy_seconds, "search_seconds": search_seconds,
                   "search_overhead": search_seconds / proxy_seconds if proxy_seconds > 0 else None},
    }
    return SearchResult(weights=weights, report=report, study=study, fit=fit)


def run_worker(model_init: Callable[[], Any], args, train_dataset, eval_dataset, storage, study_name: str = DEFAULT_STUDY,
               data_collator=None, processing_class=None, *, heartbeat_interval: int = HEARTBEAT_INTERVAL,
               grace_period: int = GRACE_PERIOD, max_retry: int = MAX_RETRY) -> int:
    """Pull and train proxies of an existing study until none is waiting or running (no fit); returns how many this
    process trained. The study (made by :func:`search_mixture`) says which domains and targets it wants."""
    store = open_store(storage, worker=True, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                       max_retry=max_retry)
    study = load_study(store, study_name, create=False)
    meta = study.user_attrs.get(META_ATTR) or {}
    token_counts = domain_token_counts(train_dataset, args.domain_column, meta.get("domains"))
    eval_sets, targets = named_eval_sets(eval_dataset, args.domain_column, meta.get("targets"))

    def train(weights: dict[str, float], number: int) -> dict[str, float]:
        return train_proxy(weights, model_init=model_init, args=args, train_dataset=train_dataset,
                           eval_sets=eval_sets, data_collator=data_collator, processing_class=processing_class,
                           run_name=f"trial_{number}")

    return run_trials(study, store, make_objective(store, list(token_counts), targets, train))
