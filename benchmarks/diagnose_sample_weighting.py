"""Why a loss-based sample weighting loses to uniform weights on corrupted samples: implementation, default or nature?

A toy anyone can re-run in seconds (no language model): softmax regression on Gaussian clusters, of which a known
share of the training labels (``--rate``, 0.3) is replaced by a random class. Full-batch SGD with the per-sample
weights of each method (the step objective ``Σ v_i ℓ_i / Σ v_i`` of METHODS §0), evaluated on clean held-out data.
Per method and knob setting it reports:

- ``max |Δw| vs authors``: for Sow et al. (``loss``), the largest difference, over every step, between the weights
  hfweight computes (:class:`hfweight.strategies.sample.LossReweighting`, score mode) and an independent transcription
  of the authors' update rule (``h_func`` → ``f_func_<strategy>`` → ``g_func`` softmax with ``kl_reg``, then
  ``g / g.sum()``; ``sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025`` ``src/trainer.py``), both fed the same
  losses; for truncation the same against a transcription of ``ddkang/loss_dropper`` (``LossDropper``); 0 means the
  implementation follows the authors step by step;
- ``weight on corrupted``: the mean share of the step's total weight that lands on the corrupted samples (uniform:
  the corruption rate);
- the clean held-out loss after the run, and the share of the uniform → oracle gap it closes (oracle: uniform
  weights without the corrupted samples).

    python benchmarks/diagnose_sample_weighting.py            # ~10 s
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from harness import save_results  # noqa: E402

from hfweight.strategies.base import SampleContext  # noqa: E402
from hfweight.strategies.sample import LossReweighting, LossTruncation  # noqa: E402

# ---- the authors' rules, transcribed independently (numpy, no hfweight code) ------------------------------------------


def authors_sow_weights(losses: np.ndarray, strategy: str, kl_reg: float) -> np.ndarray:
    """Sow et al.'s GPT-2 code with ``delta=1``: ``h = (2ℓ − (max + min)) / (max − min)``; ``f`` per strategy;
    ``g = exp((f − max f) / kl_reg)``; weights ``g / Σ g`` (returned times N: mean 1, as the code's
    ``* world_size * len(device_weights)``)."""
    lo, hi = losses.min(), losses.max()
    h = (2 * losses - (hi + lo)) / max(hi - lo, 1e-6)
    f = {"linupper": np.minimum(h + 1, 1), "quadratic": 1 - h**2, "extremes": np.abs(h), "upper": 0.5 * h + 0.5}[strategy]
    g = np.exp((f - f.max()) / kl_reg)
    return g / g.sum() * len(losses)


class AuthorsLossDropper:
    """``ddkang/loss_dropper``'s ``LossDropper``: a ring buffer of ``recompute`` losses; once ``count > min_count``
    (and every ``recompute`` losses) the cutoff is the ``(1 − dropc)`` percentile of the buffer; weight 0 above it.
    Transcribed with the order hfweight documents (the cutoff comes from earlier steps) so the two can be compared."""

    def __init__(self, dropc: float, recompute: int, min_count: int):
        self.dropc, self.recompute, self.min_count = dropc, recompute, min_count
        self.buffer: list[float] = []
        self.count, self.since, self.cutoff = 0, 0, None

    def weights(self, losses: np.ndarray) -> np.ndarray:
        if self.count >= self.min_count and (self.cutoff is None or self.since >= self.recompute):
            self.cutoff = float(np.percentile(self.buffer, 100 * (1 - self.dropc)))
            self.since = 0
        out = np.ones_like(losses) if self.cutoff is None else (losses <= self.cutoff).astype(float)
        self.buffer = (self.buffer + losses.tolist())[-self.recompute :]
        self.count += len(losses)
        self.since += len(losses)
        return out


# ---- the toy --------------------------------------------------------------------------------------------------------


def toy_data(n: int, dim: int, classes: int, rate: float, seed: int):
    """(x, noisy labels, corrupted mask, clean test x, test labels): Gaussian clusters, ``rate`` of labels random."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 1.0, size=(classes, dim))

    def draw(m):
        y = g.integers(0, classes, size=m)
        return centers[y] + g.normal(0, 1.2, size=(m, dim)), y

    x, y = draw(n)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[g.choice(n, size=int(round(rate * n)), replace=False)] = True
    noisy = y.copy()
    noisy[corrupted] = (y[corrupted] + g.integers(1, classes, size=corrupted.sum())) % classes  # always wrong
    xt, yt = draw(2000)
    return x, noisy, corrupted, xt, yt


def train(method, x, y, corrupted, xt, yt, steps: int, lr: float, batch: int, seed: int) -> dict:
    """SGD on minibatches (same order for every method); ``method(losses, step) -> (ours, authors)`` weights."""
    g = torch.Generator().manual_seed(seed)
    dim, classes = x.shape[1], int(max(y.max(), yt.max()) + 1)
    w = torch.zeros(dim, classes, dtype=torch.float64, requires_grad=True)
    xs, ys = torch.tensor(x), torch.tensor(y)
    order = torch.randperm(len(x), generator=g)
    shares, gaps = [], []
    for step in range(steps):
        idx = order[(step * batch) % len(x) : (step * batch) % len(x) + batch]
        if len(idx) < batch:
            order = torch.randperm(len(x), generator=g)
            idx = order[:batch]
        losses = torch.nn.functional.cross_entropy(xs[idx] @ w, ys[idx], reduction="none")
        ours, authors = method(losses.detach(), step)
        if authors is not None:
            gaps.append(float(np.abs(ours.numpy() - authors).max()))
        v = ours.to(torch.float64)
        if v.sum() > 0:
            shares.append(float(v[torch.tensor(corrupted)[idx]].sum() / v.sum()))
            loss = (v * losses).sum() / v.sum()
            w.grad = None
            loss.backward()
            with torch.no_grad():
                w -= lr * w.grad
    with torch.no_grad():
        test = float(torch.nn.functional.cross_entropy(torch.tensor(xt) @ w, torch.tensor(yt)))
    return {"test_loss": test, "weight_on_corrupted": float(np.mean(shares)), "max_diff_vs_authors": max(gaps, default=None)}


def uniform(losses, step):
    return torch.ones_like(losses), None


def sow(strategy: str, r: float):
    strategy_obj = LossReweighting(strategy=strategy, temperature=r, mode="score")

    def method(losses, step):
        ours = strategy_obj.weights(SampleContext(losses=losses, step=step)).double()
        authors = None if math.isinf(r) else authors_sow_weights(losses.numpy(), strategy, r)
        return ours, authors

    return method


def truncation(drop: float, window: int):
    ours_obj = LossTruncation(drop_fraction=drop, buffer_size=window, min_samples=window, recompute_every=window)
    authors_obj = AuthorsLossDropper(drop, window, window)

    def method(losses, step):
        return ours_obj.weights(SampleContext(losses=losses, step=step)).double(), authors_obj.weights(losses.numpy())

    return method


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    run_samples = args.steps * args.batch
    methods = {
        "uniform": lambda: uniform,
        **{f"loss linupper r={r:g}": (lambda r=r: sow("linupper", r)) for r in (0.2, 0.4, 1.0, 4.0, math.inf)},
        **{f"loss quadratic r={r:g}": (lambda r=r: sow("quadratic", r)) for r in (0.2, 0.4, 1.0, 4.0)},
        "loss extremes r=0.4": lambda: sow("extremes", 0.4),
        **{f"truncation drop={d:g}": (lambda d=d: truncation(d, max(1, run_samples // 10))) for d in (0.2, 0.3, 0.4)},
        "truncation drop=0.4, authors' 10000 window": lambda: truncation(0.4, 10000),
    }
    rows = {name: [] for name in ["oracle", *methods]}
    for seed in args.seeds:
        x, y, corrupted, xt, yt = toy_data(2000, 8, 4, args.rate, seed)
        keep = ~corrupted
        rows["oracle"].append(train(uniform, x[keep], y[keep], corrupted[keep], xt, yt, args.steps, 0.5, args.batch, seed))
        for name, make in methods.items():
            rows[name].append(train(make(), x, y, corrupted, xt, yt, args.steps, 0.5, args.batch, seed))
    lines = [
        f"### Sample weighting on corrupted samples, toy diagnosis (softmax regression, {args.rate:.0%} of labels wrong)",
        "",
        f"{len(args.seeds)} seeds, {args.steps} SGD steps x {args.batch} samples; truncation windows scaled with the run "
        f"({max(1, run_samples // 10)} samples) unless named; mean ± std over seeds.",
        "",
        "| method | clean test loss | gap closed | weight on corrupted | max abs diff vs authors' rule |",
        "|---|---|---|---|---|",
    ]
    uniform_loss = [r["test_loss"] for r in rows["uniform"]]
    oracle_loss = [r["test_loss"] for r in rows["oracle"]]
    summary = {}
    for name, runs in rows.items():
        losses = [r["test_loss"] for r in runs]
        gap = [(u - v) / (u - o) for u, v, o in zip(uniform_loss, losses, oracle_loss)]
        share = [r["weight_on_corrupted"] for r in runs]
        diffs = [r["max_diff_vs_authors"] for r in runs if r["max_diff_vs_authors"] is not None]
        summary[name] = {"test_loss": losses, "gap_closed": gap, "weight_on_corrupted": share, "max_diff": diffs}
        lines.append(
            f"| {name} | {np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} | {np.mean(gap):.2f} ± {np.std(gap, ddof=1):.2f} "
            f"| {np.mean(share):.2f} | {max(diffs):.1e} |" if diffs else
            f"| {name} | {np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} | {np.mean(gap):.2f} ± {np.std(gap, ddof=1):.2f} "
            f"| {np.mean(share):.2f} | – |"
        )
    lines += ["", "Command: `python benchmarks/diagnose_sample_weighting.py " + " ".join(argv or sys.argv[1:]) + "`"]
    markdown = "\n".join(lines) + "\n"
    print(markdown)
    save_results("sample_diagnosis_toy", {"settings": vars(args), "summary": summary}, markdown, indent=1)
    return summary


if __name__ == "__main__":
    main()
