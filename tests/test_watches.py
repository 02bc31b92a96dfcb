"""Run-time failure watches (issue 23): each warns once, naming what it saw; their state is checkpointed.

- learning progress: a memorizable domain it keeps feeding (:class:`MemorizedDomainWatch`);
- DGA: a step size too small for the run, the mixture does not move (:class:`InertMixtureWatch`);
- resume: a watch that fired before a save stays silent after the load; a watch mid-window resumes the same windows
  (the warning comes at the same step, with the same words, as in an uninterrupted run); a checkpoint written before
  the watches were checkpointed (no ``watch`` entry) loads and the watch starts afresh.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import roundtrip
from test_mixture_defaults import _odm_losses
from test_mixtures import build, stats
from test_sample_strategies import ctx, synthetic_losses

from hfweight.strategies.mixture.base import ConcentratedDomainWatch, MemorizedDomainWatch
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


# ---- learning progress: a memorizable domain it keeps feeding ------------------------------------------------------

LP_NAMES = ["arithmetic", "code", "noise", "prose", "redundant"]  # the built-in corpus's five domains


def _falling(step: int, rng, floor: float, tau: float, noise: float = 0.1) -> float:
    """A training loss falling from ln 1500 ≈ 7.3 (a fresh model) towards ``floor`` with time constant ``tau``."""
    return floor + (7.3 - floor) * np.exp(-step / tau) + rng.normal(0, noise)


def lp_losses(kind: str, step: int, rng) -> tuple[float, ...]:
    """One step's domain losses. ``memorizing``: the built-in corpus as learning progress sees it — an easy clean
    domain (floor 1.2), two hard ones learning slowly (6.0), random characters (7.3, flat) and near-duplicate templates
    learned fast to a floor of 0.8 that stays noisy (the fillers vary), so they keep showing progress.
    ``outright``: the duplicates are exact, memorized to 0.05 and flat. ``ordinary``: clean domains that differ only
    in difficulty (floors 1.5 to 5)."""
    if kind == "ordinary":
        return tuple(_falling(step, rng, floor, 30) for floor in (1.5, 3.0, 4.0, 5.0, 2.5))
    floor, noise, tau = (0.8, 0.15, 25) if kind == "memorizing" else (0.05, 0.01, 10)
    return (_falling(step, rng, 1.2, 15), _falling(step, rng, 6.0, 80), 7.3 + rng.normal(0, 0.1),
            _falling(step, rng, 6.0, 80), _falling(step, rng, floor, tau, noise))


def _lp():
    return build("learning_progress", names=LP_NAMES, sizes=None)


def _lp_step(kind: str):
    def feed(m, step):
        m.observe(stats(step, loss=lp_losses(kind, step, np.random.default_rng(1000 + step)), tokens=(64.0,) * 5))
    return feed


def lp_run(kind: str, seed: int, steps: int):
    """Learning progress (defaults) through ``steps`` synthetic steps: (its warnings with their steps, the share of
    the last domain after every step)."""
    m = _lp()
    rng = np.random.default_rng(seed)
    shares = []

    def run():
        for step in range(steps):
            m.observe(stats(step, loss=lp_losses(kind, step, rng), tokens=(64.0,) * 5))
            shares.append(float(m.probabilities()[4]))
            yield step

    return caught_from("learning_progress:", run), shares


def test_learning_progress_warns_once_when_it_keeps_feeding_a_memorized_domain():
    """Ten noise seeds of the built-in-like sequence: learning progress keeps feeding the near-duplicates in most of
    them (in seed 0 the streak breaks at 75 of the 80 updates: the share dipped below 1.3 × 0.2), and each run that
    shows the signature warns exactly once, naming the domain and what to use instead."""
    warned = 0
    for seed in range(10):
        seen, shares = lp_run("memorizing", seed, 200)
        assert len(seen) <= 1
        if not seen:
            continue
        warned += 1
        step, text = seen[0]
        assert 139 <= step < 200  # not before 3·window + patience − 1 updates
        assert "domain 'redundant'" in text and "for the last 80 updates" in text and "the others' median is" in text
        assert "stratified" in text and "doremi" in text and "static" in text  # what to use instead
        assert np.mean(shares[step - 80:step]) > 1.3 * 0.2  # what it warned about: > 1.3 × its initial share
    assert warned >= 9


@pytest.mark.parametrize("kind", ["ordinary", "outright"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_learning_progress_does_not_warn_on_ordinary_data_or_a_domain_it_drops(kind, seed):
    """Domains that only differ in difficulty; exact duplicates memorized outright, which learning progress feeds
    for a while and then drops (their loss stops falling): no warning."""
    seen, shares = lp_run(kind, seed, 300)
    assert seen == []
    if kind == "outright":
        assert max(shares[:50]) > 0.4 and shares[-1] < 0.1  # it was fed, then dropped


def test_learning_progress_watch_can_be_turned_off():
    m = build("learning_progress", names=LP_NAMES, sizes=None, watch=False)
    rng = np.random.default_rng(0)

    def run():
        for step in range(200):
            m.observe(stats(step, loss=lp_losses("memorizing", step, rng), tokens=(64.0,) * 5))
            yield step

    assert caught_from("learning_progress:", run) == [] and m.state_dict()["watch"] is None


def test_memorized_watch_by_hand():
    """Window 1, patience 2: the signature (lift ≥ 1.5, loss ≤ 0.5 × the others' median, the largest fall) must hold
    on two consecutive updates for the same domain."""
    w = MemorizedDomainWatch(window=1, lift=1.5, ratio=0.5, patience=2)
    initial = torch.full((3,), 1 / 3, dtype=F64)
    probs = torch.tensor([0.2, 0.6, 0.2], dtype=F64)
    rows = [[5.0, 5.0, 5.0], [4.0, 3.0, 4.0], [4.0, 1.0, 4.5], [4.0, 2.5, 4.0], [4.0, 1.0, 4.0], [4.0, 0.9, 4.0]]
    got = [w.observe(step, torch.tensor(r, dtype=F64), probs, initial) for step, r in enumerate(rows)]
    # update 3 (index 2): holds (1.0 ≤ 0.5·4.25); index 3: 2.5 > 0.5·4 breaks it; indices 4, 5 hold twice: fires
    assert got == [None, None, None, None, None, 1]
    assert "'b'" in w.describe(1, "b", probs, initial) and "for the last 2 updates" in w.describe(1, "b", probs, initial)
    assert w.observe(6, torch.tensor([4.0, 0.5, 4.0], dtype=F64), probs, initial) is None  # once
    lifted_less = MemorizedDomainWatch(window=1, lift=2.0, ratio=0.5, patience=2)  # 0.6 < 2 × 1/3: never
    assert all(lifted_less.observe(s, torch.tensor(r, dtype=F64), probs, initial) is None for s, r in enumerate(rows))


# ---- DGA: a mixture that does not move ----------------------------------------------------------------------------


def dga_run(m, updates: int, scale: float, start: int = 0):
    """Feed ``updates`` alignment updates of fixed inner products (scaled by ``scale``); yields the step of each."""
    for u in range(start, start + updates):
        m.observe(stats(u * m.update_every))
        if m.gradients_requested():
            m.observe_gradients(scale * torch.tensor([0.3, -0.1, 0.2], dtype=F64), u * m.update_every)
        yield u * m.update_every


PAPER_DGA = {"normalize": "doge", "prior_pull": 0, "signal_clip": None, "eta": 1e-3}  # the pre-issue-23 default


def test_dga_warns_once_when_eta_is_too_small_for_the_run():
    m = build("dga", update_every=1, **PAPER_DGA)
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
    default = build("dga", update_every=1, normalize="cosine", eta=2.0, prior_pull=0.1, signal_clip=0.2)  # junk setting
    default.set_total_steps(20)
    assert caught_from("dga:", lambda: dga_run(default, 20, 1.0)) == []
    # the same small step over a run 100 times longer moves the mixture: the projection does not warn
    long_run = build("dga", update_every=1, **PAPER_DGA)
    long_run.set_total_steps(2000)
    assert caught_from("dga:", lambda: dga_run(long_run, 20, 1.0)) == []
    off = build("dga", update_every=1, watch=False, **PAPER_DGA)
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


def _only_stuck(m):
    """The stuck-domain sequences also concentrate the data on the stuck domain: without the concentration watch,
    these controllers test the stuck-domain watch alone ("odm_concentrated" tests the other)."""
    m._focus = None
    return m


def _odm():
    return _only_stuck(build("odm", warmup_steps=0))


def _doremi():
    return _only_stuck(build("doremi", eta=0.1))


def _slow_losses(step: int) -> tuple[float, float, float]:
    """Two domains learning fast (7 → 2, 3); the third hardest and learning slowly (8 − 0.02·step): its loss falls
    too much for the stuck-domain watch, and stays the highest."""
    decay = np.exp(-step / 30)
    return (2.0 + 5.0 * decay, 3.0 + 4.0 * decay, 8.0 - 0.02 * step)


def _slow_stats(step):
    return stats(step, loss=_slow_losses(step), excess=(0.4, 0.2, 4.5))


def _stuck_stats(step):
    return stats(step, loss=_odm_losses(step, stuck=True), excess=(0.4, 0.2, 4.5))


def _dga():
    m = build("dga", update_every=1, **PAPER_DGA)
    m.set_total_steps(20)
    return m


def _dga_step(m, step):
    m.observe(stats(step))
    if m.gradients_requested():
        m.observe_gradients(torch.tensor([0.3, -0.1, 0.2], dtype=F64), step)


CONTROLLERS = {  # name -> (fresh controller, feed one step, steps, prefix of its warning)
    "learning_progress": (_lp, _lp_step("memorizing"), 200, "learning_progress:"),
    "odm": (_odm, lambda m, step: m.observe(_stuck_stats(step)), 120, "odm:"),
    "doremi": (_doremi, lambda m, step: m.observe(_stuck_stats(step)), 120, "doremi:"),
    "dga": (_dga, _dga_step, 20, "dga:"),
    "odm_concentrated": (lambda: build("odm", warmup_steps=0), lambda m, step: m.observe(_slow_stats(step)), 120, "odm:"),
    "doremi_concentrated": (lambda: build("doremi", eta=0.1), lambda m, step: m.observe(_slow_stats(step)), 120,
                            "doremi:"),
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
    if name in ("odm", "doremi", "loss"):  # their signature persists in the continuation: without the watch state
        old = roundtrip(first.state_dict())  # (the old behaviour) the resumed run warns a second time
        del old["watch"]
        fresh = make()
        fresh.load_state_dict(old)
        assert len(_warnings(fresh, feed, steps, prefix, start=steps)[1]) == 1


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


# ---- the concentration watch (ODM and DoReMi spending the data on the hardest, unmeasured domain) ------------------


def _concentration_rows(n, share=0.6, hardest=2):
    """``n`` updates of 3 domains: domain 2 gets ``share`` of the data; domain ``hardest`` has the highest loss."""
    loss = torch.tensor([2.0, 2.5, 2.5], dtype=F64)
    loss[hardest] = 4.0
    probs = torch.tensor([(1 - share) / 2, (1 - share) / 2, share], dtype=F64)
    return [(loss, probs)] * n


INITIAL = torch.full((3,), 1 / 3, dtype=F64)


def _fired_at(watch, rows):
    for update, (loss, probs) in enumerate(rows, start=1):
        if watch.observe(update, loss, probs, INITIAL) is not None:
            return update
    return None


def test_concentration_watch_by_hand():
    # ready after 3·window = 6 updates; the signature then holds on every update: fires on the patience-th, once
    w = ConcentratedDomainWatch(window=2, lift=1.5, patience=3)
    assert _fired_at(w, _concentration_rows(20)) == 8
    assert "domain 'x' has got 0.60 of the data (initial 0.33) for the last 3 updates" in w.describe(2, "x", None, INITIAL)
    assert "no per-domain eval_dataset" in w.describe(2, "x", None, INITIAL)
    assert _fired_at(w, _concentration_rows(20)) is None  # once per run
    # not when the user measures that domain, not below the lift, not when another domain is the hardest
    evaluated = ConcentratedDomainWatch(window=2, lift=1.5, patience=3)
    evaluated.evaluated = torch.tensor([False, False, True])
    assert _fired_at(evaluated, _concentration_rows(20)) is None
    assert _fired_at(ConcentratedDomainWatch(window=2, lift=1.5, patience=3), _concentration_rows(20, share=0.49)) is None
    assert _fired_at(ConcentratedDomainWatch(window=2, lift=1.5, patience=3), _concentration_rows(20, hardest=1)) is None
    # an episode shorter than the patience starts the count again
    broken = _concentration_rows(4) + _concentration_rows(1, share=0.4) + _concentration_rows(2)  # held 2, break, 2
    assert _fired_at(ConcentratedDomainWatch(window=1, lift=1.5, patience=3), broken) is None
    assert _fired_at(ConcentratedDomainWatch(window=1, lift=1.5, patience=3), broken + _concentration_rows(1)) == 8
    measured = ConcentratedDomainWatch(window=2, lift=1.5, patience=3)
    measured.evaluated = torch.tensor([True, True, False])
    assert _fired_at(measured, _concentration_rows(20)) == 8
    assert "not one of the domains your eval_dataset measures" in measured.describe(2, "x", None, INITIAL)


@pytest.mark.parametrize("method", ["odm", "doremi"])
def test_odm_and_doremi_warn_once_when_they_concentrate_on_an_unmeasured_hard_domain(method):
    """The slowly learning hard domain: the stuck watch stays silent (its loss falls), the concentration watch warns
    once, naming the domain; not when an eval set measures that domain, nor with watch=False."""
    kwargs = {"warmup_steps": 0} if method == "odm" else {"eta": 0.1}

    def warned(m):
        return caught_from(f"{method}:", lambda: [m.observe(_slow_stats(step)) for step in range(120)])

    seen = [text for _, text in warned(build(method, **kwargs))]
    assert len(seen) == 1 and "domain 'prose' has got" in seen[0] and "because its training loss is the highest" in seen[0]
    assert "does not fall" not in seen[0]
    measured = build(method, **kwargs)
    measured.set_evaluated_domains(["prose", "a set that is not a domain"])
    assert warned(measured) == []
    others = build(method, **kwargs)
    others.set_evaluated_domains(["code", "math"])
    assert len(warned(others)) == 1
    unknown = build(method, **kwargs)
    unknown.set_evaluated_domains(["validation"])  # no training domain: which ones are wanted stays unknown
    assert unknown.evaluated is None and len(warned(unknown)) == 1
    assert warned(build(method, watch=False, **kwargs)) == []


@pytest.mark.parametrize("method", ["odm", "doremi"])
def test_the_stuck_domain_watch_spares_a_domain_the_user_measures(method):
    """The stuck sequence on a domain an eval set measures (a hard domain the user wants, not junk): no warning from
    either watch; measuring only the other domains, both name it."""
    kwargs = {"warmup_steps": 0} if method == "odm" else {"eta": 0.1}

    def warned(m):
        return [text for _, text in caught_from(f"{method}:", lambda: [m.observe(_stuck_stats(s)) for s in range(120)])]

    measured = build(method, **kwargs)
    measured.set_evaluated_domains(["prose"])
    assert warned(measured) == []
    others = build(method, **kwargs)
    others.set_evaluated_domains(["code", "math"])
    seen = warned(others)
    assert len(seen) == 2 and all("domain 'prose'" in text for text in seen)
    assert sum("does not fall" in text for text in seen) == 1
