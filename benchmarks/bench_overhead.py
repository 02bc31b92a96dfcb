"""Step-time overhead of hfweight: ``transformers.Trainer`` vs ``WeightedTrainer`` with weighting off vs with static
token and sample weights, on the same model, data, order and seed.

    python benchmarks/bench_overhead.py --model tiny            # batch 8 × seq 256
    python benchmarks/bench_overhead.py --model small           # batch 8 × seq 512, ~20M parameters
    python benchmarks/bench_overhead.py --quick                 # a smoke run, under 2 minutes on 2 cores
    python benchmarks/bench_overhead.py --mixtures              # every mixture controller vs static resampling

Weighting off must cost nothing (each override calls the parent directly); static weights add the prepare phase
(the step denominator, one all-reduce when distributed) and swap the model's loss for the fused per-token
log-probabilities, which should cost about the same as the parent's cross-entropy.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import MIXTURE_VARIANTS, VARIANT_WEIGHTING, VARIANTS, quiet, variant_factories  # noqa: E402
from harness import add_timing_arguments, compare, report, resolve_timing  # noqa: E402

SEQ_LEN = {"tiny": 256, "small": 512}
BATCH_SIZE = 8
# (steps, warmup, repeats) sized for a 2-core CPU: tiny full ~3 min, quick < 1 min; a small step takes 10-20 s
# there, so small full (~7 min) has few steps and small quick is a ~1.5 min smoke test, not a measurement.
FULL = {"tiny": (15, 3, 5), "small": (3, 1, 2)}
QUICK = {"tiny": (4, 2, 1), "small": (1, 1, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SEQ_LEN), default="tiny", help="built-in model preset")
    add_timing_arguments(parser)
    parser.add_argument("--isolate", action="store_true", help="each run in a fresh subprocess (slower to start)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANT_WEIGHTING),
        default=list(VARIANTS),
        help="variants to compare; the first is the baseline of the ratios (default: %(default)s)",
    )
    parser.add_argument(
        "--mixtures",
        action="store_true",
        help="compare every mixture controller against static resampling (MIXTURE_VARIANTS; result overhead_mixtures_*)",
    )
    parser.add_argument("--name", help="result file name under benchmarks/results (default: overhead_<model>)")
    args = parser.parse_args(argv)
    if args.mixtures:
        args.variants = list(MIXTURE_VARIANTS)
        args.name = args.name or f"overhead_mixtures_{args.model}" + ("_quick" if args.quick else "")
    resolve_timing(args, FULL[args.model], QUICK[args.model])
    args.name = args.name or f"overhead_{args.model}" + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    workload = {"size": args.model, "seq_len": SEQ_LEN[args.model], "batch_size": BATCH_SIZE}
    result = compare(
        variant_factories(args.variants, **workload),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        baseline=args.variants[0],
        isolate=args.isolate,
        settings={"model": args.model, "batch": BATCH_SIZE, "seq": SEQ_LEN[args.model]},
    )
    report(result, args.name, title=f"Step-time overhead, {args.model} model")
    if args.mixtures:
        append_mean_ratios(args.name)


def append_mean_ratios(name: str) -> None:
    """Medians hide periodic costs (Aioli's evaluations, DGA's alignment every 10 steps): append paired ratios of
    *mean* step times (wall and CPU) and the slowest step, from the JSON the report wrote."""
    import json
    import statistics

    from harness import RESULTS_DIR

    with open(os.path.join(RESULTS_DIR, f"{name}.json")) as f:
        data = json.load(f)
    base = data["variants"][data["baseline"]]["runs"]
    lines = [
        "",
        f"Mean step time (periodic costs included), paired ratio vs `{data['baseline']}`, median [min, max] over "
        "repeats; slowest single step:",
        "",
        "| variant | mean-wall ratio | mean-CPU ratio | slowest step CPU (ms) |",
        "|---|---|---|---|",
    ]
    for variant, entry in data["variants"].items():
        runs = entry["runs"]
        wall = [statistics.mean(r["step_times"]) / statistics.mean(b["step_times"]) for r, b in zip(runs, base)]
        cpu = [statistics.mean(r["cpu_times"]) / statistics.mean(b["cpu_times"]) for r, b in zip(runs, base)]
        slowest = max(max(r["cpu_times"]) for r in runs) * 1000
        lines.append(
            f"| `{variant}` | {statistics.median(wall):.3f} [{min(wall):.3f}, {max(wall):.3f}] | "
            f"{statistics.median(cpu):.3f} [{min(cpu):.3f}, {max(cpu):.3f}] | {slowest:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(os.path.join(RESULTS_DIR, f"{name}.md"), "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
