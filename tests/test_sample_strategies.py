"""Per-sample strategies (docs/methods.md, per-sample weights) against independent re-implementations in plain
Python/NumPy.

Nothing here calls the formulas under test to build an expected value: every reference is written out again below.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch

from hfweight import WeightedTrainingArguments
from hfweight.strategies.base import SampleContext
from hfweight.strategies.sample import (
    LossReweighting,
    LossTruncation,
    MetaRescaler,
    RescalerNet,
    lookahead_surrogate,
    loss_strategy_scores,
    meta_objective,
    normalize_losses,
    normalize_losses_in_range,
    sample_features,
    scales_kl_to_uniform,
    softmax_weights,
    truncation_window,
    unnormalized_softmax_weights,
)
from hfweight.strategies.sample.loss import tail_stats
from hfweight.strategies.sample.truncation import largest_gap_cutoff

STRATEGIES = ("linupper", "quadratic", "mid", "extremes", "upper")
TEMPERATURES = (0.05, 0.4, 1.0, 3.0, 25.0)


# ---- independent references ---------------------------------------------------------------------------------------


def ref_sow(losses, strategy: str, r: float) -> np.ndarray:
    """Sow et al. written out in NumPy (float64): weights with mean 1 over the finite losses, 0 for NaN."""
    x = np.asarray(losses, dtype=np.float64)
    out = np.zeros_like(x)
    ok = np.isfinite(x)
    if not ok.any():
        return out
    v = x[ok]
    lo, hi = v.min(), v.max()
    h = (2 * v - (hi + lo)) / max(hi - lo, 1e-6)
    f = {
        "linupper": np.minimum(h + 1, 1.0),
        "quadratic": 1 - h**2,
        "mid": 1 - h**2,
        "extremes": np.abs(h),
        "upper": 0.5 * h + 0.5,
    }[strategy]
    if math.isinf(r):
        g = np.ones_like(f)
    else:
        g = np.exp((f - f.max()) / r)
    out[ok] = g / g.sum() * len(v)
    return out


class RefDropper:
    """Loss truncation written out with a Python list as the ring buffer and ``numpy.percentile`` (linear)."""

    def __init__(self, dropc, size, min_samples, recompute):
        self.dropc, self.size, self.min_samples, self.recompute = dropc, size, min_samples, recompute
        self.vals = [None] * size
        self.idx = self.seen = self.since = 0
        self.cut = None

    def __call__(self, losses):
        filled = [v for v in self.vals if v is not None]
        if self.dropc > 0 and filled and self.seen >= self.min_samples:
            if self.cut is None or self.since >= self.recompute:
                self.cut = float(np.percentile(np.array(filled), 100 * (1 - self.dropc)))
                self.since = 0
        out = []
        for x in losses:
            if math.isnan(x):
                out.append(0.0)
            else:
                out.append(0.0 if self.cut is not None and x > self.cut else 1.0)
        for x in losses:
            if math.isnan(x):
                continue
            self.vals[self.idx] = x
            self.idx = (self.idx + 1) % self.size
            self.seen += 1
            self.since += 1
        return out


def ctx(losses, step=0, column=None, domains=None, features=None):
    c = SampleContext(
        losses=torch.tensor(losses, dtype=torch.float64),
        step=step,
        column=None if column is None else torch.tensor(column, dtype=torch.float32),
        domains=None if domains is None else torch.tensor(domains),
    )
    if features is not None:
        c.features = features
    return c


LOSSES = [2.31, 0.47, 5.02, 1.13, 3.3, 0.91, 2.2, 4.75, 1.6]


# ---- Sow et al.: pure functions and the strategy ------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", TEMPERATURES)
def test_loss_weights_match_numpy(strategy, r):
    got = LossReweighting(strategy=strategy, temperature=r).weights(ctx(LOSSES, step=5))
    assert got.dtype == torch.float32 and got.shape == (len(LOSSES),)
    np.testing.assert_allclose(got.numpy(), ref_sow(LOSSES, strategy, r), rtol=2e-6, atol=1e-7)
    assert got.double().mean().item() == pytest.approx(1.0, abs=1e-6)
    # The pure functions, composed by hand, give the same numbers in float64.
    pure = softmax_weights(loss_strategy_scores(normalize_losses(torch.tensor(LOSSES, dtype=torch.float64)), strategy), r)
    np.testing.assert_allclose(pure.numpy(), ref_sow(LOSSES, strategy, r), rtol=1e-12, atol=1e-12)


def test_normalize_losses_formula():
    x = [3.0, -1.0, 7.0, 2.5]
    lo, hi = -1.0, 7.0
    expected = [(2 * v - (hi + lo)) / (hi - lo) for v in x]
    np.testing.assert_allclose(normalize_losses(torch.tensor(x)).numpy(), expected, rtol=0, atol=1e-15)
    assert normalize_losses(torch.tensor(x)).min() == -1 and normalize_losses(torch.tensor(x)).max() == 1


def test_score_functions_by_hand():
    h = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert loss_strategy_scores(h, "linupper").tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert loss_strategy_scores(h, "quadratic").tolist() == [0.0, 0.75, 1.0, 0.75, 0.0]
    assert loss_strategy_scores(h, "mid").tolist() == [0.0, 0.75, 1.0, 0.75, 0.0]
    assert loss_strategy_scores(h, "extremes").tolist() == [1.0, 0.5, 0.0, 0.5, 1.0]
    assert loss_strategy_scores(h, "upper").tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match=r"valid: \['linupper', 'quadratic', 'extremes', 'upper'\].*fms-fsdp's 'upper'"):
        loss_strategy_scores(h, "lower")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_infinite_and_huge_temperature_is_uniform(strategy):
    for r in (float("inf"), "inf", 1e12):
        got = LossReweighting(strategy=strategy, temperature=r).weights(ctx(LOSSES))
        np.testing.assert_allclose(got.numpy(), np.ones(len(LOSSES)), rtol=0, atol=1e-9)
    assert softmax_weights(torch.tensor([0.3, 0.9, float("nan")]), float("inf")).tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", (1e-3, 0.4, 1.0))
def test_equal_losses_give_uniform_weights_without_nan(strategy, r):
    got = LossReweighting(strategy=strategy, temperature=r).weights(ctx([1.7] * 6))
    assert torch.isfinite(got).all()
    assert got.tolist() == [1.0] * 6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_sample_gets_weight_one(strategy):
    assert LossReweighting(strategy=strategy, temperature=0.1).weights(ctx([3.2])).tolist() == [1.0]
    assert LossReweighting(strategy=strategy).weights(ctx([])).tolist() == []


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_losses_are_excluded(strategy):
    nan = float("nan")
    losses = [2.0, nan, 0.5, 4.0, nan, 1.25]
    got = LossReweighting(strategy=strategy, temperature=0.4).weights(ctx(losses))
    assert got[1] == 0 and got[4] == 0
    # The finite samples are weighted exactly as if the NaN ones were not there (min/max and softmax without them).
    np.testing.assert_allclose(got[[0, 2, 3, 5]].numpy(), ref_sow([2.0, 0.5, 4.0, 1.25], strategy, 0.4), rtol=2e-6)
    assert got.sum().item() == pytest.approx(4.0, abs=1e-5)
    assert LossReweighting(strategy=strategy).weights(ctx([nan, nan])).tolist() == [0.0, 0.0]
    assert LossReweighting(strategy=strategy).weights(ctx([nan, 1.0])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("r", (0.1, 0.4, 1.0, 2.0))
def test_weight_ratio_is_bounded_by_exp_one_over_r(strategy, r):
    g = np.random.default_rng(0)
    for _ in range(20):
        losses = g.gamma(2.0, 1.5, size=int(g.integers(2, 40))).tolist()
        w = LossReweighting(strategy=strategy, temperature=r).weights(ctx(losses)).double()
        assert (w.max() / w.min()).item() <= math.exp(1 / r) * (1 + 1e-5)


def test_linupper_down_weights_low_losses():
    # Losses 1..5 → h = -1, -.5, 0, .5, 1 → f = 0, .5, 1, 1, 1: the two easiest samples lose weight, the rest share it.
    got = LossReweighting(strategy="linupper", temperature=1.0).weights(ctx([1.0, 2.0, 3.0, 4.0, 5.0])).double()
    e = [math.exp(-1.0), math.exp(-0.5), 1.0, 1.0, 1.0]
    np.testing.assert_allclose(got.numpy(), [5 * x / sum(e) for x in e], rtol=1e-6)
    assert got[0] < got[1] < got[2] and got[2] == got[3] == got[4]
    # The order of the samples does not matter.
    shuffled = LossReweighting(temperature=1.0).weights(ctx([4.0, 1.0, 5.0, 3.0, 2.0])).double()
    np.testing.assert_allclose(shuffled.numpy(), got[[3, 0, 4, 2, 1]].numpy(), rtol=0, atol=0)


def test_warmup_is_uniform_or_uses_the_warmup_temperature():
    plain = LossReweighting(strategy="quadratic", temperature=0.4, warmup_steps=3)
    for step in range(3):
        assert plain.weights(ctx(LOSSES, step=step)).tolist() == [1.0] * len(LOSSES)
    np.testing.assert_allclose(plain.weights(ctx(LOSSES, step=3)).numpy(), ref_sow(LOSSES, "quadratic", 0.4), rtol=2e-6)
    fms = LossReweighting(strategy="linupper", temperature=0.4, warmup_steps=2, warmup_temperature=100.0)
    np.testing.assert_allclose(fms.weights(ctx(LOSSES, step=1)).numpy(), ref_sow(LOSSES, "linupper", 100.0), rtol=2e-6)
    np.testing.assert_allclose(fms.weights(ctx(LOSSES, step=2)).numpy(), ref_sow(LOSSES, "linupper", 0.4), rtol=2e-6)


def test_static_column_multiplies_the_weights():
    column = [1.0, 0.0, 2.0, 0.5, 1.0, 1.0, 3.0, 1.0, 0.25]
    got = LossReweighting(temperature=0.4).weights(ctx(LOSSES, column=column))
    np.testing.assert_allclose(got.numpy(), ref_sow(LOSSES, "linupper", 0.4) * np.array(column), rtol=2e-6)


def test_loss_strategy_needs_losses():
    with pytest.raises(ValueError, match=r"needs the per-sample losses"):
        LossReweighting().weights(SampleContext())
    assert LossReweighting.needs_losses and LossTruncation.needs_losses and MetaRescaler.needs_losses


# ---- loss truncation ----------------------------------------------------------------------------------------------


def test_truncation_hand_worked_example():
    t = LossTruncation(drop_fraction=0.5, buffer_size=4, min_samples=4, recompute_every=4)
    w = lambda losses: t.weights(ctx(losses)).tolist()  # noqa: E731
    # Hot start: 3 then 5 losses seen (< 4 before each call) → nothing dropped.
    assert w([1.0, 2.0, 3.0]) == [1.0, 1.0, 1.0]
    assert w([4.0, 5.0]) == [1.0, 1.0]  # buffer wraps: [5, 2, 3, 4]
    assert t.buffer.tolist() == [5.0, 2.0, 3.0, 4.0] and t.position == 1
    # First cutoff = median of {2, 3, 4, 5} = 3.5 (from earlier losses only); ties kept; NaN → 0 and not buffered.
    assert w([2.25, 3.75, 3.5, float("nan")]) == [1.0, 0.0, 1.0, 0.0]
    assert t.cutoff == 3.5 and t.buffer.tolist() == [5.0, 2.25, 3.75, 3.5] and t.position == 0
    # 3 losses since the cutoff (< 4): it stays 3.5.
    assert w([3.625, 4.0]) == [0.0, 0.0]
    assert t.cutoff == 3.5 and t.buffer.tolist() == [3.625, 4.0, 3.75, 3.5]
    # 5 since (≥ 4): recomputed on {3.5, 3.625, 3.75, 4.0} → (3.625 + 3.75) / 2 = 3.6875.
    assert w([3.6875, 3.7]) == [1.0, 0.0]
    assert t.cutoff == 3.6875
    # A batch longer than the buffer keeps only its last 4 losses, written after the wrap.
    t.weights(ctx([9.0, 10.0, 11.0, 12.0, 13.0, 14.0]))
    assert sorted(t.buffer.tolist()) == [11.0, 12.0, 13.0, 14.0] and t.position == (2 + 2 + 6) % 4
    assert t.buffer.tolist() == [13.0, 14.0, 11.0, 12.0]


@pytest.mark.parametrize(
    "dropc,size,min_samples,recompute",
    [(0.4, 10, 10, 10), (0.25, 7, 3, 5), (0.5, 5, 0, 1), (0.9, 16, 40, 16), (0.0, 6, 0, 2)],
)
def test_truncation_matches_reference(dropc, size, min_samples, recompute):
    g = np.random.default_rng(1)
    t = LossTruncation(drop_fraction=dropc, buffer_size=size, min_samples=min_samples, recompute_every=recompute)
    ref = RefDropper(dropc, size, min_samples, recompute)
    dropped = 0
    for _ in range(60):
        losses = g.lognormal(0.5, 0.6, size=int(g.integers(1, 2 * size))).tolist()
        if g.random() < 0.2:
            losses[0] = float("nan")
        got = t.weights(ctx(losses)).tolist()
        assert got == ref(losses)
        dropped += got.count(0.0) - sum(math.isnan(x) for x in losses)
    assert (dropped == 0) == (dropc == 0.0)


def _widest_gap_by_brute_force(values, drop_fraction):
    """Independent of largest_gap_cutoff: scan every split between two neighbouring sorted values whose upper value is
    at or above numpy's (1 − drop_fraction) percentile; the widest one (the first, on a tie) gives the midpoint."""
    x = sorted(values)
    q = float(np.percentile(x, 100 * (1 - drop_fraction)))
    best = None
    for i in range(len(x) - 1):
        if x[i + 1] < q:  # both neighbours below the quantile's tail: not a candidate
            continue
        gap = x[i + 1] - x[i]
        if best is None or gap > best[0]:
            best = (gap, (x[i] + x[i + 1]) / 2)
    return best[1]


def test_largest_gap_cutoff_hand_worked_and_against_brute_force():
    # clean losses 1-2.6 and a cluster of three near 8: the widest gap in the top 40% is 2.6 → 8.0; cut at 5.3
    losses = torch.tensor([1.0, 1.2, 1.5, 2.0, 2.2, 2.4, 2.6, 8.0, 8.1, 8.3])
    assert largest_gap_cutoff(losses, 0.4) == pytest.approx(5.3)
    # evenly spread with a slightly wider last step: only the top value goes (the quantile rule would drop 4)
    assert largest_gap_cutoff(torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10.5]), 0.4) == pytest.approx(9.75)
    # the gap just under the quantile counts: the rule never drops *more* than drop_fraction
    assert largest_gap_cutoff(torch.tensor([1.0, 1.1, 1.2, 5.0, 5.1]), 0.4) == pytest.approx(3.1)
    assert largest_gap_cutoff(torch.tensor([3.0]), 0.4) == math.inf
    g = np.random.default_rng(3)
    for _ in range(200):
        values = np.concatenate([g.normal(3, 1, int(g.integers(5, 40))), g.normal(8, 0.3, int(g.integers(0, 12)))])
        dropc = float(g.choice([0.1, 0.25, 0.4, 0.6]))
        cut = largest_gap_cutoff(torch.tensor(values), dropc)
        assert cut == pytest.approx(_widest_gap_by_brute_force(values.tolist(), dropc))
        assert (values > cut).mean() <= dropc + 1 / len(values)  # at most the quantile's share (up to one row)


def test_truncation_gap_cutoff_drops_the_separate_cluster_only():
    quantile = LossTruncation(drop_fraction=0.4, buffer_size=20, min_samples=20, recompute_every=20)
    gap = LossTruncation(drop_fraction=0.4, buffer_size=20, min_samples=20, recompute_every=20, cutoff="gap")
    clean = [1.0 + 0.1 * i for i in range(14)]  # 1.0 .. 2.3
    first = clean + [8.0, 8.2, 8.4, 8.1, 8.3, 8.5]  # 30% garbage
    for t in (quantile, gap):
        t.weights(ctx(first))
    step = [1.5, 2.2, 2.3, 8.1]
    assert quantile.weights(ctx(step)).tolist() == [1.0, 0.0, 0.0, 0.0]  # 60th percentile 2.26: takes clean rows too
    assert gap.weights(ctx(step)).tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"cutoff.*must be one of \['quantile', 'gap'\]"):
        LossTruncation(cutoff="largest")


def test_truncation_drops_nothing_before_min_samples():
    t = LossTruncation(drop_fraction=0.4, buffer_size=100, min_samples=50, recompute_every=10)
    for i in range(5):  # 10 losses per step: 0, 10, ..., 40 seen before each call
        assert t.weights(ctx([float(i * 10 + j) for j in range(10)])).tolist() == [1.0] * 10
    assert t.weights(ctx([0.0, 1000.0])).tolist() == [1.0, 0.0]  # 50 seen → cutoff = 60th pct of 0..49 = 29.4


def test_truncation_state_round_trip_is_exact():
    g = np.random.default_rng(2)
    batches = [g.exponential(2.0, size=int(g.integers(1, 9))).tolist() for _ in range(40)]
    kwargs = dict(drop_fraction=0.3, buffer_size=13, min_samples=7, recompute_every=5)
    uninterrupted, first = LossTruncation(**kwargs), LossTruncation(**kwargs)
    expected = [uninterrupted.weights(ctx(b)).tolist() for b in batches]
    for b in batches[:17]:
        first.weights(ctx(b))
    state = first.state_dict()
    first.weights(ctx([100.0] * 20))  # mutating the original must not alter the saved state
    resumed = LossTruncation(**kwargs)
    resumed.load_state_dict(state)
    assert [resumed.weights(ctx(b)).tolist() for b in batches[17:]] == expected[17:]
    assert torch.equal(resumed.buffer, uninterrupted.buffer) and resumed.cutoff == uninterrupted.cutoff
    with pytest.raises(ValueError, match=r"buffer_size"):
        LossTruncation(buffer_size=5).load_state_dict(state)


# ---- STORM-like meta rescaler ---------------------------------------------------------------------------------------


def test_rescaler_starts_at_one_and_stays_positive_with_mean_one():
    m = MetaRescaler(hidden=8, meta_lr=0.05)
    losses = [2.0, 0.5, 3.0, float("nan"), 1.0, 7.5]
    w = m.weights(ctx(losses, domains=[0, 1, 0, 1, 2, 2], features={"entropy": torch.rand(6)}))
    np.testing.assert_allclose(w.numpy(), [1, 1, 1, 0, 1, 1], rtol=0, atol=1e-6)
    feats = m.features(ctx(losses))
    assert torch.allclose(m.scales(feats), torch.ones(6), atol=1e-6)
    # Train Ω to prefer low-loss samples (the outer term alone) and check the weights move yet stay valid.
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = (torch.rand(8, generator=g) * 4).tolist()
        c = ctx(batch)
        m.weights(c)
        feats = m.features(c)
        m.meta_update(meta_objective(m.scales(feats), torch.tensor(batch)))
    w = m.weights(ctx([0.2, 1.0, 2.0, 3.9, float("nan")]))
    valid = w[:4].double()
    assert (valid > 0).all() and w[4] == 0
    assert valid.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert valid[0] > valid[3]  # learned: low loss up, high loss down
    assert m.meta_steps == 30


def test_rescaler_net_initial_output_and_private_seed():
    state = torch.random.get_rng_state()
    a, b = RescalerNet(3, 16, seed=7), RescalerNet(3, 16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG was not consumed
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = a(torch.randn(5, 3) * 10)
    assert torch.allclose(out, torch.ones(5), atol=1e-6)


def test_features_are_finite_on_edge_inputs():
    nan, inf = float("nan"), float("inf")
    m = MetaRescaler()
    cases = [[1.0], [2.0] * 5, [nan, nan], [nan, 3.0], [1e30, 0.0, 1e-30], [inf, 1.0], []]
    for losses in cases:
        for features in (None, {"entropy": torch.full((len(losses),), nan)}, {"entropy": torch.arange(len(losses))}):
            for domains in (None, [i % 2 for i in range(len(losses))]):
                c = ctx(losses, features=features, domains=domains)
                f = m.features(c, update_stats=True)
                assert f.shape == (len(losses), 3) and torch.isfinite(f).all()
                w = m.weights(c)
                assert torch.isfinite(w).all() and (w >= 0).all()
    raw = sample_features(torch.tensor([1.0, 2.0]), None, torch.tensor([0.5, 2.5]))
    assert raw[:, 0].tolist() == [1.0, 2.0] and raw[:, 1].isnan().all() and raw[:, 2].tolist() == [0.5, -0.5]


def test_loss_change_feature_uses_the_domain_baseline_before_the_step():
    m = MetaRescaler(feature_momentum=0.5)
    m.features(ctx([1.0, 3.0, 10.0], domains=[0, 0, 1]), update_stats=True)  # domain means 2 and 10
    assert m.domain_loss.tolist() == [2.0, 10.0]
    m.features(ctx([4.0, 6.0], domains=[0, 2]), update_stats=True)  # baselines 2 (seen) and 6 (new: its batch mean)
    assert m.domain_loss.tolist() == [0.5 * 2.0 + 0.5 * 4.0, 10.0, 6.0]
    raw_change = m._baselines(torch.tensor([5.0], dtype=torch.float64), torch.tensor([1]), update=False)
    assert raw_change.tolist() == [10.0]


def test_rescaler_state_round_trip_is_exact():
    def run(m, batches):
        out = []
        for i, batch in enumerate(batches):
            c = ctx(batch, domains=[j % 3 for j in range(len(batch))], features={"entropy": torch.tensor(batch) / 3})
            out.append(m.weights(c))
            if m.should_meta_step(i):
                feats = m.features(c)
                m.meta_update(meta_objective(m.scales(feats), torch.tensor(batch) ** 2))
        return out

    g = np.random.default_rng(3)
    batches = [g.exponential(1.0, size=6).tolist() for _ in range(12)]
    kwargs = dict(hidden=4, meta_lr=0.1, meta_every=2, feature_momentum=0.9)
    full = run(MetaRescaler(**kwargs), batches)
    first = MetaRescaler(**kwargs)
    run(first, batches[:5])
    state = first.state_dict()
    run(first, batches[:3])  # mutating the original must not alter the saved state
    resumed = MetaRescaler(**kwargs)
    resumed.load_state_dict(state)
    rest = []
    for i, batch in enumerate(batches[5:], start=5):  # continue with the original step numbering
        c = ctx(batch, domains=[j % 3 for j in range(len(batch))], features={"entropy": torch.tensor(batch) / 3})
        rest.append(resumed.weights(c))
        if resumed.should_meta_step(i):
            resumed.meta_update(meta_objective(resumed.scales(resumed.features(c)), torch.tensor(batch) ** 2))
    assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))
    assert not all(torch.equal(w, torch.ones_like(w)) for w in full)  # the rescaler did move


def test_meta_objective_by_hand():
    s = torch.tensor([1.0, 3.0, 0.5], requires_grad=True)
    losses = torch.tensor([2.0, float("nan"), 4.0])
    value = meta_objective(s, losses)
    assert value.item() == pytest.approx((1 * 2 + 0.5 * 4) / 1.5)
    value.backward()
    # d/ds_k of Σ s ℓ / Σ s = (ℓ_k − L) / Σ s, and 0 for the NaN sample.
    L = (1 * 2 + 0.5 * 4) / 1.5
    assert s.grad.tolist() == pytest.approx([(2 - L) / 1.5, 0.0, (4 - L) / 1.5])


def test_lookahead_surrogate_gives_the_exact_meta_gradient():
    """On a linear regression model the meta gradient through the look-ahead can be computed exactly with a
    second-order graph; the documented recipe without it (surrogate + outer term) must give the same gradient."""
    torch.manual_seed(0)
    d, n, nv, eta = 5, 7, 6, 0.3
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    xv, yv = torch.randn(nv, d, dtype=torch.float64), torch.randn(nv, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    m = MetaRescaler(hidden=6)
    with torch.no_grad():  # leave the exact-1 initialization so that the scales depend on the features
        m.rescaler.out.weight.normal_(0, 0.5)
    m.rescaler.double()
    feats, feats_val = torch.randn(n, 3, dtype=torch.float64), torch.randn(nv, 3, dtype=torch.float64)
    params = list(m.rescaler.parameters())

    def per_sample(th, a, b):
        return 0.5 * (a @ th - b) ** 2

    # Exact: θ'(ω) with create_graph, one backward of the meta objective.
    s, s_val = m.rescaler(feats), m.rescaler(feats_val)
    th = theta.clone().requires_grad_(True)
    train = (s / s.sum() * per_sample(th, x, y)).sum()
    (g_train,) = torch.autograd.grad(train, th, create_graph=True)
    exact = torch.autograd.grad(meta_objective(s_val, per_sample(th - eta * g_train, xv, yv)), params)

    # The recipe of the MetaRescaler docstring: no graph through the model.
    s, s_val = m.rescaler(feats), m.rescaler(feats_val)
    th = theta.clone().requires_grad_(True)
    (g_train,) = torch.autograd.grad((s.detach() / s.detach().sum() * per_sample(th, x, y)).sum(), th)
    th_prime = (theta - eta * g_train).requires_grad_(True)
    val_losses = per_sample(th_prime, xv, yv)
    (g_val,) = torch.autograd.grad(meta_objective(s_val.detach(), val_losses), th_prime)
    dd = torch.stack([torch.autograd.grad(per_sample(th, x[i : i + 1], y[i : i + 1]).sum(), th)[0] @ g_val for i in range(n)])
    # The central difference of the docstring agrees with the exact directional derivatives (quadratic: exactly).
    delta = 0.01 / g_val.norm()
    fd = (per_sample(theta + delta * g_val, x, y) - per_sample(theta - delta * g_val, x, y)) / (2 * delta)
    assert torch.allclose(fd, dd, rtol=1e-6, atol=1e-9)
    first_order = torch.autograd.grad(meta_objective(s_val, val_losses.detach()) + lookahead_surrogate(s, fd, eta), params)
    for a, b in zip(exact, first_order):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)


# ---- rescale protocol (docs/methods.md#exact-modes) -----------------------------------------------------------------


def test_range_normalization_and_unnormalized_weights_by_hand():
    h = normalize_losses_in_range(torch.tensor([1.0, 2.0, 3.0, 0.0, 9.0, float("nan")]), 1.0, 3.0)
    assert h[:5].tolist() == [-1.0, 0.0, 1.0, -1.0, 1.0] and math.isnan(h[5])  # outside the range: clamped
    assert normalize_losses_in_range(torch.tensor([5.0, 7.0]), None, None).tolist() == [0.0, 0.0]  # no range: uniform
    assert normalize_losses_in_range(torch.tensor([2.0, 2.5]), 2.0, 2.0).tolist() == [0.0, 1.0]  # 1e-6 floor
    u = unnormalized_softmax_weights(torch.tensor([1.0, 0.5, 0.0, float("nan")]), 0.5)
    np.testing.assert_allclose(u.numpy(), [1.0, math.exp(-1.0), math.exp(-2.0), 0.0])
    assert unnormalized_softmax_weights(torch.tensor([0.3, 0.9]), float("inf")).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("r", TEMPERATURES)
def test_unnormalized_weights_normalize_to_the_softmax(r):
    f = torch.rand(11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = unnormalized_softmax_weights(f, r)
    np.testing.assert_allclose((u / u.mean()).numpy(), softmax_weights(f, r).numpy(), rtol=1e-12)


def _split_weights(strategy, losses, domains=None):
    """local_weights of an arbitrary split (3 + rest, in reverse order) concatenated back: must equal the whole.

    Equal up to float32 rounding, not bit for bit: STORM's rescaler is a small MLP, and a matrix product over 3 rows
    and over 6 rows may take different CPU kernels (seen on an AVX-512 machine: last-bit differences)."""
    c = ctx(losses, domains=domains)
    whole = strategy.local_weights(c)
    head = strategy.local_weights(ctx(losses[:3], domains=None if domains is None else domains[:3]))
    tail = strategy.local_weights(ctx(losses[3:], domains=None if domains is None else domains[3:]))
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=1e-6, atol=1e-7)
    return whole


@pytest.mark.parametrize("strategy", ("linupper", "quadratic", "extremes", "upper"))
def test_loss_rescale_uses_the_previous_step_range(strategy):
    m = LossReweighting(strategy=strategy, temperature=0.4, mode="rescale")
    first = _split_weights(m, LOSSES)
    assert len(set(first.tolist())) == 1  # no previous step: uniform
    m.end_step(ctx(LOSSES))
    batch = [2.0, 0.1, 6.0, 3.3, float("nan"), 1.2]
    u = _split_weights(m, batch).double().numpy()
    lo, hi = min(LOSSES), max(LOSSES)
    x = np.array(batch)
    h = np.clip((2 * x - (hi + lo)) / (hi - lo), -1, 1)
    f = {"linupper": np.minimum(h + 1, 1), "quadratic": 1 - h**2, "extremes": np.abs(h), "upper": 0.5 * h + 0.5}[strategy]
    expected = np.where(np.isfinite(x), np.exp((f - 1) / 0.4), 0.0)
    np.testing.assert_allclose(u, expected, rtol=1e-6)
    restored = LossReweighting(strategy=strategy, temperature=0.4, mode="rescale")
    restored.load_state_dict(m.state_dict())
    assert torch.equal(restored.local_weights(ctx(batch)), m.local_weights(ctx(batch)))
    assert LossReweighting().state_dict()["previous_range"] is None


def test_truncation_protocol_equals_weights():
    kwargs = dict(drop_fraction=0.3, buffer_size=7, min_samples=5, recompute_every=3)
    a, b = LossTruncation(**kwargs), LossTruncation(**kwargs)
    g = np.random.default_rng(1)
    for step in range(8):
        batch = g.exponential(1.0, size=5).tolist()
        b.begin_step(step)
        local = _split_weights(b, batch)
        b.end_step(ctx(batch))
        assert torch.equal(a.weights(ctx(batch)), local)
    assert torch.equal(a.buffer, b.buffer) and a.cutoff == b.cutoff and a.has_cutoff


def test_storm_rescale_weights_are_per_sample_and_end_step_updates_like_weights():
    kwargs = dict(hidden=4, feature_momentum=0.5)
    a, b = MetaRescaler(**kwargs, mode="score"), MetaRescaler(**kwargs, mode="rescale")
    with torch.no_grad():
        for m in (a, b):
            m.rescaler.out.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    g = np.random.default_rng(4)
    for _ in range(3):
        batch, domains = g.exponential(2.0, size=6).tolist(), [0, 1, 2, 0, 1, 3]
        a.weights(ctx(batch, domains=domains))
        _split_weights(b, batch, domains)  # state-only features: any split gives the same weights
        b.end_step(ctx(batch, domains=domains))
    assert torch.equal(a.feature_mean, b.feature_mean) and torch.equal(a.domain_loss, b.domain_loss)
    u = b.local_weights(ctx([1.0, 5.0, 2.0], domains=[0, 1, 7]))  # domain 7 never seen: a 0 loss-change feature
    assert torch.isfinite(u).all() and (u > 0).all() and len(set(u.tolist())) == 3


def test_scales_kl_to_uniform_by_hand():
    s = torch.tensor([1.0, 3.0, float("nan")], requires_grad=True)
    kl = scales_kl_to_uniform(s)
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    kl.backward()
    # d/ds_k Σ v log(N v) with v = s/Σs: (log(N v_k) − KL) / Σ s
    assert s.grad.tolist()[:2] == pytest.approx([(math.log(0.5) - kl.item()) / 4, (math.log(1.5) - kl.item()) / 4])
    assert scales_kl_to_uniform(torch.full((4,), 2.0)).item() == pytest.approx(0.0, abs=1e-7)
    assert scales_kl_to_uniform(torch.tensor([2.0])).item() == 0.0


# ---- config-time validation ---------------------------------------------------------------------------------------


def _args(tmp_path, name, kwargs):
    return WeightedTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", sample_weighting=name, sample_weighting_kwargs=kwargs
    )


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("loss", {"temperature": 0.0}, r"`temperature` must be > 0 \(float\('inf'\) for uniform weights\), got 0.0"),
        ("loss", {"temperature": -1}, r"`temperature` must be > 0"),
        ("loss", {"temperature": float("nan")}, r"`temperature` must not be NaN"),
        ("loss", {"temperature": "hot"}, r"`temperature` must be a number"),
        ("loss", {"strategy": "lower"}, r"unknown `strategy='lower'`; valid: \['linupper', 'quadratic', 'extremes', 'upper'\]"),
        ("loss", {"strategy": "lower"}, r"fms-fsdp's 'upper' is min\(h\+1, 1\), which is 'linupper' here"),
        ("loss", {"warmup_steps": -1}, r"`warmup_steps` must be an integer ≥ 0, got -1"),
        ("loss", {"warmup_temperature": 0}, r"`warmup_temperature` must be > 0 or None"),
        ("loss", {"kl_reg": 1.0}, r"Bad `sample_weighting_kwargs` for `sample_weighting='loss'`"),
        ("truncation", {"drop_fraction": 1.0}, r"`drop_fraction` must be in \[0, 1\).*got 1.0"),
        ("truncation", {"drop_fraction": -0.1}, r"`drop_fraction` must be in \[0, 1\)"),
        ("truncation", {"buffer_size": 0}, r"`buffer_size` must be an integer ≥ 1"),
        ("truncation", {"recompute_every": 0}, r"`recompute_every` must be an integer ≥ 1"),
        ("storm", {"meta_lr": 0}, r"`meta_lr` must be a finite number > 0"),
        ("storm", {"feature_momentum": 1.0}, r"`feature_momentum` must be in \[0, 1\)"),
        ("storm", {"meta_every": 0}, r"`meta_every` must be an integer ≥ 1"),
        ("storm", {"kl_weight": -1.0}, r"`kl_weight` must be a finite number ≥ 0"),
    ],
)
def test_bad_kwargs_fail_at_config_time(tmp_path, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, name, kwargs)


def test_good_kwargs_build(tmp_path):
    args = _args(tmp_path, "loss", {"strategy": "mid", "temperature": float("inf"), "warmup_steps": 10})
    built = args.build_sample_weighting()
    assert isinstance(built, LossReweighting) and built.strategy == "quadratic" and built.temperature == math.inf
    assert isinstance(_args(tmp_path, "truncation", {"drop_fraction": 0.0}).build_sample_weighting(), LossTruncation)
    storm = _args(tmp_path, "storm", {"hidden": 4}).build_sample_weighting()
    assert isinstance(storm, MetaRescaler) and isinstance(storm.meta_optimizer, torch.optim.Adam)
    assert LossTruncation().recompute_every == 10000 and LossReweighting().strategy == "linupper"


# ---- loss truncation: sizes that scale with the run (issue 15) ----------------------------------------------------------


def test_truncation_window_scales_with_the_run():
    """Unset sizes: the authors' 10 000 until the run length is known, then min(10 000, ceil(run / 10)); explicit
    sizes are kept as given."""
    assert truncation_window(3200) == 320 and truncation_window(3201) == 321
    assert truncation_window(10**6) == 10000 and truncation_window(0) == 1
    t = LossTruncation()
    assert (t.buffer_size, t.min_samples, t.recompute_every) == (10000, 10000, 10000)
    t.set_run_length(3200)
    assert (t.buffer_size, t.min_samples, t.recompute_every, t.buffer.numel()) == (320, 320, 320, 320)
    assert t.warnings == []
    explicit = LossTruncation(buffer_size=50, min_samples=7)
    explicit.set_run_length(3200)
    assert (explicit.buffer_size, explicit.min_samples, explicit.recompute_every) == (50, 7, 50)


def test_truncation_acts_within_a_short_run_by_default():
    """The default drops the top 40% once a tenth of the run was seen: 100 steps of 32 samples, one outlier per step
    (loss 50 among losses 0..31): before the fix (hot start 10 000) nothing was ever dropped."""
    t = LossTruncation()
    t.set_run_length(100 * 32)
    dropped_outliers = 0
    for step in range(100):
        weights = t.weights(ctx([float(i) for i in range(31)] + [50.0])).tolist()
        dropped_outliers += weights[-1] == 0.0
        if step < 10:  # 320 losses are needed first (32 per step)
            assert weights == [1.0] * 32
    assert dropped_outliers == 90


def test_truncation_warns_when_min_samples_outlasts_the_run(caplog):
    t = LossTruncation(min_samples=10000)
    with caplog.at_level("WARNING"):
        t.set_run_length(3200)
    assert len(t.warnings) == 1
    assert "min_samples=10000" in t.warnings[0] and "3200 samples" in t.warnings[0] and "320 here" in t.warnings[0]
    assert t.warnings[0] in caplog.text
    quiet = LossTruncation(min_samples=10000, drop_fraction=0.0)  # drops nothing anyway: nothing to warn about
    quiet.set_run_length(3200)
    assert quiet.warnings == []


def test_truncation_resume_keeps_the_checkpointed_run_sizes():
    """A resumed run whose length (hence window) differs continues with the sizes the checkpointed run resolved."""
    g = np.random.default_rng(4)
    batches = [g.exponential(2.0, size=8).tolist() for _ in range(30)]
    uninterrupted, first = LossTruncation(drop_fraction=0.3), LossTruncation(drop_fraction=0.3)
    uninterrupted.set_run_length(240)
    first.set_run_length(240)
    expected = [uninterrupted.weights(ctx(b)).tolist() for b in batches]
    for b in batches[:12]:
        first.weights(ctx(b))
    for load_first in (True, False):  # the glue's order of set_run_length and load_state_dict does not matter
        resumed = LossTruncation(drop_fraction=0.3)
        if load_first:
            resumed.load_state_dict(first.state_dict())
            resumed.set_run_length(1000)
        else:
            resumed.set_run_length(1000)
            resumed.load_state_dict(first.state_dict())
        assert (resumed.buffer_size, resumed.min_samples) == (24, 24)
        assert [resumed.weights(ctx(b)).tolist() for b in batches[12:]] == expected[12:]


# ---- loss: the noisy-data failure watch ------------------------------------------------------------------------------


def synthetic_losses(step: int, noisy: bool, n: int = 32, seed: int = 0, hard: bool = False) -> list[float]:
    """One step's per-sample losses of a model learning from scratch (vocabulary of 2048: ln 2048 ≈ 7.6): clean
    samples fall from 7.6 towards 2–4 (easy to hard), with noise; ``hard``: towards 1.2 for a third of them and 6.3
    for the rest (the built-in corpus: arithmetic vs code and prose); ``noisy``: 30% of them are random tokens, whose
    loss stays at ≈ 7.6 and drifts up as the model grows confident."""
    rng = np.random.default_rng(seed * 1000 + step)
    hardness = np.where(rng.random(n) < 1 / 3, 1.2, 6.3) if hard else rng.uniform(2.0, 4.0, n)
    clean = hardness + (7.6 - hardness) * math.exp(-step / 15) + rng.normal(0, 0.15, n)
    if noisy:
        bad = rng.random(n) < 0.3
        clean[bad] = 7.6 + 0.004 * step + rng.normal(0, 0.05, int(bad.sum()))
    return clean.tolist()


def run_loss_weighting(noisy: bool, mode: str, steps: int = 60, hard: bool = False) -> list[warnings.WarningMessage]:
    strategy = LossReweighting()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            c = ctx(synthetic_losses(step, noisy, hard=hard), step=step)
            if mode == "score":
                strategy.weights(c)
            else:
                strategy.local_weights(c)
                strategy.end_step(c)
    return [w for w in caught if "sample_weighting='loss'" in str(w.message)]


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("mode", ["score", "rescale"])
def test_loss_warns_once_on_a_stuck_high_loss_tail(mode, hard):
    caught = run_loss_weighting(noisy=True, mode=mode, hard=hard)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "truncation" in message and re.search(r"highest-loss \d+% of the samples", message) and "median" in message


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("mode", ["score", "rescale"])
def test_loss_does_not_warn_on_clean_learning(mode, hard):
    assert run_loss_weighting(noisy=False, mode=mode, hard=hard) == []


def test_loss_watch_can_be_turned_off_and_skips_warmup():
    strategy = LossReweighting(watch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(60):
            strategy.weights(ctx(synthetic_losses(step, noisy=True), step=step))
    warm = LossReweighting(warmup_steps=1000)  # nothing watched during the warm-up
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(60):
            warm.weights(ctx(synthetic_losses(step, noisy=True), step=step))


def test_tail_stats_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 9.0], dtype=torch.float64)  # top tenth of 4 samples: the highest, {9}
    stats = tail_stats(losses, torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64))
    assert stats.median == 2.0  # torch's median of an even count is the lower middle value
    assert stats.tail_mean == 9.0 and stats.tail_share == 0.25 and stats.tail_weight == pytest.approx(2 / 5)
