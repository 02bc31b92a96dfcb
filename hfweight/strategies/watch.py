"""The shared machinery of the run-time failure watches (issue 23: warn once, naming what was seen).

A method whose principle fails on some data (ODM and DoReMi feeding a domain nobody can learn, learning progress
chasing a memorizable domain, loss-upweighting on noisy samples) watches for that failure's *signature* in the
statistics it already sees and warns the first time the signature holds. Every such watch compares the same two
windows of per-update rows: the mean of the **first** ``window`` watched updates and the mean of the **last**
``window``, once ``3·window`` updates were seen (so the two windows are at least ``window`` updates apart). What it
compares differs (:class:`~hfweight.strategies.mixture.base.StuckDomainWatch`,
:class:`~hfweight.strategies.mixture.base.MemorizedDomainWatch`,
:class:`~hfweight.strategies.sample.loss.StuckTailWatch`); the windows, the once-per-run flag and the checkpointed
state are :class:`WindowWatch`.

The state (:meth:`WindowWatch.state_dict`) is part of each controller's checkpoint, so a resumed run continues the
same windows and a watch that fired before the save stays silent after it. A checkpoint written before the watches
were checkpointed has no watch state: the watch then starts afresh (:func:`load_watch_state`).
"""

from __future__ import annotations

from collections import deque

import torch

F64 = torch.float64


class WindowWatch:
    """Early and late windows of per-update rows (float64 vectors, NaN = not seen in that update), fired once.

    Subclasses call :meth:`record` with each update's row and, when it returns True, test their signature on
    :meth:`means` and call :meth:`fire` when it holds.
    """

    def __init__(self, window: int = 10):
        self.window = int(window)
        self.early: list[torch.Tensor] = []
        self.late: deque[torch.Tensor] = deque(maxlen=self.window)
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.updates = 0
        self.fired = False

    def record(self, step: int, row: torch.Tensor) -> bool:
        """Add one update's row; True when the windows are ready to compare (``≥ 3·window`` updates, not fired)."""
        if self.fired:
            return False
        row = torch.as_tensor(row, dtype=F64).flatten().clone()
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step
        self.updates += 1
        if len(self.early) < self.window:
            self.early.append(row)
        self.late.append(row)
        return self.updates >= 3 * self.window

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The NaN-ignoring means of the early and the late window (NaN where an entry was never seen)."""
        return tuple(torch.stack(list(rows)).nanmean(0) for rows in (self.early, self.late))

    def fire(self) -> None:
        self.fired = True

    def state_dict(self) -> dict:
        return {
            "early": [row.clone() for row in self.early],
            "late": [row.clone() for row in self.late],
            "first_step": self.first_step,
            "last_step": self.last_step,
            "updates": self.updates,
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict) -> None:
        self.early = [torch.as_tensor(row, dtype=F64).clone() for row in state["early"]][: self.window]
        self.late = deque((torch.as_tensor(row, dtype=F64).clone() for row in state["late"]), maxlen=self.window)
        self.first_step, self.last_step = state["first_step"], state["last_step"]
        self.updates, self.fired = int(state["updates"]), bool(state["fired"])


class StreakWatch(WindowWatch):
    """A window watch whose signature must hold for ``patience`` consecutive updates on the same domain before it
    fires (a transient episode does not count): :meth:`streak` keeps the count, the state saves it."""

    def __init__(self, window: int, patience: int):
        super().__init__(window)
        self.patience = patience
        self.held, self.domain = 0, None

    def streak(self, holds: bool, d: int) -> bool:
        """Count one update (the signature ``holds`` on domain ``d``, or not); True, once, when the count reaches
        ``patience``."""
        self.held = self.held + 1 if holds and d == self.domain else int(holds)
        self.domain = d if holds else None
        if self.held >= self.patience:
            self.fire()
            return True
        return False

    def state_dict(self) -> dict:
        return {**super().state_dict(), "held": self.held, "domain": self.domain}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.held, self.domain = int(state["held"]), state["domain"]


def watch_state(watch) -> dict | None:
    """The state of an optional watch (``None``: watching is off) for a controller's ``state_dict``."""
    return None if watch is None else watch.state_dict()


def load_watch_state(watch, state: dict, key: str = "watch") -> None:
    """Restore an optional watch from a controller's saved ``state``. A state without ``key`` (a checkpoint written
    before the watches were checkpointed, or by a run with the watch off) leaves the watch as it is: fresh."""
    saved = state.get(key)
    if watch is not None and saved is not None:
        watch.load_state_dict(saved)
