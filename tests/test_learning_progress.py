"""The learning-progress mixture (Graves et al. 2017, Exp3.S with a progress reward): the rescaling and the Exp3.S
update against hand-worked numbers, whole steps against an independent NumPy re-implementation, the property it exists
for (a domain of irreducible loss is sampled less, where ODM samples it more), and the trainer: resample and upweight
runs whose every mixture replays from the observed statistics, exact resume, and streaming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import toy_dataset
from helpers_mixture import NAMES, _by_step, _stream, _stream_trainer, _trainer
from test_mixtures import build, close, stats

from hfweight.strategies.mixture import exp3s_weights, rescale_progress

# ---- the pieces, by hand ------------------------------------------------------------------------------------------


def test_rescale_by_hand():
    history = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    # 20th percentile: position 0.2·4 = 0.8 → 0.8; 80th: position 3.2 → 3.2; span 2.4
    got = rescale_progress(torch.tensor([2.0, 0.5, 3.0, 9.0], dtype=torch.float64), history, 0.2, 0.8)
    close(got, [2 * 1.2 / 2.4 - 1, -1.0, 2 * 2.2 / 2.4 - 1, 1.0])
    # nothing to rank against: 0
    close(rescale_progress(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([5.0, 5.0]), 0.2, 0.8), [0, 0])
    close(rescale_progress(torch.tensor([1.0], dtype=torch.float64), torch.zeros(0), 0.2, 0.8), [0])


def test_exp3s_by_hand():
    # w = 0, r = (1, 0, −1), η = 1, α = 0.3, k = 3: z = (1, 0, −1), each weight mixes in α/2 of the others' mass
    e = [math.e, 1.0, 1 / math.e]
    w = [math.log(0.7 * e[i] + 0.15 * (sum(e) - e[i])) for i in range(3)]
    close(exp3s_weights(torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 0.0, -1.0]), 1.0, 0.3),
          np.array(w) - max(w))
    # α = 0: plain exponential weights, shifted to max 0
    close(exp3s_weights(torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0]), 0.25, 0.0), [0.0, 0.0])


# ---- whole steps vs NumPy -----------------------------------------------------------------------------------------


class NumpyLearningProgress:
    """Independent re-implementation: EMA progress, pooled sliding-window quantile rescaling, Exp3.S, ε-uniform."""

    def __init__(self, k, eta, eps, share, beta, q=(0.2, 0.8), size=500, iw=False, per_share=True):
        self.k, self.eta, self.eps, self.share, self.beta, self.q, self.size, self.iw = k, eta, eps, share, beta, q, size, iw
        self.per_share = per_share
        self.w = np.zeros(k)
        self.ema = [None] * k
        self.hist = []
        self.p = np.full(k, 1 / k)

    def update(self, losses):  # {domain: loss} of the domains present
        prog = {d: (self.ema[d] - loss) / (self.p[d] if self.per_share else 1.0)
                for d, loss in losses.items() if self.ema[d] is not None}
        for d, loss in losses.items():
            self.ema[d] = loss if self.ema[d] is None else self.beta * self.ema[d] + (1 - self.beta) * loss
        if not prog:
            return
        self.hist = (self.hist + [prog[d] for d in sorted(prog)])[-self.size:]
        lo, hi = np.quantile(self.hist, self.q[0]), np.quantile(self.hist, self.q[1])
        r = np.zeros(self.k)
        for d, x in prog.items():
            r[d] = 0.0 if hi <= lo else min(1.0, max(-1.0, 2 * (x - lo) / (hi - lo) - 1))
            if self.iw:
                r[d] /= self.p[d]
        z = self.w + self.eta * r
        e = np.exp(z - z.max())
        mixed = (1 - self.share) * e + self.share / (self.k - 1) * (e.sum() - e)
        self.w = np.log(mixed) - np.log(mixed).max()
        s = np.exp(self.w) / np.exp(self.w).sum()
        self.p = (1 - self.eps) * s + self.eps / self.k


@pytest.mark.parametrize("iw,per_share", [(False, True), (True, False), (False, False)])
def test_steps_match_numpy(iw, per_share):
    m = build("learning_progress", eta=0.7, epsilon=0.1, share=0.01, ema=0.5, history_size=4, importance_weighting=iw,
              per_share=per_share, min_prob=0)
    ref = NumpyLearningProgress(3, 0.7, 0.1, 0.01, 0.5, size=4, iw=iw, per_share=per_share)
    plan = [((4.0, 3.0, 5.0), (4, 2, 3)), ((3.5, 3.0, 5.2), (4, 0, 3)), ((3.0, 2.9, 4.9), (1, 1, 1)),
            ((2.0, 4.0, 5.0), (0, 2, 0)), ((2.5, 2.0, 5.1), (2, 2, 2)), ((2.2, 1.5, 4.8), (4, 2, 1)),
            ((2.0, 1.4, 5.0), (3, 3, 3))]
    for step, (loss, tokens) in enumerate(plan):
        m.observe(stats(step, loss=loss, tokens=tokens))
        ref.update({d: loss[d] for d in range(3) if tokens[d] > 0})
        close(m.probabilities(), ref.p, tol=1e-12)
    assert np.ptp(ref.p) > 0.05  # the plan moved the mixture


def test_junk_is_sampled_less_while_odm_chases_it():
    """Domain 0 ('code' here) has a flat, high loss with noise (random characters); the others fall. After 150 steps
    learning progress gives it the least probability (under half of uniform); ODM (loss as reward) gives it the most."""
    lp, odm = build("learning_progress"), build("odm", warmup_steps=0)
    rng = np.random.default_rng(0)
    for step in range(150):
        loss = (6.0 + rng.normal(0, 0.05), 4.0 * math.exp(-step / 60) + 1 + rng.normal(0, 0.05),
                3.0 * math.exp(-step / 90) + 1.5 + rng.normal(0, 0.05))
        for m in (lp, odm):
            m.observe(stats(step, loss=loss, tokens=(4, 4, 4)))
    p_lp, p_odm = lp.probabilities(), odm.probabilities()
    assert p_lp[0] < 0.5 / 3 and p_lp[0] == p_lp.min(), p_lp  # under half its uniform share
    assert p_odm[0] == p_odm.max(), p_odm


@pytest.mark.parametrize(
    "kwargs,message",
    [({"quantiles": (0.8, 0.2)}, r"0 ≤ low < high ≤ 1"), ({"epsilon": 1.5}, r"'epsilon'\] must be in \[0, 1\]"),
     ({"eta": 0}, r"'eta'\] must be a finite number > 0"), ({"history_size": 1}, r"'history_size'\] must be an integer ≥ 2"),
     ({"share": 1.0}, r"'share'\] must be in \[0, 1\)")],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build("learning_progress", **kwargs)


# ---- through the trainer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["resample", "upweight"])
def test_trainer_mixture_replays_from_the_observed_statistics(tmp_path, mode):
    """Every step's mixture (logged) equals a fresh controller fed the per-domain losses the trainer logged: the glue
    calls observe once per optimizer step with the step's token-mean losses, and the mixture it trains on is the
    controller's."""
    kwargs = {"eta": 0.5, "ema": 0.5}
    trainer = _trainer(tmp_path, toy_dataset(40), max_steps=8, per_device_train_batch_size=6,
                       gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch", mixture="learning_progress",
                       mixture_mode=mode, mixture_kwargs=kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    replay = build("learning_progress", **kwargs)
    for h in logs:
        losses = [h.get(f"domain_loss/{n}") for n in NAMES]
        present = [v is not None and math.isfinite(v) for v in losses]
        replay.observe(stats(h["step"] - 1, loss=tuple(v if ok else 0.0 for v, ok in zip(losses, present)),
                             tokens=tuple(1.0 if ok else 0.0 for ok in present)))
        # the step's log carries the mixture after the controller observed the step
        close(torch.tensor([h[f"mixture/{n}"] for n in NAMES], dtype=torch.float64), replay.probabilities(), tol=1e-6)
    assert len(logs) == 8
    close(trainer.mixture.probabilities(), replay.probabilities(), tol=1e-6)
    assert not torch.allclose(trainer.mixture.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)


def test_resume_is_exact(tmp_path):
    """6 steps straight equal 3 + checkpoint + resume + 3: the same losses, per-domain losses and mixtures."""

    def make(out, steps):
        return _trainer(out, toy_dataset(40), max_steps=steps, per_device_train_batch_size=2,
                        gradient_accumulation_steps=2, learning_rate=1e-2, optim="adamw_torch", save_strategy="steps",
                        save_steps=3, mixture="learning_progress", mixture_mode="resample",
                        mixture_kwargs={"eta": 1.0, "ema": 0.5})

    straight = make(tmp_path / "straight", 6)
    straight.train()
    make(tmp_path / "resumed", 3).train()
    resumed = make(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    def logged(trainer):
        keys = ["loss"] + [f"mixture/{n}" for n in NAMES] + [f"domain_loss/{n}" for n in NAMES]
        return {h["step"]: tuple(h.get(k, math.nan) for k in keys) for h in trainer.state.log_history if "loss" in h}

    expected, got = logged(straight), logged(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, nan_ok=True), step
    assert len({v[1:4] for v in expected.values()}) >= 3  # the mixture moved
    assert torch.equal(resumed.mixture.probabilities(), straight.mixture.probabilities())


def test_streaming_resample_resumes_exactly(tmp_path):
    """Over a MixtureIterableDataset: 6 steps straight equal 3 + checkpoint + resume + 3, row for row."""
    kwargs = {"eta": 2.0, "ema": 0.5}
    straight = _stream_trainer(tmp_path / "straight", 6, _stream(), "learning_progress", kwargs)
    straight.train()
    _stream_trainer(tmp_path / "resumed", 3, _stream(), "learning_progress", kwargs).train()
    resumed = _stream_trainer(tmp_path / "resumed", 6, _stream(), "learning_progress", kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = _by_step(straight), _by_step(resumed)
    for step in (3, 4, 5):
        assert got[step] == expected[step], step
    assert torch.equal(resumed.mixture.probabilities(), straight.mixture.probabilities())
    assert not torch.allclose(straight.mixture.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)
