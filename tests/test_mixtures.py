"""Domain-mixture controllers: each update against an independent NumPy re-implementation or hand-computed numbers.

Expected values never call the module's own math (no mix_update/floor_probabilities in the expectations).
"""

from __future__ import annotations

import io
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from hfweight.registry import MIXTURES
from hfweight.strategies.base import DomainStats
from hfweight.strategies.mixture import floor_probabilities, mix_update

NAMES = ["code", "math", "prose"]
SIZES = torch.tensor([10.0, 20.0, 70.0], dtype=torch.float64)


def build(name, names=NAMES, sizes=SIZES, **kwargs):
    m = MIXTURES.build(name, kwargs)
    m.bind(list(names), sizes)
    return m


def stats(step, loss=(2.0, 1.0, 3.0), tokens=(4.0, 2.0, 3.0), samples=None, excess=None, ref_loss=None):
    """One step's DomainStats from per-domain *means* (``loss``, ``ref_loss``) and sums (``excess``)."""
    tokens_t = torch.tensor(tokens, dtype=torch.float64)
    loss_t = torch.tensor(loss, dtype=torch.float64) * tokens_t  # loss_sum = mean × tokens
    samples_t = torch.tensor(samples if samples is not None else [1.0 if t > 0 else 0.0 for t in tokens], dtype=torch.float64)
    excess_t = None if excess is None else torch.tensor(excess, dtype=torch.float64)
    ref_t = None if ref_loss is None else torch.tensor(ref_loss, dtype=torch.float64) * tokens_t
    return DomainStats(loss_sum=loss_t, token_count=tokens_t, sample_count=samples_t, step=step, excess_sum=excess_t,
                       ref_loss_sum=ref_t)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def close(tensor, expected, tol=1e-12):
    np.testing.assert_allclose(tensor.numpy(), np.asarray(expected, dtype=np.float64), rtol=0, atol=tol)


# ---- the shared update --------------------------------------------------------------------------------------------


def test_floor_takes_mass_proportionally():
    p = floor_probabilities(torch.tensor([0.9, 0.09999, 0.00001], dtype=torch.float64), 0.01)
    # the third is raised to 0.01; the others share 0.99 in their ratio 0.9 : 0.09999
    close(p, [0.99 * 0.9 / 0.99999, 0.99 * 0.09999 / 0.99999, 0.01])
    # a second round: scaling pushes another entry under the floor
    p = floor_probabilities(torch.tensor([0.985, 0.01002, 0.00498], dtype=torch.float64), 0.01)
    close(p, [0.98, 0.01, 0.01])


def test_mix_update_matches_numpy():
    log_p = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    A = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.0, 1.0]], dtype=torch.float64)
    signal = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    out = mix_update(log_p, signal, 0.7, A=A, smoothing=0.1)
    s = np.array([1.0, 0.0, 2.0])  # NaN counts as 0
    z = np.log([0.5, 0.3, 0.2]) + 0.7 * (A.numpy() @ s)
    expected = 0.9 * np_softmax(z) + 0.1 / 3
    close(torch.exp(out), expected)


def test_mix_update_guards_inf_and_collapse():
    log_p = torch.log(torch.full((3,), 1 / 3, dtype=torch.float64))
    out = torch.exp(mix_update(log_p, torch.tensor([float("inf"), 0.0, 0.0]), 1.0, min_prob=1e-4))
    close(out, [1 - 2e-4, 1e-4, 1e-4])
    assert torch.isfinite(out).all()


# ---- static / temperature / schedule ------------------------------------------------------------------------------


def test_static_still_works():
    m = build("static", weights={"code": 2, "math": 1})
    close(m.probabilities(), [2 / 3, 1 / 3, 0.0])  # exact: static is not floored
    close(build("static").probabilities(), [0.1, 0.2, 0.7])


@pytest.mark.parametrize("tau,expected", [(1, [0.1, 0.2, 0.7]), ("inf", [1 / 3] * 3), (2, None)])
def test_temperature(tau, expected):
    if expected is None:
        r = np.sqrt([10.0, 20.0, 70.0])
        expected = r / r.sum()
    close(build("temperature", temperature=tau, min_prob=0).probabilities(), expected)


def test_temperature_streaming_needs_sizes():
    m = MIXTURES.build("temperature", {"temperature": 2, "sizes": {"code": 1, "math": 4, "prose": 4}})
    m.bind(NAMES, None)
    close(m.probabilities(), [1 / 5, 2 / 5, 2 / 5])
    with pytest.raises(ValueError, match="needs the domain sizes"):
        build("temperature", sizes=None, temperature=2).bind(NAMES, None)


def test_schedule_piecewise_and_end_upsampling():
    m = build("schedule", stages=[{"until": 0.8, "temperature": "inf"}, {"until": 1.0, "weights": {"math": 3, "code": 1}}], min_prob=0)
    m.set_total_steps(10)
    seen = []
    for step in range(10):
        seen.append(m.probabilities())
        m.observe(stats(step))
    for p in seen[:8]:
        close(p, [1 / 3] * 3)
    for p in seen[8:]:
        close(p, [0.25, 0.75, 0.0])


def test_schedule_interpolates_in_log_space():
    m = build("schedule", stages=[{"until": 0.0, "temperature": 5}, {"until": 1.0, "temperature": 1}], interpolate=True, min_prob=0)
    m.set_total_steps(4)
    m.observe(stats(1))  # 2 of 4 steps done: halfway, 1/τ = (1/5 + 1)/2 = 0.6
    w = np.array([10.0, 20.0, 70.0]) ** 0.6
    close(m.probabilities(), w / w.sum())
    m = build("schedule", stages=[{"until": 0.8, "temperature": "inf"}, {"until": 1.0, "weights": [3, 1, 0]}], interpolate=True, min_prob=0)
    m.set_total_steps(10)
    m.observe(stats(8))  # fraction 0.9: t = 0.5 → √(1/3 · [0.75, 0.25, 0])
    w = np.sqrt(np.array([0.75, 0.25, 0.0]) / 3)
    close(m.probabilities(), w / w.sum())


def test_schedule_needs_total_steps():
    m = build("schedule", stages=[{"until": 1.0, "temperature": 2}])
    m.probabilities()  # step 0 is fine
    with pytest.raises(RuntimeError, match="set_total_steps"):
        m.observe(stats(0))


# ---- DoReMi -------------------------------------------------------------------------------------------------------


def test_doremi_excess_loss_with_absent_domain():
    m = build("doremi", eta=1.0, smoothing=1e-3, min_prob=0)
    assert m.needs_reference
    # step 1: prose absent (0 tokens) → its score stays the initial 0
    m.observe(stats(0, tokens=(4, 2, 0), excess=(2.0, 1.0, 0.0)))
    w0 = np.full(3, 1 / 3)
    scores = np.array([0.5, 0.5, 0.0])
    w1 = 0.999 * np_softmax(np.log(w0) + scores) + 1e-3 / 3
    close(m.probabilities(), w1)
    # step 2: code absent → keeps its previous score 0.5 (the authors' perdomain_scores buffer)
    m.observe(stats(1, tokens=(0, 3, 2), excess=(0.0, 3.0, 1.0)))
    scores = np.array([0.5, 1.0, 0.5])
    w2 = 0.999 * np_softmax(np.log(w1) + scores) + 1e-3 / 3
    close(m.probabilities(), w2)
    average = (w0 + w1 + w2) / 3
    close(m.average_probabilities(), average)
    close(m.final_probabilities(), average)


def test_doremi_requires_reference_losses():
    with pytest.raises(ValueError, match="excess losses over a reference model"):
        build("doremi").observe(stats(0))
    with pytest.raises(ValueError, match=r"mixture_kwargs\['clip'\]='domain' needs per-domain reference losses"):
        build("doremi", clip="domain").observe(stats(0, excess=(1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match=r"mixture_kwargs\['clip'\] must be one of \['token', 'domain'\]"):
        build("doremi", clip="sample")


def test_doremi_domain_clip_takes_the_token_mean_before_the_clip():
    """clip='domain': λ_d = max(mean ℓ − mean ℓ_ref, 0) (hand-worked), a domain absent keeps its last score."""
    m = build("doremi", eta=1.0, smoothing=1e-3, min_prob=0, clip="domain")
    # means: loss (2.0, 1.0, 3.0), reference (1.5, 1.25, 0.0) → gaps (0.5, −0.25, 3.0) → scores (0.5, 0, 3.0);
    # prose absent → its initial score 0
    m.observe(stats(0, tokens=(4, 2, 0), excess=(9.0, 9.0, 9.0), ref_loss=(1.5, 1.25, 0.0)))
    w0 = np.full(3, 1 / 3)
    w1 = 0.999 * np_softmax(np.log(w0) + np.array([0.5, 0.0, 0.0])) + 1e-3 / 3
    close(m.probabilities(), w1)
    m.observe(stats(1, loss=(2.0, 3.0, 1.0), tokens=(0, 2, 5), excess=(0.0, 0.0, 0.0), ref_loss=(0.0, 1.0, 0.75)))
    w2 = 0.999 * np_softmax(np.log(w1) + np.array([0.5, 2.0, 0.25])) + 1e-3 / 3
    close(m.probabilities(), w2)


def test_doremi_domain_clip_does_not_feed_per_token_noise():
    """Per-token noise around a zero mean gap (data neither model can learn) has a positive *clipped* mean: with
    clip='token' the noisy domain gains weight over one with a small real gap; with clip='domain' it does not.
    Token differences are built explicitly and summed here, as the trainer does."""
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(400, generator=gen, dtype=torch.float64)  # ℓ − ℓ_ref: mean ≈ 0, spread 1
    noisy = noisy - noisy.mean()  # exactly zero mean gap
    real = torch.full((400,), 0.1, dtype=torch.float64)  # a small, real gap: the proxy can still learn this domain
    ref = torch.full((400,), 2.0, dtype=torch.float64)
    rows = {"code": real, "math": noisy, "prose": torch.zeros(400, dtype=torch.float64)}
    step = DomainStats(
        loss_sum=torch.stack([(ref + rows[d]).sum() for d in NAMES]),
        token_count=torch.full((3,), 400.0, dtype=torch.float64),
        sample_count=torch.full((3,), 4.0, dtype=torch.float64),
        excess_sum=torch.stack([rows[d].clamp(min=0).sum() for d in NAMES]),
        ref_loss_sum=torch.full((3,), float(ref.sum()), dtype=torch.float64),
    )
    by_token, by_domain = build("doremi", eta=1.0), build("doremi", eta=1.0, clip="domain")
    for s in range(20):
        step.step = s
        by_token.observe(step)
        by_domain.observe(step)
    p_token, p_domain = by_token.probabilities(), by_domain.probabilities()
    code, math_, prose = (NAMES.index(d) for d in ("code", "math", "prose"))
    assert p_token[math_] > 0.9  # E[max(X, 0)] = 0.4 for X ~ N(0, 1): the noise wins
    # e^{20 steps · 0.1} ≈ 7.4 against 1 and 1 (before the 1e-3 smoothing): ≈ 0.79
    assert p_domain[code] > 0.75 and float(p_domain[math_]) == pytest.approx(float(p_domain[prose]), rel=1e-9)


# ---- ODM ----------------------------------------------------------------------------------------------------------


class NumpyExp3:
    """Independent re-implementation of Exp3WeightUpdater (alon-albalak/online-data-mixing), group form."""

    def __init__(self, k, smoothed=None):
        self.k, self.smoothed = k, smoothed
        self.R = np.zeros(k)
        self.p = np.full(k, 1 / k)
        self.eps = 1 / k

    def update(self, t, losses):
        for d, loss in losses.items():
            r = (loss / 10) / self.p[d]
            self.R[d] = self.R[d] + r if self.smoothed is None else self.smoothed * self.R[d] + (1 - self.smoothed) * r
        prev, self.eps = self.eps, min(1 / self.k, math.sqrt(math.log(self.k) / (self.k * t)))
        e = np.array([math.exp(r * prev) for r in self.R])
        w = e * (1 - self.k * self.eps) / e.sum() + self.eps
        self.p = w / w.sum()


@pytest.mark.parametrize("reward,beta", [("exp3", None), ("smoothed_mean", 0.9)])
def test_odm_exp3_steps(reward, beta):
    m = build("odm", warmup_steps=2, reward=reward, min_prob=0)
    ref = NumpyExp3(3, smoothed=beta)
    plan = [((2.0, 1.0, 3.0), (4, 2, 3)), ((2.5, 1.0, 9.0), (4, 0, 3)), ((1.5, 1.2, 2.0), (1, 1, 1)),
            ((2.0, 4.0, 3.0), (0, 2, 0)), ((1.0, 1.0, 1.0), (2, 2, 2)), ((3.0, 0.5, 2.5), (4, 2, 1))]
    for step, (loss, tokens) in enumerate(plan):
        m.observe(stats(step, loss=loss, tokens=tokens))
        t = step + 1
        if t > 2:
            ref.update(t, {d: loss[d] for d in range(3) if tokens[d] > 0})
        close(m.probabilities(), ref.p)
    assert not np.allclose(ref.p, 1 / 3)  # the test exercised a non-trivial update


def test_odm_warmup_is_uniform_and_nan_loss_is_skipped():
    m = build("odm", warmup_steps=5)
    for step in range(5):
        m.observe(stats(step, loss=(9.0, 1.0, 1.0)))
        close(m.probabilities(), [1 / 3] * 3)
    for step in range(5, 40):
        m.observe(stats(step, loss=(float("nan"), 1.0, 2.0)))
        p = m.probabilities()
        assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-12 and (p >= 1e-4).all()


# ---- Aioli --------------------------------------------------------------------------------------------------------


def _run_aioli_round(m, A_true, losses):
    """Drive one LearnParams phase: the held-out loss drops are exactly W_probe · A_trueᵀ."""
    assert m.eval_requested()
    m.observe_eval(torch.tensor(losses), 0)
    probed, step = [], m._step
    while m.wants_probe() is not None:
        probe = m.wants_probe().numpy()
        assert np.isclose(probe.max(), m.one_hot_factor) and np.isclose(probe.sum(), 1)
        probed.append(int(probe.argmax()))
        np.testing.assert_allclose(m.probabilities().numpy(), probe)
        for _ in range(m.lp_steps):
            assert not m.eval_requested()
            m.observe(stats(step))
            step += 1
        assert m.eval_requested()
        with pytest.raises(RuntimeError, match="observe_eval"):
            m.observe(stats(step))
        losses = losses - A_true @ probe  # drop of eval domain i = Σ_l probe_l · A[i, l]
        m.observe_eval(torch.tensor(losses), step)
    return probed, step, losses


def test_aioli_estimates_A_on_a_toy():
    A_true = np.array([[0.5, 0.1, 0.0], [0.2, 0.4, 0.1], [0.0, 0.3, 0.6]])
    m = build("aioli", lp_rounds=1, lp_steps=2, update_every=10, ema=None, normalize_A=False, eta=1.0, min_prob=0)
    probed, step, _ = _run_aioli_round(m, A_true, np.array([5.0, 5.0, 5.0]))
    assert sorted(probed) == [0, 1, 2]
    np.testing.assert_allclose(m.last_A.numpy(), A_true, atol=1e-12)
    close(m.probabilities(), np_softmax(np.log(np.full(3, 1 / 3)) + A_true.sum(axis=0)))
    # the rest of the round trains on the learned mixture; the next round starts at step 10
    while step < 10:
        assert m.wants_probe() is None and not m.eval_requested()
        m.observe(stats(step))
        step += 1
    assert m.eval_requested()
    learned = m.probabilities()
    m.observe_eval(torch.tensor([4.0, 4.0, 4.0]), step)
    assert m.wants_probe() is not None and torch.equal(m.final_probabilities(), learned)


def test_aioli_normalized_ema_over_two_rounds():
    A1 = np.array([[0.5, 0.1, 0.0], [0.2, 0.4, 0.1], [0.0, 0.3, 0.6]])
    A2 = np.array([[0.1, -0.2, 0.0], [0.0, 0.3, 0.1], [0.2, 0.0, 0.2]])
    m = build("aioli", lp_rounds=2, lp_steps=1, update_every=10, ema=0.1, eta=1.0, min_prob=0)

    def normalized(A):
        A = A - min(A.min(), 0)
        return A / A.sum()

    _, step, losses = _run_aioli_round(m, A1, np.array([5.0, 5.0, 5.0]))
    close(m.probabilities(), np_softmax(np.log(np.full(3, 1 / 3)) + normalized(A1).sum(axis=0)), tol=1e-10)
    while step < 10:
        m.observe(stats(step))
        step += 1
    _run_aioli_round(m, A2, losses)
    ema = 0.9 * normalized(A2) + 0.1 * normalized(A1)
    close(m.probabilities(), np_softmax(np.log(np.full(3, 1 / 3)) + ema.sum(axis=0)), tol=1e-10)


def test_aioli_config_errors():
    with pytest.raises(ValueError, match="must exceed 1/k"):
        build("aioli", one_hot_factor=0.3)
    with pytest.raises(ValueError, match=r"k·lp_rounds·lp_steps = 3·2·10 = 60 steps"):
        build("aioli", lp_rounds=2, lp_steps=10, update_every=50)


# ---- Skill-it -----------------------------------------------------------------------------------------------------


GRAPH = [[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0]]


def test_skillit_3x3_graph():
    m = build("skillit", graph=GRAPH, eta=0.5, window=2, update_every=2, min_prob=0)
    A, p0 = np.array(GRAPH), np.full(3, 1 / 3)
    close(m.probabilities(), np_softmax(np.log(p0) + 0.5 * A @ np.ones(3)))  # the authors' loss_init = 1
    evals = {0: [3.0, 2.0, 1.0], 2: [2.5, 2.0, 0.5], 4: [2.0, 1.5, float("nan")]}
    expected_after = {
        2: np.array([3.0, 2.0, 1.0]) + np.array([2.5, 2.0, 0.5]),
        4: np.array([2.5, 2.0, 0.5]) + np.array([2.0, 1.5, 0.0]),  # window 2; NaN counts 0
    }
    assert m.eval_requested()
    m.observe_eval(torch.tensor(evals[0]), 0)
    for step in range(4):
        assert not m.eval_requested()
        m.observe(stats(step))
        done = step + 1
        if done in evals:
            assert m.eval_requested()
            m.observe_eval(torch.tensor(evals[done]), done)
            close(m.probabilities(), np_softmax(np.log(p0) + 0.5 * A @ expected_after[done]))


def test_skillit_graph_files_and_wrong_shape(tmp_path):
    path = tmp_path / "g.json"
    path.write_text(json.dumps(GRAPH))
    np.save(tmp_path / "g.npy", np.array(GRAPH))
    a = build("skillit", graph=str(path)).probabilities()
    b = build("skillit", graph=str(tmp_path / "g.npy")).probabilities()
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"has shape 2×2; expected 3×3 for the domains \['code', 'math', 'prose'\]"):
        build("skillit", graph=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="does not exist"):
        MIXTURES.build("skillit", {"graph": str(tmp_path / "missing.npy")})


# ---- DGA ----------------------------------------------------------------------------------------------------------


def test_dga_alignment_update():
    m = build("dga", eta=0.5, update_every=2, min_prob=0, normalize="doge", prior_pull=0, signal_clip=None)  # the paper's
    assert m.needs_target and m.gradients_requested()
    m.observe_gradients(torch.tensor([1.0, 0.0, -1.0]), 0)
    w1 = np_softmax(np.log(np.full(3, 1 / 3)) + 0.5 * np.array([1.0, 0.0, -1.0]))
    close(m.probabilities(), w1)
    m.observe(stats(0))
    assert not m.gradients_requested()
    m.observe(stats(1))
    assert m.gradients_requested()
    m.observe_gradients(torch.tensor([float("nan"), 2.0, 0.0]), 2)  # NaN: domain absent, unchanged
    close(m.probabilities(), np_softmax(np.log(w1) + 0.5 * np.array([0.0, 2.0, 0.0])))
    e = build("dga", eta=0.5, ema=0.8, min_prob=0, prior_pull=0, signal_clip=None)
    e.observe_gradients(torch.tensor([1.0, 0.0, -1.0]), 0)
    close(e.probabilities(), 0.8 / 3 + 0.2 * w1)


def test_dga_cosine_signal_and_prior_pull():
    """normalize='cosine': s_d = ⟨g_d, g_t⟩ / (‖g_d‖·‖g_t‖) (hand-worked); prior_pull ρ: log α ← (1 − ρ)·log α +
    ρ·log α_0 + η·s, whose fixed point under a constant signal is α ∝ α_0·exp(η/ρ · s) (iterated to convergence)."""
    from hfweight.strategies.mixture import alignment_signal

    ip, sq = torch.tensor([6.0, 0.0, float("nan")]), torch.tensor([4.0, 9.0, 1.0])
    got = alignment_signal(ip, sq, 9.0, normalize="cosine")  # ‖g_t‖ = 3: 6 / (2·3) = 1, 0 / (3·3) = 0, NaN
    assert got[:2].tolist() == pytest.approx([1.0, 0.0], abs=1e-6) and math.isnan(got[2])
    doge = alignment_signal(ip, sq)  # mean norm over the present domains: (2 + 3) / 2
    assert doge[:2].tolist() == pytest.approx([6.0 / 2.5, 0.0], rel=1e-6)
    with pytest.raises(ValueError, match="needs the target gradient's squared norm"):
        alignment_signal(ip, sq, normalize="cosine")
    with pytest.raises(ValueError, match=r"mixture_kwargs\['normalize'\] must be one of"):
        build("dga", normalize="l2")
    with pytest.raises(ValueError, match=r"mixture_kwargs\['prior_pull'\]"):
        build("dga", prior_pull=1.0)

    m = build("dga", eta=0.5, prior_pull=0.25, signal_clip=None, min_prob=0,
              initial_weights={"code": 2.0, "math": 1.0, "prose": 1.0})
    signal = torch.tensor([0.0, 0.4, -0.2])
    m.observe_gradients(signal, 0)  # one update by hand
    prior = np.array([0.5, 0.25, 0.25])
    z = 0.75 * np.log(prior) + 0.25 * np.log(prior) + 0.5 * signal.numpy()
    close(m.probabilities(), np_softmax(z))
    for step in range(1, 200):
        m.observe_gradients(signal, step)
    close(m.probabilities(), np_softmax(np.log(prior) + 0.5 / 0.25 * signal.numpy()))
    # the defaults are the paper's; the junk-domain setting (cosine, η 2, ρ 0.1, clip 0.2): a steady signal beyond
    # the clip counts as ±0.2, and the mixture settles at α_0·exp(η/ρ · 0.2) = α_0·e^4 for that domain
    paper = build("dga")
    assert (paper.normalize, paper.eta, paper.prior_pull, paper.signal_clip) == ("doge", 1e-3, 0.0, None)
    d = build("dga", min_prob=0, normalize="cosine", eta=2.0, prior_pull=0.1, signal_clip=0.2)
    for step in range(300):
        d.observe_gradients(torch.tensor([0.9, 0.0, float("nan")]), step)
    close(d.probabilities(), np_softmax(np.log(np.full(3, 1 / 3)) + 20 * np.array([0.2, 0.0, 0.0])))


def test_dga_target_rows_shuffle_each_cycle_the_same_way_on_every_call():
    """target_rows: each cycle through the n target rows is a permutation (every row once), cycles differ, the rows
    depend only on (call, size, n, seed) — what every rank and a resumed run compute — and a batch mixes the
    concatenated held-out sets instead of taking one set's rows in file order."""
    from hfweight.glue.drivers.alignment import target_rows

    n, size = 12, 5
    stream = [r for call in range(12) for r in target_rows(call, size, n, seed=3)]  # 60 rows = 5 cycles
    cycles = [stream[i * n : (i + 1) * n] for i in range(5)]
    assert all(sorted(c) == list(range(n)) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1
    assert target_rows(7, size, n, seed=3) == stream[35:40]
    assert target_rows(0, size, n, seed=4) != target_rows(0, size, n, seed=3)
    first = target_rows(0, 6, 12, seed=0)  # two held-out sets of 6 rows concatenated: rows 0-5 and 6-11
    assert any(r < 6 for r in first) and any(r >= 6 for r in first)


# ---- policy -------------------------------------------------------------------------------------------------------


def test_policy_sees_history_and_output_is_used():
    calls = []

    def policy(history):
        calls.append(history)
        return {"prose": 1.0, "code": 3.0}

    m = build("policy", policy=policy, min_prob=0)
    m.observe_eval(torch.tensor([1.0, 2.0, float("nan")]), 0)
    m.observe(stats(0, tokens=(4, 0, 3)))
    close(m.probabilities(), [0.75, 0.0, 0.25])
    entry = calls[0][-1]
    assert entry["step"] == 1 and entry["losses"] == {"code": 2.0, "math": None, "prose": 3.0}
    assert entry["probabilities"] == pytest.approx({"code": 1 / 3, "math": 1 / 3, "prose": 1 / 3})
    assert entry["eval_losses"] == {"code": 1.0, "math": 2.0, "prose": None} and entry["eval_step"] == 0


@pytest.mark.parametrize(
    "output,message",
    [
        ({"poetry": 1.0}, r"returned \{'poetry': 1.0\}: unknown domain\(s\) \['poetry'\]"),
        ([1.0, -1.0, 1.0], r"the weight of 'math' is -1.0"),
        ([1.0, float("nan"), 1.0], r"the weight of 'math' is nan"),
        ([1.0, 1.0], r"2 weights for 3 domains"),
        ([0, 0, 0], r"every weight is 0"),
    ],
)
def test_policy_output_errors(output, message):
    def bad_policy(history):
        return output

    m = build("policy", policy=bad_policy)
    with pytest.raises(ValueError, match=r"The mixture policy .*bad_policy returned .*" + message.split("returned ")[-1]):
        m.observe(stats(0))


def test_policy_import_path(monkeypatch):
    module = types.ModuleType("my_policies")
    module.favor_math = lambda history: [0, 1, 0]
    monkeypatch.setitem(sys.modules, "my_policies", module)
    m = build("policy", policy="my_policies:favor_math", min_prob=0)
    m.observe(stats(0))
    close(m.probabilities(), [0, 1, 0])
    with pytest.raises(ValueError, match="cannot be imported"):
        MIXTURES.build("policy", {"policy": "my_policies:nope"})


# ---- shared guarantees --------------------------------------------------------------------------------------------

ALL = {
    "temperature": dict(temperature=2),
    "schedule": dict(stages=[{"until": 0.5, "temperature": 3}, {"until": 1.0, "weights": [1, 2, 3]}], interpolate=True),
    "doremi": dict(),
    "odm": dict(warmup_steps=2),
    "aioli": dict(lp_rounds=1, lp_steps=1, update_every=5),
    "skillit": dict(graph=GRAPH, update_every=2),
    "dga": dict(update_every=2, ema=0.5),
    "policy": dict(policy=lambda h: [1 + h[-1]["step"] % 3, 1, 2]),
    "learning_progress": dict(eta=0.5, ema=0.5, history_size=6),
}


def drive(m, steps, start=0, rng_seed=0):
    """Run a controller through `steps` optimizer steps with deterministic pseudo-random statistics."""
    rng = np.random.default_rng(rng_seed + start)
    k = len(m.domain_names)
    for step in range(start, start + steps):
        if m.eval_requested():
            m.observe_eval(torch.tensor(rng.uniform(1, 5, k)), step)
        tokens = rng.integers(0, 4, k).astype(float)
        m.observe(stats(step, loss=tuple(rng.uniform(0.5, 4, k)), tokens=tuple(tokens), excess=tuple(rng.uniform(0, 2, k) * tokens)))
        if m.gradients_requested():
            m.observe_gradients(torch.tensor(rng.normal(size=k)), step + 1)


def _fresh(name):
    m = build(name, **ALL[name])
    m.set_total_steps(20)
    return m


@pytest.mark.parametrize("name", sorted(ALL))
def test_exact_state_round_trip(name):
    a = _fresh(name)
    drive(a, 7)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = _fresh(name)
    b.load_state_dict(torch.load(buffer, weights_only=False))
    assert torch.equal(a.probabilities(), b.probabilities())
    drive(a, 9, start=7)
    drive(b, 9, start=7)
    assert torch.equal(a.probabilities(), b.probabilities())
    assert torch.equal(a.final_probabilities(), b.final_probabilities())


@pytest.mark.parametrize("name", sorted(ALL))
def test_single_domain_is_always_one(name):
    kwargs = dict(ALL[name])
    if name == "skillit":
        kwargs["graph"] = [[1.0]]
    if name == "schedule":
        kwargs["stages"] = [{"until": 1.0, "weights": [1]}]
    if name == "policy":
        kwargs["policy"] = lambda h: [5.0]
    m = build(name, names=["only"], sizes=torch.tensor([5.0], dtype=torch.float64), **kwargs)
    m.set_total_steps(20)
    assert m.eval_requested() is False and m.wants_probe() is None
    for step in range(6):
        m.observe(DomainStats(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0]), step, torch.tensor([1.0])))
        if m.gradients_requested():
            m.observe_gradients(torch.tensor([3.0]), step)
        assert m.probabilities().tolist() == [1.0]


@pytest.mark.parametrize("name", sorted(ALL))
def test_probabilities_are_floored_and_finite(name):
    m = _fresh(name)
    drive(m, 15)
    p = m.probabilities()
    assert p.dtype == torch.float64 and p.shape == (3,)
    assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-9
    if m.wants_probe() is None:
        assert (p >= 1e-4 - 1e-15).all()


def test_collapse_guard_and_nan_loss():
    m = build("doremi", eta=50.0, smoothing=0.0)  # an aggressive step that would collapse to one domain
    for step in range(20):
        m.observe(stats(step, excess=(40.0, 0.0, 0.0)))
    close(m.probabilities(), [1 - 2e-4, 1e-4, 1e-4])
    with pytest.warns(UserWarning, match="non-finite excess loss"):
        m.observe(stats(20, excess=(float("nan"), 1.0, 0.0)))
    p = m.probabilities()
    assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-12


# ---- bad configurations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("schedule", dict(stages=[{"until": 0.8, "temperature": 2}, {"until": 0.5, "temperature": 1}]), r"strictly increasing 'until'"),
        ("schedule", dict(stages=[{"until": 0.8, "temperature": 2}]), r"must end at until: 1.0"),
        ("schedule", dict(stages=[{"until": 1.0, "temperature": 2, "weights": [1, 1, 1]}]), r"exactly one of"),
        ("schedule", dict(stages=[{"until": 1.0, "weights": {"code": -1}}]), r"gives domain 'code' the weight -1"),
        ("schedule", dict(stages=[{"until": 1.0, "temp": 2}]), r"unknown key\(s\) \['temp'\]"),
        ("temperature", dict(temperature=0), r"must be > 0"),
        ("doremi", dict(initial_weights=[1, -2, 1]), r"gives domain 1 the weight -2"),
        ("doremi", dict(eta=-1), r"'eta'\] must be a finite number > 0"),
        ("odm", dict(reward="ucb"), r"'exp3' or 'smoothed_mean'"),
        ("skillit", dict(), r"needs mixture_kwargs\['graph'\]"),
        ("policy", dict(), r"needs mixture_kwargs\['policy'\]"),
        ("static", dict(weights={"code": float("nan")}), r"weights must be finite"),
    ],
)
def test_bad_config_at_construction(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MIXTURES.build(name, kwargs)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("schedule", dict(stages=[{"until": 1.0, "weights": {"poetry": 1}}]), r"unknown domain\(s\) \['poetry'\]"),
        ("doremi", dict(initial_weights={"poetry": 1}), r"unknown domain\(s\) \['poetry'\]"),
        ("odm", dict(min_prob=0.5), r"too large for 3 domains"),
    ],
)
def test_bad_config_at_bind(name, kwargs, message):
    m = MIXTURES.build(name, kwargs)
    with pytest.raises(ValueError, match=message):
        m.bind(NAMES, SIZES)


def test_every_planned_mixture_is_registered():
    for name in ("static", "temperature", "schedule", "doremi", "odm", "aioli", "skillit", "dga", "policy",
                 "learning_progress"):
        assert name in MIXTURES
