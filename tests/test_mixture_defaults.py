"""Defaults that must act within the run (issue 15): ODM's warm-up scales with the run length or warns; Aioli's probe
share is a bounded knob whose derived cadence fits short runs; held-out sets covering only some domains."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_mixtures import build, close, stats

from hfweight.strategies.mixture.aioli import AioliMixture

# ---- ODM warm-up ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total,warmup", [(200, 20), (50_000, 2000), (None, 2000)])
def test_odm_default_warmup_fits_the_run(total, warmup):
    m = build("odm")
    if total is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m.set_total_steps(total)
    assert m.warmup_steps == warmup
    for step in range(warmup):  # observe(step) completes step + 1: no update through t = warmup
        m.observe(stats(step, loss=(1.0, 2.0, 9.0)))
    close(m.probabilities(), [1 / 3] * 3)
    m.observe(stats(warmup, loss=(1.0, 2.0, 9.0)))
    assert m.probabilities()[2] > 1 / 3  # the first update, right after the warm-up


def test_odm_given_warmup_that_outlasts_the_run_warns_with_the_steps():
    m = build("odm", warmup_steps=2000)
    with pytest.warns(UserWarning, match=r"warmup_steps=2000 but the run has 200 optimizer steps.*= 20\)"):
        m.set_total_steps(200)
    assert m.warmup_steps == 2000  # the user's value is kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build("odm", warmup_steps=50).set_total_steps(200)


# ---- Aioli probe share ------------------------------------------------------------------------------------------------

FIVE = ["a", "b", "c", "d", "e"]
FIVE_SIZES = torch.ones(5, dtype=torch.float64)


def _probe_steps(m, total):
    """Drive a bound Aioli through `total` steps, answering every eval request; count steps trained on a probe."""
    probing = 0
    for step in range(total):
        if m.eval_requested():
            m.observe_eval(torch.linspace(5, 4, m.k, dtype=torch.float64) - 0.001 * step, step)
        probing += m.wants_probe() is not None
        m.observe(stats(step, loss=tuple([2.0] * m.k), tokens=tuple([1.0] * m.k)))
    return probing


@pytest.mark.parametrize(
    "total,rounds,steps,every,share",
    [(200, 2, 2, 200, 20 / 200),     # a short run: two (antithetic) sweeps of 2-step probes, 10% of the run
     (2000, 2, 2, 200, 200 / 2000),  # 10 rounds of 200 steps, each 10% probes (none started at the last step)
     (20_000, 2, 2, 200, 0.1)],
)
def test_aioli_default_probe_share_is_bounded(total, rounds, steps, every, share):
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.set_total_steps(total)
    short = [w for w in caught if "LearnParams round(s)" in str(w.message)]
    assert len(short) == (total // every < AioliMixture.MIN_ROUNDS) and len(caught) == len(short)  # nothing else
    assert (m.lp_rounds, m.lp_steps, m.update_every) == (rounds, steps, every)
    if total <= 2000:
        assert _probe_steps(m, total) / total == pytest.approx(share)


def test_aioli_paper_setting_when_it_fits():
    # 2 domains: 2·2·10 = 40 probe steps fit in 10% of a 400-step round
    m = build("aioli", names=["a", "b"], sizes=torch.ones(2, dtype=torch.float64), update_every=400)
    m.set_total_steps(4000)
    assert (m.lp_rounds, m.lp_steps, m.update_every) == (2, 10, 400)
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES, probe_fraction=0.5)
    m.set_total_steps(1000)
    assert (m.lp_rounds, m.lp_steps, m.update_every) == (2, 10, 200)


def test_aioli_one_sweep_when_two_do_not_fit():
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES)
    m.set_total_steps(60)  # 10% of 60 = 6 steps: two sweeps of 5 domains do not fit, one sweep of 1-step probes does
    assert (m.lp_rounds, m.lp_steps, m.update_every) == (1, 1, 60)


def test_aioli_antithetic_sweeps_cancel_a_decelerating_learning_curve():
    """Held-out losses that fall along the same quadratic curve whatever is trained on (no domain effect at all):
    the drop over a probe is linear in its start step, so probing in one order then the reverse gives every column of
    G the same sum and A, hence the mixture, stays uniform. The authors' independent random sweeps credit whichever
    domain was probed early."""

    def final_mixture(order: str) -> torch.Tensor:
        m = build("aioli", names=FIVE, sizes=FIVE_SIZES, probe_order=order, seed=3, lp_rounds=2, lp_steps=2,
                  update_every=200, min_prob=0)
        m.set_total_steps(200)
        for step in range(25):
            if m.eval_requested():
                curve = 7.0 - 0.2 * step + 0.004 * step**2
                m.observe_eval(torch.full((5,), curve, dtype=torch.float64), step)
            m.observe(stats(step, loss=tuple([2.0] * 5), tokens=tuple([1.0] * 5)))
        assert m.last_A is not None
        return m.probabilities()

    close(final_mixture("antithetic"), [0.2] * 5, tol=1e-12)
    assert final_mixture("random").max() > 0.25  # the trend alone moved it
    with pytest.raises(ValueError, match="'probe_order'"):
        build("aioli", probe_order="shuffled")


def test_aioli_default_probe_mass_is_one_and_a_half_uniform_shares():
    from hfweight.strategies.mixture.aioli import default_one_hot_factor

    assert [default_one_hot_factor(k) for k in (1, 2, 3, 5, 7)] == [1.0, 0.75, 0.5, 0.3, 1.5 / 7]
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES)
    assert m.one_hot_factor == 0.3
    m.set_total_steps(200)
    m.observe_eval(torch.full((5,), 5.0, dtype=torch.float64), 0)  # the round starts: the first probe is served
    probe = m.wants_probe()
    close(probe.sort(descending=True).values, [0.3, 0.175, 0.175, 0.175, 0.175])
    assert build("aioli", names=FIVE, sizes=FIVE_SIZES, one_hot_factor=0.75).one_hot_factor == 0.75  # given: kept


def test_aioli_starts_no_round_at_the_last_step():
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES)
    m.set_total_steps(200)
    _probe_steps(m, 200)
    assert not m.eval_requested() and m.wants_probe() is None


def test_aioli_too_short_to_probe_keeps_the_prior():
    m = build("aioli", names=FIVE, sizes=FIVE_SIZES)
    with pytest.warns(UserWarning, match=r"keeps its prior mixture for this run"):
        m.set_total_steps(30)  # 10% of 30 = 3 steps < one step per domain
    assert not m.eval_requested() and _probe_steps(m, 30) == 0
    close(m.probabilities(), [0.2] * 5)


def test_aioli_explicit_probes_over_the_bound_warn():
    m = build("aioli", lp_rounds=1, lp_steps=2, update_every=20)
    with pytest.warns(UserWarning, match=r"probes take 6 of every 20 steps \(30%\), more than probe_fraction=0.1"):
        m.set_total_steps(100)
    with pytest.raises(ValueError, match=r"'probe_fraction'\] must be > 0"):
        build("aioli", probe_fraction=0)


# ---- Aioli with held-out sets for only some domains ------------------------------------------------------------------


def test_aioli_partial_coverage_equals_the_covered_rows_alone():
    """Held-out losses for 'code' and 'math' only ('prose' NaN, e.g. junk with no held-out set): A's 'prose' row is 0
    and left out of the normalization; the update equals the hand computation from the covered rows; 'prose' is
    still probed and weighted by how much it helps the covered domains."""
    m = build("aioli", lp_rounds=1, lp_steps=1, update_every=10, ema=None, eta=1.0, min_prob=0, one_hot_factor=1.0,
              probe_fraction=0.5)
    m.set_total_steps(10)
    # true drops G[i, j] (eval i, probe j) for the covered rows; prose (row 2) has no held-out data
    G = np.array([[0.3, 0.1, -0.05], [0.0, 0.4, 0.02]])
    losses = np.array([5.0, 5.0])
    probed = []
    step = 0
    while True:
        if m.eval_requested():
            probe = m.wants_probe()
            if probe is not None:  # end of a probe: losses drop by the probed domain's column
                j = int(torch.argmax(probe))
                losses = losses - G[:, j]
            m.observe_eval(torch.tensor([losses[0], losses[1], float("nan")], dtype=torch.float64), step)
        if m.wants_probe() is None and probed:
            break
        probe = m.wants_probe()
        probed.append(int(torch.argmax(probe)))
        m.observe(stats(step))
        step += 1
    assert sorted(probed) == [0, 1, 2]
    A = np.zeros((3, 3))
    A[:2] = G - G.min()  # shift by the covered rows' minimum only
    A /= A.sum()
    expected = np.exp(A.sum(axis=0)) / np.exp(A.sum(axis=0)).sum()
    close(m.last_A, A)
    close(m.probabilities(), expected)
    assert m.probabilities()[2] == m.probabilities().min()  # junk probes did not lower the covered losses


def test_documented_step_size_defaults():
    """DoReMi's online default step is 0.1 (1.0, the paper's proxy-run value, flips the mixture between near-one-hot
    states online); Aioli's default step is the authors' full-scale 1 whatever k (issue 23; an explicit value is
    kept)."""
    from hfweight.registry import MIXTURES

    assert MIXTURES.build("doremi", {}).eta == 0.1
    for k in (2, 5):
        aioli = MIXTURES.build("aioli", {})
        aioli.bind([f"d{i}" for i in range(k)], torch.ones(k))
        assert aioli.eta == 1.0
    explicit = MIXTURES.build("aioli", {"eta": 0.5})
    explicit.bind(["a", "b", "c"], torch.ones(3))
    assert explicit.eta == 0.5


# ---- ODM: what it converges to, and its failure watch (issue 23) ----------------------------------------------------


def test_odm_mixed_minibatch_settles_proportional_to_the_losses():
    """Every domain seen every step: the 1/π importance weight equalizes the reward increments L_d/π_d exactly when
    π ∝ L, so the EXP3 mixture settles there (up to its ε exploration share)."""
    m = build("odm", warmup_steps=0, watch=False)
    loss = (1.0, 2.0, 3.0)
    for step in range(3000):
        m.observe(stats(step, loss=loss))
    close(m.probabilities(), [1 / 6, 2 / 6, 3 / 6], tol=0.02)


def _odm_losses(step: int, stuck: bool) -> tuple[float, float, float]:
    """Two domains learning (losses fall from 7 towards 2 and 3); the third stuck at 7 (``stuck``) or learning too."""
    decay = np.exp(-step / 30)
    third = 7.0 + 0.001 * step if stuck else 4.0 + 3.0 * decay
    return (2.0 + 5.0 * decay, 3.0 + 4.0 * decay, third)


def test_odm_warns_once_when_it_upweights_a_domain_that_does_not_learn():
    m = build("odm", warmup_steps=0)
    m._focus = None  # the stuck-domain watch alone (the concentration watch: tests/test_watches.py)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(120):
            m.observe(stats(step, loss=_odm_losses(step, stuck=True)))
    odm = [w for w in caught if str(w.message).startswith("odm:")]
    assert len(odm) == 1
    assert "domain 'prose'" in str(odm[0].message) and "does not fall" in str(odm[0].message)
    assert m.probabilities()[2] > 0.4  # what it warned about: the stuck domain took the largest share


def test_odm_does_not_warn_when_every_domain_learns():
    m = build("odm", warmup_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(120):
            m.observe(stats(step, loss=_odm_losses(step, stuck=False)))
    quiet = build("odm", warmup_steps=0, watch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(120):
            quiet.observe(stats(step, loss=_odm_losses(step, stuck=True)))


def test_doremi_warns_once_when_it_feeds_a_domain_that_does_not_learn():
    """Excess loss that stays positive on a domain both models fail on (the clipped per-token excess of noise), while
    its training loss does not fall and the others' do: DoReMi's weight on it grows, and it says so once."""
    m = build("doremi", eta=0.1)
    m._focus = None  # the stuck-domain watch alone (the concentration watch: tests/test_watches.py)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(120):
            loss = _odm_losses(step, stuck=True)
            m.observe(stats(step, loss=loss, excess=(0.1 * 4, 0.1 * 2, 1.5 * 3)))  # excess_sum = mean × tokens
    doremi = [w for w in caught if str(w.message).startswith("doremi:")]
    assert len(doremi) == 1 and "domain 'prose'" in str(doremi[0].message)
    quiet = build("doremi", eta=0.1, watch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(120):
            quiet.observe(stats(step, loss=_odm_losses(step, stuck=True), excess=(0.4, 0.2, 4.5)))
