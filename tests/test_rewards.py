"""Reward weighting strategies (docs/methods.md#rewards) against independent re-implementations on hand-made reward
matrices."""

import math

import numpy as np
import pytest
import torch

from hfweight.registry import REWARD_WEIGHTINGS
from hfweight.strategies.rewards import NelderMead, clip_gram, gram_from_gradients

NAN = float("nan")
NAMES = ["acc", "fmt", "len"]

# 6 rows × 3 rewards: one all-NaN row (ignored), one NaN in "fmt" (ignored for that column only)
R1 = torch.tensor(
    [
        [1.0, 0.5, -3.0],
        [0.0, 1.0, -1.0],
        [1.0, NAN, -2.0],
        [NAN, NAN, NAN],
        [0.0, 0.0, -5.0],
        [1.0, 1.0, -4.0],
    ]
)
R2 = torch.tensor([[0.0, 1.0, -2.0], [0.0, 1.0, -1.5], [1.0, 0.0, -0.5], [0.0, 1.0, -1.0]])
R3 = torch.tensor([[1.0, 1.0, -1.0], [1.0, 0.0, -1.2], [NAN, 1.0, NAN], [1.0, 1.0, -0.2]])
BATCHES = [R1, R2, R3, R1 * 2, R2 - 1, R3 + 0.5]


def build(name, names=NAMES, initial=None, **kwargs):
    w = REWARD_WEIGHTINGS.build(name, kwargs)
    w.bind(names, torch.ones(len(names)) if initial is None else torch.tensor(initial, dtype=torch.float32))
    return w


def col_stats(batch):
    """numpy: drop all-NaN rows; per column nanmean and population nanstd (ddof 0)."""
    a = batch.double().numpy()
    a = a[~np.isnan(a).all(axis=1)]
    return np.nanmean(a, axis=0), np.nanstd(a, axis=0), a


def assert_close(actual, expected, tol=1e-6):
    assert actual.dtype == torch.float32 and actual.shape == (len(expected),)
    np.testing.assert_allclose(actual.double().numpy(), np.asarray(expected, dtype=float), rtol=tol, atol=tol)


# ---- static -------------------------------------------------------------------------------------------------------


def test_static_config_list_and_dict():
    assert_close(build("static", initial=[1.0, 0.5, -0.2]).weights(R1, 0), [1.0, 0.5, -0.2])
    assert_close(build("static", weights=[2, 1, 0]).weights(R1, 0), [2, 1, 0])
    assert_close(build("static", weights={"len": 0.1, "acc": 3, "fmt": 1}).weights(R1, 0), [3, 1, 0.1])


def test_static_bad_weights_name_k_and_the_reward_functions():
    with pytest.raises(ValueError, match=r"K = 3.*acc.*fmt.*len"):
        build("static", weights=[1, 2])
    with pytest.raises(ValueError, match=r"unknown reward function.*'speed'"):
        build("static", weights={"acc": 1, "fmt": 1, "len": 1, "speed": 2})
    with pytest.raises(ValueError, match=r"no entry for reward function.*'len'"):
        build("static", weights={"acc": 1, "fmt": 1})
    with pytest.raises(ValueError, match="finite"):
        REWARD_WEIGHTINGS.build("static", {"weights": [1, float("inf"), 1]})
    w = REWARD_WEIGHTINGS.build("static")
    with pytest.raises(ValueError, match=r"`reward_weights` has 2 entries but there are K = 3"):
        w.bind(NAMES, torch.ones(2))


# ---- PopArt -------------------------------------------------------------------------------------------------------


def popart_reference(batches, w0, beta, min_std=1e-4, max_std=1e6, fixed_sum=False):
    """Plain-python PopArt: EMA of batch means of r and r², Adam-style debiasing per column."""
    k = len(w0)
    mu, nu, t = [0.0] * k, [0.0] * k, [0] * k
    out = []
    for batch in batches:
        _, _, a = col_stats(batch)
        for j in range(k):
            col = a[:, j][~np.isnan(a[:, j])]
            if col.size == 0:
                continue
            mu[j] = (1 - beta) * mu[j] + beta * col.mean()
            nu[j] = (1 - beta) * nu[j] + beta * (col**2).mean()
            t[j] += 1
        w = []
        for j in range(k):
            c = 1 - (1 - beta) ** t[j]
            m, v = mu[j] / c, nu[j] / c
            sd = min(math.sqrt(max(v - m * m, 0.0)), max_std)
            w.append(w0[j] / sd if sd >= min_std else 0.0)
        if all(x == 0 for x in w):
            w = list(w0)
        elif fixed_sum:
            scale = sum(abs(x) for x in w0) / sum(abs(x) for x in w)
            w = [x * scale for x in w]
        out.append(w)
    return out


@pytest.mark.parametrize("beta,fixed_sum", [(3e-4, False), (0.2, False), (0.2, True)])
def test_popart_matches_reference(beta, fixed_sum):
    w0 = [1.0, 2.0, 0.5]
    w = build("popart", initial=w0, beta=beta, fixed_sum=fixed_sum)
    expected = popart_reference(BATCHES, w0, beta, fixed_sum=fixed_sum)
    for step, (batch, exp) in enumerate(zip(BATCHES, expected)):
        assert_close(w.weights(batch, step), exp)
    if fixed_sum:
        assert w.current_weights().abs().sum().item() == pytest.approx(3.5)


def test_popart_first_batch_is_the_batch_std_and_offset_normalizes():
    w = build("popart", beta=3e-4)
    out = w.weights(R1, 0)
    mean, std, _ = col_stats(R1)
    assert_close(out, 1.0 / std)  # debiasing makes the first statistics the batch's own
    rows = torch.tensor([[1.0, 0.5, -3.0], [0.0, 0.0, -5.0]], dtype=torch.float64)
    normalized = rows @ out.double() - w.offset()
    expected = ((rows.numpy() - mean) / std).sum(axis=1)
    np.testing.assert_allclose(normalized.numpy(), expected, rtol=1e-5)


def test_popart_constant_reward_gets_zero_and_all_constant_gives_initial():
    batch = torch.tensor([[1.0, 0.2], [1.0, 0.8], [1.0, 0.5]])
    w = build("popart", names=["a", "b"], initial=[1.0, 1.0], beta=0.5)
    out = w.weights(batch, 0)
    assert out[0] == 0 and out[1] == pytest.approx(1 / np.std([0.2, 0.8, 0.5]), rel=1e-6)
    w = build("popart", names=["a", "b"], initial=[1.0, 3.0])
    assert_close(w.weights(torch.tensor([[1.0, 2.0], [1.0, 2.0]]), 0), [1.0, 3.0])
    # N = 1: zero variance everywhere on the first batch -> initial weights, never NaN
    w = build("popart", initial=[1.0, 2.0, 3.0])
    assert_close(w.weights(R1[:1], 0), [1.0, 2.0, 3.0])


# ---- SAW ----------------------------------------------------------------------------------------------------------


def saw_reference(batch, w0, statistic="cv", eps=1e-8, gamma=None, reward_max=None, tol=0.0):
    mean, std, a = col_stats(batch)
    k = len(w0)
    if statistic == "cv":
        s = [std[j] / max(abs(mean[j]), eps) for j in range(k)]
    elif statistic == "std":
        s = list(std)
    else:
        s = [1.0] * k
    w = [w0[j] * s[j] for j in range(k)]
    if gamma is not None:
        for j in range(k):
            col = a[:, j][~np.isnan(a[:, j])]
            top = reward_max[j] if reward_max and reward_max[j] is not None else col.max()
            sat = np.mean(col >= top - tol)
            w[j] *= (1 - sat) ** gamma
    total = sum(abs(x) for x in w)
    if total == 0:
        return list(w0)
    return [x * sum(abs(v) for v in w0) / total for x in w]  # the total of the initial weights is kept


@pytest.mark.parametrize("statistic", ["cv", "std", "none"])
def test_saw_matches_reference(statistic):
    w0 = [1.0, 2.0, 0.5]
    w = build("saw", initial=w0, statistic=statistic)
    for step, batch in enumerate(BATCHES):
        assert_close(w.weights(batch, step), saw_reference(batch, w0, statistic))


def test_saw_default_is_k_cv_over_sum_cv():
    mean, std, _ = col_stats(R1)
    cv = std / np.abs(mean)
    assert_close(build("saw").weights(R1, 0), 3 * cv / cv.sum())


def test_saw_saturation_variant():
    w0 = [1.0, 1.0, 1.0]
    kwargs = dict(saturation_gamma=2.0, reward_max={"acc": 1.0, "fmt": 1.0})  # "len" uses the batch max
    w = build("saw", initial=w0, **kwargs)
    for step, batch in enumerate(BATCHES[:3]):
        expected = saw_reference(batch, w0, gamma=2.0, reward_max=[1.0, 1.0, None])
        assert_close(w.weights(batch, step), expected)
    sat = w.saturation(R1)
    np.testing.assert_allclose(sat.numpy(), [3 / 5, 2 / 4, 1 / 5])


def test_saw_constant_objective_and_all_constant():
    batch = torch.tensor([[1.0, 0.2, 3.0], [1.0, 0.8, 1.0], [1.0, 0.5, 2.0]])
    out = build("saw").weights(batch, 0)
    assert out[0] == 0 and torch.isfinite(out).all() and out.sum().item() == pytest.approx(3.0)
    assert_close(build("saw", initial=[1, 2, 3]).weights(torch.ones(4, 3), 0), [1, 2, 3])
    # N = 1 and a column that is NaN everywhere
    assert_close(build("saw", initial=[1, 2, 3]).weights(R1[:1], 0), [1, 2, 3])
    only = torch.tensor([[1.0, NAN, 2.0], [3.0, NAN, 2.5]])
    out = build("saw").weights(only, 0)
    assert out[1] == 0 and torch.isfinite(out).all()


def test_all_nan_rows_are_ignored_everywhere():
    clean = R1[~torch.isnan(R1).all(dim=1)]
    for name, kwargs in [("saw", {}), ("popart", {"beta": 0.1}), ("constrained", {"thresholds": [0.5, -2.0]})]:
        a, b = build(name, **kwargs), build(name, **kwargs)
        for step in range(3):
            assert torch.equal(a.weights(R1, step), b.weights(clean, step)), name
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        build("saw").weights(torch.ones(4, 2), 0)


# ---- single objective ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:reward_weighting='constrained' sets the weights")
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("static", {}),
        ("saw", {"saturation_gamma": 1.0}),
        ("hypervolume", {}),
        ("gradient", {}),
        ("constrained", {}),
    ],
)
def test_single_objective_keeps_the_initial_weight(name, kwargs):
    w = build(name, names=["only"], initial=[0.7], **kwargs)
    for step, batch in enumerate([torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0]]), torch.tensor([[NAN], [1.0]])]):
        if name == "hypervolume":
            w.observe_validation([float(step)], step)
        if name == "gradient":
            w.update_from_gram([[4.0]], step)
        assert_close(w.weights(batch, step), [0.7])


# ---- hypervolume --------------------------------------------------------------------------------------------------


def test_hypervolume_scalar_multiplier():
    w = build("hypervolume", names=["a", "b"], initial=[1.0, 2.0], variant="scalar", reference_margin=1e-3)
    assert_close(w.weights(R2[:, :2], 0), [1.0, 2.0])  # before any validation
    assert w.observe_validation([0.5, 0.5], 0) == 0.0  # sets the reference (0.499, 0.499)
    assert_close(w.weights(R2[:, :2], 1), [1.0, 2.0])  # m stays 1 after the first validation
    gain = w.observe_validation([0.6, 0.5], 1)
    # new region: box of (0.6,0.5) minus the box of (0.5,0.5), both from (0.499, 0.499)
    expected_gain = 0.101 * 0.001 - 0.001 * 0.001
    assert gain == pytest.approx(expected_gain, rel=1e-9)
    m = 0.5 + 1.5 * math.tanh(expected_gain)
    assert_close(w.weights(R2[:, :2], 2), [m, 2 * m])
    assert w.observe_validation([0.55, 0.45], 2) == 0.0  # dominated by (0.6, 0.5)
    assert_close(w.weights(R2[:, :2], 3), [0.5, 1.0])
    assert w.multiplier == 0.5


def test_hypervolume_per_objective_moves_toward_the_improving_objective():
    eta = 0.3
    w = build("hypervolume", names=["a", "b"], initial=[1.0, 1.0], eta=eta, reference_margin=0.01)
    w.observe_validation([0.0, 0.0], 0)
    assert_close(w.weights(R2[:, :2], 0), [1.0, 1.0])
    w.observe_validation([0.2, 0.0], 1)  # only "a" improved: all the gain is a's
    e = math.exp(eta)
    assert_close(w.weights(R2[:, :2], 1), [2 * e / (e + 1), 2 / (e + 1)])

    # both improve from (0.2, 0): ref (-0.01, -0.01); archive {(0,0), (0.2,0)}
    w2 = build("hypervolume", names=["a", "b"], initial=[1.0, 3.0], eta=eta, reference_margin=0.01)
    w2.observe_validation([0.0, 0.0], 0)
    w2.observe_validation([0.2, 0.0], 1)
    log_p = np.log([0.25, 0.75]) + eta * np.array([1.0, 0.0])
    p = np.exp(log_p) / np.exp(log_p).sum()
    assert_close(w2.current_weights(), 4 * p)
    a, b, d = 0.1, 0.3, 0.01
    gain = w2.observe_validation([0.3, 0.3], 2)
    hv_old = (0.2 + d) * d  # union of the boxes of (0,0) and (0.2,0) from (-d,-d)
    assert gain == pytest.approx((0.3 + d) * (0.3 + d) - hv_old, rel=1e-9)
    # removing a's improvement: (0.2, 0.3) -> gain (0.2+d)(0.3+d) - hv_old; removing b's: (0.3, 0) -> (0.3+d)d - hv_old
    c_a = gain - ((0.2 + d) * (0.3 + d) - hv_old)
    c_b = gain - ((0.3 + d) * d - hv_old)
    assert c_a == pytest.approx(a * (0.3 + d), rel=1e-9) and c_b == pytest.approx(b * (0.3 + d), rel=1e-9)
    log_p = np.log(p) + eta * np.array([c_a, c_b]) / (c_a + c_b)
    p = np.exp(log_p) / np.exp(log_p).sum()
    assert_close(w2.weights(R2[:, :2], 3), 4 * p)
    # no gain (dominated): no move
    w2.observe_validation([0.1, 0.1], 3)
    assert_close(w2.weights(R2[:, :2], 4), 4 * p)


def test_hypervolume_validation_errors_and_nan():
    w = build("hypervolume")
    with pytest.raises(ValueError, match="must not contain NaN"):
        w.observe_validation([NAN, 0.0, 0.0], 0)
    with pytest.raises(ValueError, match="K = 3"):
        w.observe_validation([0.0, 0.0], 0)
    w.observe_validation([0.0, 0.0, 0.0], 0)
    with pytest.warns(UserWarning, match="NaN"):
        w.observe_validation([0.5, NAN, 0.0], 1)
    with pytest.raises(ValueError, match=r"initial\s+weight must be > 0"):
        build("hypervolume", initial=[1.0, 0.0, 1.0])


# ---- gradient -----------------------------------------------------------------------------------------------------


def test_gradient_update_from_a_given_gram():
    S = np.array([[1.0, 0.2, -0.1], [0.2, 0.5, 0.0], [-0.1, 0.0, 0.3]])
    w0 = np.array([1.0, 1.0, 2.0])
    w = build("gradient", initial=w0.tolist())  # lr 1e-6, reg 1e-5: eta = 0.1
    assert_close(w.weights(R1, 0), w0)
    w.update_from_gram(torch.tensor(S), 0)
    log_p = np.log(w0 / w0.sum()) + 0.1 * S.sum(axis=1)
    p = np.exp(log_p) / np.exp(log_p).sum()
    assert_close(w.weights(R1, 1), 4 * p)
    w.update_from_gram(S * 2, 1, lr=2e-6)  # the glue passes the scheduler's current lr: eta = 0.2
    log_p = np.log(p) + 0.2 * (2 * S).sum(axis=1)
    p = np.exp(log_p) / np.exp(log_p).sum()
    assert_close(w.weights(R1, 2), 4 * p)


def test_gradient_accumulation_and_bad_gram():
    S1, S2 = np.diag([1.0, 0.0]), np.array([[0.0, 1.0], [1.0, 3.0]])
    w = build("gradient", names=["a", "b"], accumulation_steps=2, lr=1e-5, reg=1e-5)
    w.update_from_gram(S1, 0)
    assert_close(w.current_weights(), [1.0, 1.0])  # nothing until the 2nd call
    w.update_from_gram(S2, 1)
    s = (S1.sum(axis=1) + S2.sum(axis=1)) / 2
    p = np.exp(s) / np.exp(s).sum()
    assert_close(w.weights(R2[:, :2], 2), 2 * p)
    with pytest.raises(ValueError, match=r"\(2, 2\) Gram"):
        w.update_from_gram(np.eye(3), 3)
    with pytest.warns(UserWarning, match="not updated"):
        w.update_from_gram([[NAN, 0.0], [0.0, 1.0]], 3)
    assert_close(w.current_weights(), 2 * p)


def test_gram_from_gradients_clips_each_gradient():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4]), torch.tensor([0.0, -2.0])]
    S = gram_from_gradients(g, clip_norm=1.0)
    coef = [1 / (5 + 1e-6), 1.0, 1 / (2 + 1e-6)]  # clip_grad_norm_'s min(1, c / (norm + 1e-6))
    G = np.stack([c * x.double().numpy() for c, x in zip(coef, g)])
    np.testing.assert_allclose(S.numpy(), G @ G.T, rtol=1e-12)
    # norms of the full gradient (the vectors being a layer subset), and the sharded path: clip the summed partial Gram
    S_full = gram_from_gradients(g, clip_norm=1.0, norms=[10.0, 0.5, 4.0])
    coef = [1 / (10 + 1e-6), 1.0, 1 / (4 + 1e-6)]
    G = np.stack([c * x.double().numpy() for c, x in zip(coef, g)])
    np.testing.assert_allclose(S_full.numpy(), G @ G.T, rtol=1e-12)
    shards = [gram_from_gradients([x[:1] for x in g], None), gram_from_gradients([x[1:] for x in g], None)]
    np.testing.assert_allclose(clip_gram(shards[0] + shards[1], 1.0).numpy(), S.numpy(), rtol=1e-12)
    assert torch.equal(gram_from_gradients(g, None), torch.stack(g).double() @ torch.stack(g).double().T)


# ---- constrained --------------------------------------------------------------------------------------------------


def _sig(x):
    return 1 / (1 + math.exp(-x))


def constrained_reference(batches, task, constraints, tau, lr, mom, clip, squash="sigmoid", theta0=0.0, k=3):
    """Their mixed-advantage weights with the multipliers before each step, then one SGD+momentum dual step."""
    f = _sig if squash == "sigmoid" else math.tanh
    df = (lambda x: _sig(x) * (1 - _sig(x))) if squash == "sigmoid" else (lambda x: 1 - math.tanh(x) ** 2)
    n = len(constraints)
    theta, buf, out = [theta0] * n, None, []
    for batch in batches:
        lam = [f(t) for t in theta]
        w = [0.0] * k
        w[task] = n - sum(lam)
        for j, i in enumerate(constraints):
            w[i] = lam[j]
        out.append(w)
        mean, _, _ = col_stats(batch)
        g = [df(theta[j]) * (mean[i] - tau[j]) for j, i in enumerate(constraints)]
        if clip is not None:
            norm = math.sqrt(sum(x * x for x in g))
            c = min(1.0, clip / (norm + 1e-6))
            g = [x * c for x in g]
        buf = list(g) if buf is None else [mom * b + x for b, x in zip(buf, g)]
        theta = [t - lr * b for t, b in zip(theta, buf)]
    return out, theta


@pytest.mark.parametrize("squash,clip", [("sigmoid", None), ("sigmoid", 0.5), ("tanh", None)])
def test_constrained_dual_updates_by_hand(squash, clip):
    # task = "fmt" (index 1); constraints acc ≥ 0.8 and len ≥ -2.0 (list with None at the task's place)
    kwargs = dict(thresholds=[0.8, None, -2.0], task="fmt", squash=squash, dual_lr=0.5, momentum=0.1,
                  dual_grad_clip=clip)
    w = build("constrained", **kwargs)
    batches = [R1, R2, R3, R1]
    expected, theta = constrained_reference(batches, 1, [0, 2], [0.8, -2.0], 0.5, 0.1, clip, squash)
    for step, (batch, exp) in enumerate(zip(batches, expected)):
        assert_close(w.weights(batch, step), exp)
    f = _sig if squash == "sigmoid" else math.tanh
    np.testing.assert_allclose(w.multipliers.numpy(), [f(t) for t in theta], rtol=1e-12)
    # the weights sum to n = K - 1
    assert w.current_weights().sum().item() == pytest.approx(2.0)


def test_constrained_three_steps_explicit_numbers():
    """Two rewards (task, c), τ = 0.5, θ0 = 0, lr 1, momentum 0.1, no clipping, batch means of c: 0.1, 0.9, 0.5."""
    w = build("constrained", names=["task", "c"], thresholds={"c": 0.5}, dual_lr=1.0, momentum=0.1,
              dual_grad_clip=None)
    batches = [torch.tensor([[0.0, v]], dtype=torch.float64) for v in (0.1, 0.9, 0.5)]
    # step 1: λ = 0.5 -> weights (0.5, 0.5); g = 0.25·(0.1−0.5) = −0.1; b = −0.1; θ = 0.1
    assert_close(w.weights(batches[0], 0), [0.5, 0.5])
    lam1 = _sig(0.1)
    # step 2: weights (1−λ1, λ1); g = λ1(1−λ1)·0.4; b = 0.1·(−0.1) + g; θ = 0.1 − b
    assert_close(w.weights(batches[1], 1), [1 - lam1, lam1])
    g2 = lam1 * (1 - lam1) * 0.4
    b2 = 0.1 * -0.1 + g2
    theta2 = 0.1 - b2
    lam2 = _sig(theta2)
    # step 3: violation 0 -> g = 0; b = 0.1·b2; θ = θ2 − 0.1·b2 (momentum alone still moves θ)
    assert_close(w.weights(batches[2], 2), [1 - lam2, lam2])
    theta3 = theta2 - 0.1 * b2
    assert w.multipliers.item() == pytest.approx(_sig(theta3), abs=1e-15)
    assert w.metrics()["violation/c"] == pytest.approx(0.0)


def test_constrained_violation_grows_lambda_and_nan_column_has_no_gradient():
    w = build("constrained", names=["task", "c"], thresholds=[0.9], dual_grad_clip=None)
    lam0 = w.multipliers.item()
    w.weights(torch.tensor([[1.0, 0.0], [0.0, 0.2]]), 0)  # J = 0.1 < 0.9: violated
    assert w.multipliers.item() > lam0
    w2 = build("constrained", names=["task", "c"], thresholds=[0.9])
    w2.weights(torch.tensor([[1.0, NAN], [0.0, NAN]]), 0)
    assert w2.multipliers.item() == lam0


def test_constrained_scale_by_std():
    w = build("constrained", thresholds={"acc": 0.5, "len": -3.0}, task="fmt", scale_by_std=True)
    _, std, _ = col_stats(R2)
    lam = 0.5
    assert_close(w.weights(R2, 0), [lam / std[0], (2 - 2 * lam) / std[1], lam / std[2]])


def test_constrained_bad_config():
    with pytest.raises(ValueError, match=r"2 entries; expected one per constraint reward \(1: \['len'\]"):
        build("constrained", names=["acc", "len"], thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"3 entries; expected one per constraint reward.*K = 3"):
        build("constrained", thresholds=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="needs reward_weighting_kwargs\\['thresholds'\\]"):
        build("constrained")
    with pytest.raises(ValueError, match=r"squash'\] must be one of \['sigmoid', 'tanh'\]"):
        REWARD_WEIGHTINGS.build("constrained", {"thresholds": [0.1, 0.2], "squash": "relu"})
    with pytest.raises(ValueError, match="task reward"):
        build("constrained", thresholds={"acc": 0.1, "fmt": 0.2, "len": 0.3}, task="acc")
    with pytest.raises(ValueError, match="not a reward function"):
        build("constrained", thresholds=[0.1, 0.2], task="speed")
    with pytest.warns(UserWarning, match="not used"):
        build("constrained", thresholds=[0.1, 0.2], initial=[2.0, 1.0, 1.0])


def test_nelder_mead_ask_tell_minimizes_a_quadratic_and_round_trips():
    def f(x):
        return (x[0] - 1.0) ** 2 + 2 * (x[1] + 0.5) ** 2

    nm = NelderMead([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]], tol=1e-10, max_iters=60)
    values = []
    for i in range(400):
        x = nm.ask()
        if x is None:
            break
        if i == 17:  # checkpoint in the middle of an iteration
            clone = NelderMead([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
            clone.load_state_dict(nm.state_dict())
            nm = clone
        values.append(f(x))
        nm.tell(f(x))
    assert nm.done
    np.testing.assert_allclose(nm.best(), [1.0, -0.5], atol=1e-3)
    # the first reflection by hand: simplex values 1.25, 0.75, 2.25 -> worst (0, 0.5), centroid (0.25, 0)
    assert values[3] == f([0.5, -0.5])


def test_constrained_nelder_mead_moves_thresholds():
    w = build("constrained", names=["task", "c"], thresholds=[0.5], nelder_mead=True, nm_patience=2, nm_step=0.2)
    assert w.needs_validation and w.thresholds == {"c": 0.5}
    w.observe_validation([0.3, 0.51], 0)  # within 5% of 0.5: candidate 0 evaluated at f = -0.3
    assert w.thresholds == {"c": pytest.approx(0.6)}  # next vertex: 0.5 + 0.2·0.5
    w.observe_validation([0.4, 0.1], 1)
    assert w.thresholds == {"c": pytest.approx(0.6)}  # not reached, patience left
    w.observe_validation([0.4, 0.1], 2)  # patience exhausted: f = -0.4
    # init done: simplex [0.6 (f −0.4), 0.5 (f −0.3)]; reflect the worst through the best: 0.6 + (0.6 − 0.5)
    assert w.thresholds == {"c": pytest.approx(0.7)}
    assert not build("constrained", names=["task", "c"], thresholds=[0.5]).needs_validation


# ---- state round trips --------------------------------------------------------------------------------------------


def _drive(w, name, steps):
    out = []
    for step in steps:
        batch = BATCHES[step % len(BATCHES)]
        if name == "hypervolume":
            w.observe_validation([0.1 * step, 0.3 - 0.05 * (step % 3), 0.02 * step * step], step)
        if name == "gradient":
            g = [torch.tensor([math.sin(step + i), math.cos(step * i), 0.5 * i]) for i in range(3)]
            w.update_from_gram(gram_from_gradients(g, w.clip_norm), step)
        if name == "constrained" and w.nelder_mead:
            w.observe_validation([0.1 * step, 0.5, -1.0], step)
        out.append(w.weights(batch, step))
    return out


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("static", {}),
        ("popart", {"beta": 0.1}),
        ("saw", {"saturation_gamma": 1.0}),
        ("hypervolume", {}),
        ("hypervolume", {"variant": "scalar"}),
        ("gradient", {"accumulation_steps": 3, "lr": 1e-5}),
        ("constrained", {"thresholds": [0.5, -2.0], "task": 1}),
        ("constrained", {"thresholds": [0.5, -2.0], "nelder_mead": True, "nm_patience": 1, "squash": "tanh"}),
    ],
)
def test_state_round_trip_is_exact(name, kwargs):
    n = 10
    straight = _drive(build(name, **kwargs), name, range(n))
    first = build(name, **kwargs)
    resumed = _drive(first, name, range(n // 2))
    state = first.state_dict()
    second = build(name, **kwargs)
    second.load_state_dict(state)
    assert second.state_dict() == state
    assert torch.equal(second.current_weights(), first.current_weights())
    resumed += _drive(second, name, range(n // 2, n))
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)
    assert all(torch.isfinite(x).all() for x in straight)


def test_load_state_checks_reward_names():
    state = build("popart").state_dict()
    other = build("popart", names=["acc", "fmt", "speed"])
    with pytest.raises(ValueError, match="Resume with the same reward functions"):
        other.load_state_dict(state)


# ---- registry and misc --------------------------------------------------------------------------------------------


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match=r"Unknown `reward_weighting='bogus'`. Available: \['constrained'"):
        REWARD_WEIGHTINGS.build("bogus")
    with pytest.raises(ValueError, match=r"Bad `reward_weighting_kwargs` for `reward_weighting='popart'`"):
        REWARD_WEIGHTINGS.build("popart", {"betta": 0.1})
    with pytest.raises(ValueError, match=r"beta'\] must be a finite number > 0"):
        REWARD_WEIGHTINGS.build("popart", {"beta": 0})
    with pytest.raises(ValueError, match=r"variant'\] must be one of"):
        REWARD_WEIGHTINGS.build("hypervolume", {"variant": "vector"})
    with pytest.raises(RuntimeError, match="before `bind"):
        REWARD_WEIGHTINGS.build("static").weights(R1, 0)


def test_current_weights_do_not_touch_the_state_and_metrics_are_floats():
    w = build("popart", beta=0.5)
    w.weights(R1, 0)
    state = w.state_dict()
    for _ in range(3):
        w.current_weights()
    assert w.state_dict() == state
    metrics = build("constrained", thresholds=[0.5, -2.0]).metrics()
    assert metrics["lagrange/fmt"] == 0.5 and all(isinstance(v, float) for v in metrics.values())
