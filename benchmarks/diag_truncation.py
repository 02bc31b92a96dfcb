"""Diagnostic for loss truncation on the noisy-sample variant (``--problem corrupt``): per optimizer step, which share
of the garbage blocks it drops (recall), which share of the clean blocks (false drops), the cutoff it applied and
where that cutoff sits among the step's own losses (how stale it is). One run, one seed; not a results table.

    python benchmarks/diag_truncation.py --corpus records --seed 0
    python benchmarks/diag_truncation.py --corpus records --kwargs '{"min_samples": 64}'

It wraps the data collator (to know which rows of each batch are garbage) and the strategy's ``end_step`` (to read the
step's global losses and the cutoff used); nothing of this touches the library.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_sample_effectiveness as bench  # noqa: E402
import transformers  # noqa: E402

from hfweight.strategies.sample.truncation import LossTruncation  # noqa: E402


def diagnose(args) -> list[dict]:
    bench.use_corpus(args.corpus)
    bench_args = bench.parse_args(["--problem", "corrupt", "--corpus", args.corpus, "--variants", "truncation",
                                   "--steps", str(args.steps), "--eval-every", str(args.steps)])
    per_domain = max(64, bench_args.steps * bench_args.batch // len(bench.CLEAN) + 1)
    tokenizer, train = bench.blocks("train", bench_args.seq, per_domain=per_domain, domains=bench.CLEAN)
    _, held = bench.blocks("heldout", bench_args.seq, per_domain=8, domains=bench.CLEAN)
    heldout = {d: bench.torch.tensor([r["input_ids"] for r in held if r["domain"] == d]) for d in bench.CLEAN}
    spoiled, bad = bench.spoil(train, "corrupt", bench_args.rate, len(tokenizer))
    bad_ids = {tuple(spoiled[i]["input_ids"]) for i in bad}
    flags: list[list[bool]] = []  # per collated batch: is each row garbage
    steps: list[dict] = []
    base = transformers.DataCollatorForLanguageModeling

    class Recording(base):
        def __call__(self, features, *a, **k):
            flags.append([tuple(f["input_ids"]) in bad_ids for f in features])
            return super().__call__(features, *a, **k)

    original_end = LossTruncation.end_step

    def end_step(self, ctx):
        losses = ctx.losses.detach().double().cpu()
        garbage = bench.torch.tensor(flags[len(steps)])
        dropped = (losses > self.cutoff) if self.has_cutoff else bench.torch.zeros_like(garbage)
        own_q = float(bench.torch.quantile(losses, 1 - self.drop_fraction))
        steps.append({
            "step": len(steps), "cutoff": self.cutoff if self.has_cutoff else None, "own_quantile": own_q,
            "recall": float(dropped[garbage].float().mean()) if garbage.any() else None,
            "false": float(dropped[~garbage].float().mean()) if (~garbage).any() else None,
            "clean_mean": float(losses[~garbage].mean()), "garbage_mean": float(losses[garbage].mean()) if garbage.any() else None,
            "clean_max": float(losses[~garbage].max()), "garbage_min": float(losses[garbage].min()) if garbage.any() else None,
        })
        original_end(self, ctx)

    transformers.DataCollatorForLanguageModeling = Recording
    LossTruncation.end_step = end_step
    if args.kwargs:
        bench.DEFAULT_VARIANTS["truncation"] = {"sample_weighting": "truncation",
                                                "sample_weighting_kwargs": json.loads(args.kwargs)}
    result = bench.run("truncation", args.seed, bench_args, spoiled, heldout, tokenizer, bench.CLEAN)
    print(f"final clean {result['final_clean']:.4f}")
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="builtin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--kwargs", default=None, help="truncation's sample_weighting_kwargs as JSON (default: none)")
    parser.add_argument("--every", type=int, default=4, help="print every this many steps")
    args = parser.parse_args()
    bench.quiet()
    steps = diagnose(args)
    fmt = lambda x: "  -  " if x is None else f"{x:5.2f}"  # noqa: E731
    print("step cutoff own_q recall false clean_mean clean_max garbage_min garbage_mean")
    for s in steps[:: args.every]:
        print(f"{s['step']:4d} {fmt(s['cutoff'])} {fmt(s['own_quantile'])} {fmt(s['recall'])} {fmt(s['false'])} "
              f"{fmt(s['clean_mean'])} {fmt(s['clean_max'])} {fmt(s['garbage_min'])} {fmt(s['garbage_mean'])}")
    recall = [s["recall"] for s in steps if s["recall"] is not None]
    false = [s["false"] for s in steps if s["false"] is not None]
    print(f"mean recall {statistics.fmean(recall):.3f}, mean false drops {statistics.fmean(false):.3f}; "
          f"first cutoff at step {next((s['step'] for s in steps if s['cutoff'] is not None), None)}")


if __name__ == "__main__":
    main()
