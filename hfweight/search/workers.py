"""The study: proposals enqueued as Optuna trials, workers that pull and train them, finished results read back.

One proxy = one Optuna trial. The main process (``search_mixture`` / ``hfweight search-mixture``) creates or loads
the study, checks it was made for the same domains and targets, and enqueues the proposals that are not already
waiting, running or complete (``study.enqueue_trial`` with the domain shares as params and the proposal's index as the
user attr ``proposal``); so rerunning the same command resumes and never retrains a finished proxy, and a larger
``n_trials`` extends the study with the next proposals of the same seeded stream. Workers (the main process too) loop:
fail the trials of dead workers (their retries are enqueued), pop a waiting trial with ``study.optimize(n_trials=1)``,
train it, record ``value`` = mean target loss and the user attr ``eval_losses`` = ``{eval name: loss}``; when nothing
waits but trials still run elsewhere, wait for them (one may die and come back as a retry).

Only the main process enqueues: two processes enqueuing at once could both add a proposal. A trial popped when the
queue had just emptied (Optuna then samples a fresh trial instead) is pruned at once without training.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .storage import Store, require_optuna

META_ATTR = "hfweight_search"
PROPOSAL_ATTR = "proposal"
LOSSES_ATTR = "eval_losses"
WORKER_ATTR = "hfweight:worker"
IMPORT_ATTR = "imported_from"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def check_study_meta(study, meta: Mapping) -> None:
    """Store the search's identity (domains, targets, proposal seed) on a new study; on an existing one, refuse a
    mismatch (its trials were proposed for other data and cannot be mixed with these)."""
    stored = study.user_attrs.get(META_ATTR)
    if stored is None:
        study.set_user_attr(META_ATTR, dict(meta))
        return
    for key in ("domains", "targets", "seed"):
        if stored.get(key) != meta.get(key):
            raise ValueError(
                f"Study {study.study_name!r} was created with {key}={stored.get(key)!r}, this search has "
                f"{key}={meta.get(key)!r}. Use another --study name (or storage) for a different search."
            )


def load_study(store: Store, study_name: str, *, create: bool):
    """The study ``study_name`` in ``store`` (created when ``create``; a worker only loads)."""
    optuna = require_optuna()
    sampler = optuna.samplers.RandomSampler(seed=0)  # never used for a proposal: only enqueued trials train
    if create:
        return optuna.create_study(storage=store.storage, study_name=study_name, direction="minimize",
                                   sampler=sampler, load_if_exists=True)
    try:
        return optuna.load_study(study_name=study_name, storage=store.storage, sampler=sampler)
    except KeyError:
        raise ValueError(f"No study {study_name!r} in {store.describe()}: start the main search (without --worker) "
                         "first; it creates the study and enqueues the proposals.") from None


def proposal_index(trial) -> int | None:
    value = trial.user_attrs.get(PROPOSAL_ATTR)
    return None if value is None else int(value)


def enqueue_proposals(study, proposals: np.ndarray, domains: list[str]) -> list[int]:
    """Enqueue every proposal that has no waiting, running or complete trial yet; returns the indices enqueued."""
    optuna = require_optuna()
    live = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE)
    present = {proposal_index(t) for t in study.get_trials(deepcopy=False, states=live)}
    added = []
    for i, x in enumerate(proposals):
        if i not in present:
            study.enqueue_trial({d: float(v) for d, v in zip(domains, x)}, user_attrs={PROPOSAL_ATTR: i})
            added.append(i)
    return added


def make_objective(store: Store, domains: list[str], targets: list[str],
                   train: Callable[[dict[str, float], int], dict[str, float]]):
    """The Optuna objective: read the trial's shares (its enqueued params), train, record the eval losses."""
    optuna = require_optuna()

    def objective(trial) -> float:
        if PROPOSAL_ATTR not in trial.user_attrs:  # sampled because the queue emptied under us: not a proposal
            raise optuna.TrialPruned("no proposal left to run")
        weights = {d: trial.suggest_float(d, 0.0, 1.0) for d in domains}
        trial.set_user_attr(WORKER_ATTR, worker_id())
        started = time.perf_counter()
        with store.heartbeat(trial):
            losses = train(weights, trial.number)
        trial.set_user_attr(LOSSES_ATTR, losses)
        trial.set_user_attr("seconds", time.perf_counter() - started)
        return float(np.mean([losses[t] for t in targets]))

    return objective


def run_trials(study, store: Store, objective, *, wait: bool = True, poll_seconds: float = 1.0,
               max_trials: int | None = None) -> int:
    """Pull and run waiting trials until none is left (and, with ``wait``, none runs elsewhere); returns how many
    this process ran."""
    optuna = require_optuna()
    states = optuna.trial.TrialState
    ran = 0
    while max_trials is None or ran < max_trials:
        store.fail_stale(study)
        current = {t.state for t in study.get_trials(deepcopy=False, states=(states.WAITING, states.RUNNING))}
        if states.WAITING in current:
            study.optimize(objective, n_trials=1, gc_after_trial=False, show_progress_bar=False)
            ran += 1
        elif states.RUNNING in current and wait:
            time.sleep(poll_seconds)
        else:
            break
    return ran


def completed(study, domains: list[str], targets: list[str], n_proposals: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, list]:
    """``(X (n, k) shares, Y (n, m) target losses, trials)`` of the complete trials that measured every target:
    imported ones and proposals ``0 .. n_proposals - 1`` (all with None), so a search with ``n_trials = 16`` on a
    study that holds 32 uses the first 16, as if it had run alone."""
    optuna = require_optuna()
    rows, losses, trials = [], [], []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        index = proposal_index(trial)
        if n_proposals is not None and index is not None and index >= n_proposals:
            continue
        measured = trial.user_attrs.get(LOSSES_ATTR) or {}
        if not all(d in trial.params for d in domains) or not all(t in measured for t in targets):
            continue
        x = np.array([trial.params[d] for d in domains], dtype=np.float64)
        rows.append(x / x.sum())
        losses.append([float(measured[t]) for t in targets])
        trials.append(trial)
    k, m = len(domains), len(targets)
    return (np.array(rows).reshape(-1, k), np.array(losses).reshape(-1, m), trials)


def read_results_table(path: str, domains: list[str], targets: Sequence[str]) -> list[tuple[dict, dict]]:
    """Rows of a results table (CSV: one column per domain holding its share, one per eval name holding its loss;
    other columns ignored) as ``[(shares, losses)]``. Every check runs before anything is imported; errors name the
    file, the row and the column."""
    if not os.path.exists(path):
        raise ValueError(f"--import {path!r}: no such file.")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in list(domains) + list(targets) if c not in columns]
        if missing:
            raise ValueError(f"--import {path!r} has no column(s) {missing}; it needs one column per domain "
                             f"{domains} (shares) and per target {list(targets)} (losses). Its columns: {columns}.")
        loss_columns = [c for c in columns if c not in domains]
        out = []
        for row_number, row in enumerate(reader, start=2):  # row 1 is the header
            values = {}
            for column in list(domains) + list(targets):
                try:
                    values[column] = float(row[column])
                except (TypeError, ValueError):
                    raise ValueError(f"--import {path!r} row {row_number} column {column!r}: {row[column]!r} is not "
                                     "a number.") from None
                if not math.isfinite(values[column]) or (column in domains and values[column] < 0):
                    raise ValueError(f"--import {path!r} row {row_number} column {column!r}: {values[column]} must be "
                                     "finite" + (" and ≥ 0." if column in domains else "."))
            total = sum(values[d] for d in domains)
            if total <= 0:
                raise ValueError(f"--import {path!r} row {row_number}: every domain share is 0.")
            shares = {d: values[d] / total for d in domains}
            losses = {c: float(row[c]) for c in loss_columns if _is_number(row.get(c))}
            out.append((shares, losses))
    return out


def _is_number(text) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def import_results(study, path: str, domains: list[str], targets: list[str]) -> int:
    """Add the rows of a results table as complete trials (user attr ``imported_from``); a row already imported
    (same file name and row content) is skipped, so importing twice adds nothing. Returns the number added."""
    optuna = require_optuna()
    rows = read_results_table(path, domains, targets)
    seen = {t.user_attrs.get(IMPORT_ATTR) for t in study.get_trials(deepcopy=False)}
    distributions = {d: optuna.distributions.FloatDistribution(0.0, 1.0) for d in domains}
    added = 0
    for shares, losses in rows:
        key = f"{os.path.basename(path)}:{sorted(shares.items())}:{sorted(losses.items())}"
        if key in seen:
            continue
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, params=shares, distributions=distributions,
            value=float(np.mean([losses[t] for t in targets])),
            user_attrs={LOSSES_ATTR: losses, IMPORT_ATTR: key},
        ))
        seen.add(key)
        added += 1
    return added


def write_results_table(path: str, X: np.ndarray, Y_by_name: list[dict], domains: list[str]) -> None:
    """The proxies as a results table :func:`import_results` reads back (shares, then every eval loss)."""
    names = sorted({name for losses in Y_by_name for name in losses})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(domains) + names)
        for x, losses in zip(X, Y_by_name):
            writer.writerow([f"{v:.6g}" for v in x] + [f"{losses.get(n, float('nan')):.6g}" for n in names])
