"""Run-time failure watches (issue 23): each warns once, naming what it saw; their state is checkpointed.

- learning progress: a memorizable domain it keeps feeding (:class:`MemorizedDomainWatch`);
- DGA: a step size too small for the run, the mixture does not move (:class:`InertMixtureWatch`);
- resume: a watch that fired before a save stays silent after the load; a watch mid-window resumes the same windows
  (the warning comes at the same step, with the same words, as in an uninterrupted run); a checkpoint written before
  the watches were checkpointed (no ``watch`` entry) loads and the watch starts afresh.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from test_mixture_defaults import _odm_losses
from test_mixtures import build, stats
from test_sample_strategies import ctx, synthetic_losses

from hfweight.strategies.mixture.dga import InertMixtureWatch
from hfweight.strategies.sample.loss import LossReweighting
from hfweight.strategies.watch import WindowWatch

F64 = torch.float64


def caught_from(prefix: str, run) -> list[tuple[int, str]]:
    """(step, text) of the warnings starting with ``prefix`` emitted while iterating ``run()``, which yields the step
    it has just fed."""
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in run():
            out += [(step, str(w.message)) for w in caught if str(w.message).startswith(prefix)]
            caught.clear()
    return out


def roundtrip(state: dict) -> dict:
    """A state through torch.save/torch.load, as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---- the shared windows -----------------------------------------------------------------------------------------------


def test_window_watch_means_and_state_by_hand():
    w = WindowWatch(window=2)
    rows = [[1.0, float("nan")], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0]]
    ready = [w.record(step, torch.tensor(r, dtype=F64)) for step, r in enumerate(rows)]
    assert ready == [False] * 5 + [True]  # 3·window updates
    early, late = w.means()
    np.testing.assert_allclose(early.numpy(), [2.0, 4.0])  # NaN left out of the mean
    np.testing.assert_allclose(late.numpy(), [10.0, 11.0])
    restored = WindowWatch(window=2)
    restored.load_state_dict(roundtrip(w.state_dict()))
    assert [t.tolist() for t in restored.means()] == [t.tolist() for t in w.means()]
    assert (restored.first_step, restored.last_step, restored.updates) == (0, 5, 6)
    w.fire()
    assert not w.record(6, torch.ones(2, dtype=F64))  # fired: nothing more is recorded


# ---- DGA: a mixture that does not move ----------------------------------------------------------------------------


def dga_run(m, updates: int, scale: float, start: int = 0):
    """Feed ``updates`` alignment updates of fixed inner products (scaled by ``scale``); yields the step of each."""
    for u in range(start, start + updates):
        m.observe(stats(u * m.update_every))
        if m.gradients_requested():
            m.observe_gradients(scale * torch.tensor([0.3, -0.1, 0.2], dtype=F64), u * m.update_every)
        yield u * m.update_every


def test_dga_warns_once_when_eta_is_too_small_for_the_run():
    m = build("dga", update_every=1)  # the default eta 1e-3
    m.set_total_steps(20)  # 20 updates: checked at the 10th
    seen = caught_from("dga:", lambda: dga_run(m, 20, 1.0))
    assert len(seen) == 1
    step, text = seen[0]
    assert step == 9  # the 10th update
    assert "eta=0.001" in text and "after 10 alignment updates" in text and "stratified sampling" in text
    move = float((m.probabilities() * 3 - 1).abs().max())
    assert move < 0.05  # what it said: the mixture did not move


def test_dga_watch_projects_over_the_run_and_stays_quiet_when_the_mixture_moves():
    moving = build("dga", update_every=1, eta=0.5)
    moving.set_total_steps(20)
    assert caught_from("dga:", lambda: dga_run(moving, 20, 1.0)) == []
    # the same small step over a run 100 times longer moves the mixture: the projection does not warn
    long_run = build("dga", update_every=1)
    long_run.set_total_steps(2000)
    assert caught_from("dga:", lambda: dga_run(long_run, 20, 1.0)) == []
    off = build("dga", update_every=1, watch=False)
    off.set_total_steps(20)
    assert caught_from("dga:", lambda: dga_run(off, 20, 1.0)) == []


def test_inert_watch_by_hand():
    w = InertMixtureWatch(after=3, min_move=0.05)
    initial = torch.tensor([0.5, 0.5], dtype=F64)
    probs = torch.tensor([0.51, 0.49], dtype=F64)  # moved 2% in 3 updates
    assert w.observe(probs, initial, total_updates=6) is None
    assert w.observe(probs, initial, total_updates=6) is None
    seen = w.observe(probs, initial, total_updates=6)  # projected 2% × 6/3 = 4% < 5%
    assert seen["domain"] == 0 and seen["move"] == pytest.approx(0.02) and seen["projected"] == pytest.approx(0.04)
    assert w.observe(probs, initial, total_updates=6) is None  # checked once
    w = InertMixtureWatch(after=3, min_move=0.05)
    for _ in range(3):
        seen = w.observe(probs, initial, total_updates=9)  # projected 6%: it moves enough over the run
    assert seen is None and w.done


# ---- resume: the watches are part of the state --------------------------------------------------------------------


def _odm():
    return build("odm", warmup_steps=0)


def _doremi():
    return build("doremi", eta=0.1)


def _stuck_stats(step):
    return stats(step, loss=_odm_losses(step, stuck=True), excess=(0.4, 0.2, 4.5))


def _dga():
    m = build("dga", update_every=1)
    m.set_total_steps(20)
    return m


def _dga_step(m, step):
    m.observe(stats(step))
    if m.gradients_requested():
        m.observe_gradients(torch.tensor([0.3, -0.1, 0.2], dtype=F64), step)


CONTROLLERS = {  # name -> (fresh controller, feed one step, steps, prefix of its warning)
    "odm": (_odm, lambda m, step: m.observe(_stuck_stats(step)), 120, "odm:"),
    "doremi": (_doremi, lambda m, step: m.observe(_stuck_stats(step)), 120, "doremi:"),
    "dga": (_dga, _dga_step, 20, "dga:"),
    "loss": (LossReweighting, lambda m, step: m.weights(ctx(synthetic_losses(step, noisy=True), step=step)), 60,
             "sample_weighting='loss':"),
}


def _warnings(m, feed, steps, prefix, start=0):
    """Feed ``m`` the steps ``start .. start + steps − 1``; (m, its warnings with their steps)."""

    def run():
        for step in range(start, start + steps):
            feed(m, step)
            yield step

    return m, caught_from(prefix, run)


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_a_watch_that_fired_before_a_save_is_silent_after_the_load(name):
    make, feed, steps, prefix = CONTROLLERS[name]
    first, seen = _warnings(make(), feed, steps, prefix)
    assert len(seen) == 1  # the sequence shows the signature: it fired once
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    _, again = _warnings(resumed, feed, steps, prefix, start=steps)
    assert again == []
    fresh = make()  # without the watch state (the old behaviour) the same continuation warns again
    old = roundtrip(first.state_dict())
    del old["watch"]
    fresh.load_state_dict(old)
    _, afresh = _warnings(fresh, feed, steps, prefix, start=steps)
    assert len(afresh) == 1 or name == "dga"  # DGA's check comes once at its 10th update: the continuation is past it


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_a_watch_mid_window_resumes_the_same_windows(name):
    """Save after a third of the steps (inside the windows), load into a fresh controller, continue: the warning comes
    at the same step with the same words as in the uninterrupted run."""
    make, feed, steps, prefix = CONTROLLERS[name]
    _, straight = _warnings(make(), feed, steps, prefix)
    assert len(straight) == 1
    cut = min(straight[0][0] // 2, steps // 3)
    first, before = _warnings(make(), feed, cut, prefix)
    assert before == []
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    _, after = _warnings(resumed, feed, steps - cut, prefix, start=cut)
    assert after == straight


@pytest.mark.parametrize("name", sorted(CONTROLLERS))
def test_an_older_checkpoint_without_watch_state_loads_and_watches_afresh(name):
    make, feed, steps, prefix = CONTROLLERS[name]
    first, _ = _warnings(make(), feed, 5, prefix)
    old = roundtrip(first.state_dict())
    del old["watch"]
    resumed = make()
    resumed.load_state_dict(old)
    watch = resumed.watch if name == "loss" else resumed._watch
    assert watch.updates == 0 and not getattr(watch, "fired", False) and not getattr(watch, "done", False)


def test_state_without_a_watch():
    assert LossReweighting(watch=False).state_dict() == {"previous_range": None, "watch": None}
    off = build("odm", warmup_steps=0, watch=False)
    assert off.state_dict()["watch"] is None
    on = build("odm", warmup_steps=0)
    off.load_state_dict(on.state_dict())  # a watched run's checkpoint into an unwatched run: ignored
    assert off._watch is None
