"""Where a search's study lives, and how a dead worker's trial is found and retried (Optuna storages).

- ``None`` → :class:`optuna.storages.InMemoryStorage` (one process; gone when it ends).
- a file path → :class:`optuna.storages.JournalStorage` over :class:`optuna.storages.journal.JournalFileBackend`: an
  append-only log that several processes on one machine (or on a shared file system with working file locks) may
  write at once.
- a database URL → :class:`optuna.storages.RDBStorage` (PostgreSQL or MySQL for a cluster). ``sqlite:///`` works
  for one process but is not safe for parallel workers (Optuna's documentation): a warning for the main process, an
  error for ``worker=True``.

Dead workers. :class:`~optuna.storages.RDBStorage` has Optuna's heartbeat (``heartbeat_interval``, ``grace_period``):
``study.optimize`` records it while a trial runs, and :func:`optuna.storages.fail_stale_trials` marks a ``RUNNING``
trial whose heartbeat is older than the grace period ``FAIL`` and calls :func:`retry_callback` (Optuna's
``RetryHeartbeatStaleTrialCallback``), which enqueues a copy (same params and attrs; ``max_retry`` copies at most).
The journal storage has no heartbeat in Optuna, so :class:`Store` adds the same mechanism there: a thread writes the
time into a trial system attr every ``heartbeat_interval`` seconds while the objective runs, and
:meth:`Store.fail_stale` fails the trials whose last beat (or start) is older than ``grace_period`` and calls the same
Optuna callback. Clocks of the machines sharing a journal file must agree to well within ``grace_period``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

HEARTBEAT_INTERVAL = 30  # seconds (Optuna's documentation example uses 60 with a 120 s grace period)
GRACE_PERIOD = 120
MAX_RETRY = 3
HEARTBEAT_ATTR = "hfweight:heartbeat"


def require_optuna():
    """Import optuna, or say which extra installs it."""
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The mixture search needs Optuna: pip install 'hfweight[search]'.") from err
    return optuna


def retry_callback(max_retry: int):
    """Optuna's retry of a stale trial (``RetryHeartbeatStaleTrialCallback``, named ``RetryFailedTrialCallback``
    before Optuna 4.9): enqueues a copy of the dead trial, at most ``max_retry`` times per original."""
    optuna = require_optuna()
    callback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if callback is None:  # pragma: no cover - Optuna < 4.9
            return optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
        return callback(max_retry=max_retry)


def is_url(spec: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec) is not None


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (errors and reports must not leak it)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


@dataclass
class Store:
    """An Optuna storage plus the heartbeat and stale-trial handling that go with it."""

    storage: Any
    kind: str  # "memory", "journal" or "rdb"
    spec: str | None
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    max_retry: int = MAX_RETRY
    _retry: Any = field(default=None, repr=False)

    def __post_init__(self):
        self._retry = retry_callback(self.max_retry)

    def describe(self) -> str:
        return {"memory": "in memory", "journal": f"journal file {self.spec}", "rdb": redact(self.spec or "")}[self.kind]

    @contextlib.contextmanager
    def heartbeat(self, trial):
        """While the block runs, beat for ``trial`` (journal storage only: Optuna beats for RDB storages itself)."""
        if self.kind != "journal":
            yield
            return
        stop = threading.Event()
        storage, trial_id = self.storage, trial._trial_id

        def beat():
            while True:
                try:
                    storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
                except Exception:  # the trial was failed by another process (a false stale): stop beating
                    return
                if stop.wait(self.heartbeat_interval):
                    return

        thread = threading.Thread(target=beat, daemon=True, name=f"hfweight-heartbeat-{trial.number}")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def fail_stale(self, study) -> list[int]:
        """Fail the running trials of dead workers and enqueue their retries; returns the failed trial numbers."""
        optuna = require_optuna()
        if self.kind == "rdb":
            before = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            after = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))}
            return sorted(after - before)
        if self.kind != "journal":
            return []
        failed = []
        now = time.time()
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else now
            last = max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), started)
            if now - last <= self.grace_period:
                continue
            try:
                self.storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process failed it first (and retried it)
            self._retry(study, self.storage.get_trial(trial._trial_id))
            failed.append(trial.number)
        return failed


def open_store(spec: str | os.PathLike | None, *, worker: bool = False, heartbeat_interval: int = HEARTBEAT_INTERVAL,
               grace_period: int = GRACE_PERIOD, max_retry: int = MAX_RETRY) -> Store:
    """The :class:`Store` for ``spec`` (see the module docstring). A database that cannot be reached raises
    ``ValueError`` naming the URL (password redacted) before anything is written."""
    optuna = require_optuna()
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive number of seconds (int), got {value!r}.")
    if grace_period <= heartbeat_interval:
        raise ValueError(f"`grace_period` ({grace_period} s) must be longer than `heartbeat_interval` "
                         f"({heartbeat_interval} s), or every running trial looks dead.")
    settings = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period, "max_retry": max_retry}
    if spec is None:
        if worker:
            raise ValueError("A worker needs a shared `storage` (a journal file path or a database URL), not None.")
        return Store(optuna.storages.InMemoryStorage(), "memory", None, **settings)
    spec = os.fspath(spec)
    if not is_url(spec):
        from optuna.storages.journal import JournalFileBackend

        parent = os.path.dirname(os.path.abspath(spec))
        os.makedirs(parent, exist_ok=True)
        return Store(optuna.storages.JournalStorage(JournalFileBackend(spec)), "journal", spec, **settings)
    if spec.startswith("sqlite"):
        message = (f"storage {spec!r}: SQLite is not safe for parallel workers (Optuna's documentation); use a "
                   "journal file path for processes on one machine, or PostgreSQL/MySQL for a cluster.")
        if worker:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    try:
        with warnings.catch_warnings():  # heartbeat_interval is flagged experimental; it is what this module is for
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                spec, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=retry_callback(max_retry),
                engine_kwargs={"pool_pre_ping": True} if not spec.startswith("sqlite") else None,
            )
    except Exception as err:  # sqlalchemy's OperationalError / ArgumentError, a missing driver, ...
        raise ValueError(f"storage {redact(spec)!r} cannot be reached: {type(err).__name__}: "
                         f"{redact(str(err).splitlines()[0] if str(err) else '')}. Check the URL, that the server "
                         "runs and accepts connections, and that its driver is installed (pip install "
                         "'hfweight[search]' brings psycopg, PostgreSQL's driver).") from None
    return Store(storage, "rdb", spec, **settings)
