"""A model-free toy of the mixture benchmark, to trace each online controller step by step and sweep its main knob in
seconds (the real benchmark costs ~5 CPU-minutes per run).

    python benchmarks/mixture_toy.py                          # every controller with its documented defaults
    python benchmarks/mixture_toy.py --sweep                  # + the main knob of each (eta / probe_fraction / warm-up)

The learner is a set of per-domain learning curves driven by how many rows of each domain were trained on:
``L_d(n) = floor_d + (start_d − floor_d)·exp(−n_eff,d / scale_d)``, ``n_eff,d = n_d + transfer · Σ_{clean j≠d} n_j``,
observed per step as the mean over the rows drawn (Gaussian row noise). Domains as in the built-in corpus: three clean
ones (slow curves, the target), ``redundant`` (near-duplicates: learned fast to a low floor) and ``noise`` (random
characters: its unigram distribution is learned in a few steps, then a high irreducible floor). The curves' constants
are rough fits to the built-in benchmark's per-domain training losses (stratified, 200 steps); the toy is a tracing
tool, not evidence of the effect size — the real numbers are in ``bench_mixture_effectiveness.py``.

What it shows: which domains each controller feeds, step by step, and where its default cannot act within the run.
Aioli gets held-out losses (the noiseless curves) for the clean domains only, as in the benchmark.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from hfweight.registry import MIXTURES
from hfweight.strategies.base import DomainStats

NAMES = ["arithmetic", "code", "noise", "prose", "redundant"]
CLEAN = ("arithmetic", "code", "prose")
CURVES = {  # start, floor, scale (rows), row noise
    "arithmetic": (5.7, 1.0, 250.0, 0.3),
    "code": (7.2, 3.2, 2500.0, 0.6),
    "prose": (7.1, 3.4, 2500.0, 0.6),
    "redundant": (6.6, 0.8, 300.0, 0.4),
    "noise": (7.0, 5.4, 60.0, 0.2),
}
TRANSFER = 0.3
BATCH, STEPS = 16, 200


def losses(n: np.ndarray) -> np.ndarray:
    clean_total = sum(n[NAMES.index(c)] for c in CLEAN)
    out = []
    for i, name in enumerate(NAMES):
        start, floor, scale, _ = CURVES[name]
        eff = n[i] + (TRANSFER * (clean_total - (n[i] if name in CLEAN else 0)) if name != "noise" else 0)
        out.append(floor + (start - floor) * math.exp(-eff / scale))
    return np.array(out)


def simulate(mixture: str, kwargs: dict, seed: int = 0, steps: int = STEPS, trace_every: int = 0) -> dict:
    controller = MIXTURES.build(mixture, dict(kwargs))
    controller.bind(list(NAMES), torch.ones(len(NAMES), dtype=torch.float64))
    if hasattr(controller, "set_total_steps"):
        controller.set_total_steps(steps)
    rng = np.random.default_rng(seed)
    n = np.zeros(len(NAMES))
    covered = np.array([name in CLEAN for name in NAMES])
    probe_steps = 0
    for step in range(steps):
        if controller.eval_requested():
            held = np.where(covered, losses(n), np.nan)
            controller.observe_eval(torch.tensor(held, dtype=torch.float64), step)
        p = controller.probabilities().numpy()
        probe_steps += controller.wants_probe() is not None
        counts = rng.multinomial(BATCH, p / p.sum())
        current = losses(n)
        mean = np.array([current[i] + rng.normal(0, CURVES[name][3]) / math.sqrt(max(c, 1))
                         for i, (name, c) in enumerate(zip(NAMES, counts))])
        tokens = counts * 63.0
        controller.observe(DomainStats(loss_sum=torch.tensor(mean * tokens), token_count=torch.tensor(tokens),
                                       sample_count=torch.tensor(counts, dtype=torch.float64), step=step))
        n += counts
        if trace_every and (step + 1) % trace_every == 0:
            print(f"    step {step + 1:>4}: " + "  ".join(f"{name[:5]} {q:.2f}" for name, q in zip(NAMES, p)))
    final = losses(n)
    return {"target": float(np.mean([final[NAMES.index(c)] for c in CLEAN])), "probe_share": probe_steps / steps,
            "mixture": dict(zip(NAMES, np.round(controller.final_probabilities().numpy(), 3).tolist()))}


RUNS = {
    "stratified": ("temperature", {"temperature": "inf"}),
    "oracle": ("static", {"weights": {c: 1.0 for c in CLEAN}}),
    "odm": ("odm", {}),
    "aioli": ("aioli", {}),
    "learning_progress": ("learning_progress", {}),
}
SWEEPS = {
    "learning_progress": ("learning_progress", "eta", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]),
    "odm": ("odm", "warmup_steps", [0, 20, 100, 2000]),
    "aioli": ("aioli", "probe_fraction", [0.05, 0.1, 0.2, 0.5]),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--trace", type=int, default=50, help="print the mixture every N steps of seed 0 (0: off)")
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")

    def row(label, mixture, kwargs):
        outs = [simulate(mixture, kwargs, seed) for seed in args.seeds]
        base = [simulate("temperature", {"temperature": "inf"}, seed)["target"] for seed in args.seeds]
        oracle = [simulate("static", {"weights": {c: 1.0 for c in CLEAN}}, seed)["target"] for seed in args.seeds]
        closed = [(b - o["target"]) / (b - q) for b, o, q in zip(base, outs, oracle)]
        print(f"| {label} | {np.mean([o['target'] for o in outs]):.3f} | {np.mean(closed):+.0%} | "
              f"{outs[0]['probe_share']:.0%} | {outs[0]['mixture']} |")

    print(f"Toy, {STEPS} steps × batch {BATCH}, seeds {args.seeds}\n")
    print("| controller | target loss | gap closed | steps in probes | final mixture (seed 0) |\n|---|---|---|---|---|")
    for label, (mixture, kwargs) in RUNS.items():
        row(label, mixture, kwargs)
    if args.sweep:
        for label, (mixture, knob, values) in SWEEPS.items():
            for value in values:
                row(f"{label} {knob}={value}", mixture, {knob: value})
    if args.trace:
        for label, (mixture, kwargs) in RUNS.items():
            if label in ("odm", "aioli", "learning_progress"):
                print(f"\n{label} (seed 0), mixture used at each step:")
                simulate(mixture, kwargs, 0, trace_every=args.trace)


if __name__ == "__main__":
    main()
