"""Does loss-based sample weighting speed up learning the clean data? Uniform weights vs Sow et al.'s strategies
(linupper / quadratic / extremes), loss truncation and STORM, on the built-in corpus.

    python benchmarks/bench_sample_effectiveness.py            # 3 seeds x 120 steps: ~6 min on 2 idle cores
    python benchmarks/bench_sample_effectiveness.py --quick    # 1 seed x 30 steps: a smoke test (~1 min)
    python benchmarks/bench_sample_effectiveness.py --steps 400 --seq 128 --seeds 0 1 2 3 4   # the longer version

Setting: the tiny Llama (random init; the seed sets the init and the data order) trained from scratch on fixed-length
blocks of the built-in corpus in equal shares of its five domains, so 40% of the blocks are the low-value domains the
paper's claim is about: ``redundant`` (a few templates repeated: low loss once learned) and ``noise`` (random
characters: high loss forever). The same data, order, optimizer and schedule for every variant; only
``sample_weighting`` differs. Measured on the held-out split of the *clean* domains (code, prose, arithmetic; the mean
of their token-mean losses), every ``--eval-every`` steps:

- the held-out loss after the fixed budget of ``--steps`` optimizer steps;
- the number of steps a variant needs to reach uniform's final held-out loss (same seed): the first evaluation at or
  below it; "not reached" counts the seeds that never get there within the budget.

Reported as mean ± std over seeds in ``benchmarks/results/sample_effectiveness.{md,json}``. The paper's direction
(Sow et al., ICLR 2025): down-weighting low-loss (redundant) samples speeds up convergence — ``linupper`` and
``quadratic`` should then need fewer steps than uniform, ``extremes`` (which up-weights the lowest losses too) not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import _chunk_by_domain, quiet, tokenizer_and_corpus  # noqa: E402
from harness import RESULTS_DIR, _environment, _load_average  # noqa: E402

from hfweight.defaults import build_model, lm_dataset  # noqa: E402

CLEAN = ("code", "prose", "arithmetic")
DOMAINS = ("code", "prose", "arithmetic", "redundant", "noise")
WARMUP = 10  # optimizer steps of uniform weights before the loss-based strategies start (random init: see below)

# variant → WeightingArguments fields. Temperatures are the authors' shipped ones (docs/methods.md#sow): quadratic r =
# 1.0 (their 124M config), linupper and extremes r = 0.4 (210M/684M; linupper with domain weights). Their 1000-step
# uniform warm-up is scaled to this budget (WARMUP steps), since a randomly initialized model's first losses only
# reflect its init. Truncation drops the top 20% (the size of the noise domain) once 10 steps of losses were seen.
VARIANTS: dict[str, dict] = {
    "uniform": {},
    "loss_linupper": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "linupper", "temperature": 0.4, "warmup_steps": WARMUP}},
    "loss_quadratic": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "quadratic", "temperature": 1.0, "warmup_steps": WARMUP}},
    "loss_extremes": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "extremes", "temperature": 0.4, "warmup_steps": WARMUP}},
    "truncation": {
        "sample_weighting": "truncation",
        "sample_weighting_kwargs": {"drop_fraction": 0.2, "buffer_size": 512, "min_samples": 160, "recompute_every": 16},
    },
    "storm": {"sample_weighting": "storm", "sample_weighting_kwargs": {"meta_every": 4, "meta_lr": 1e-2}},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (the fixed budget)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation period (steps)")
    parser.add_argument("--eval-blocks", type=int, default=24, help="held-out blocks per domain")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true", help="1 seed x 30 steps: a smoke test, not a measurement")
    parser.add_argument("--name", default=None, help="result file name (default: sample_effectiveness[_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_every = 30, [0], 10
    if "uniform" not in args.variants:
        args.variants = ["uniform", *args.variants]
    args.name = args.name or "sample_effectiveness" + ("_quick" if args.quick else "")
    return args


def blocks(split: str, seq: int, per_domain: int):
    """``per_domain`` blocks of ``seq`` tokens of each domain (round-robin over domains), from ``split``."""
    import datasets

    tokenizer, corpus = tokenizer_and_corpus(0)
    tokenized = lm_dataset(tokenizer, corpus[split], max_length=1 << 16)
    rows = _chunk_by_domain(tokenized, seq, per_domain * len(DOMAINS))
    return tokenizer, datasets.Dataset.from_list(rows)


@torch.no_grad()
def heldout_losses(model, heldout: dict[str, torch.Tensor]) -> dict[str, float]:
    """Token-mean loss of each domain's held-out blocks (batches of 32)."""
    was_training = model.training
    model.eval()
    out = {}
    for domain, ids in heldout.items():
        total, count = 0.0, 0
        for i in range(0, len(ids), 32):
            batch = ids[i : i + 32]
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total, count = total + float(nll), count + batch[:, 1:].numel()
        out[domain] = total / count
    model.train(was_training)
    return out


def run(variant: str, seed: int, args, train, heldout, tokenizer) -> dict:
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from hfweight import WeightedTrainer, WeightedTrainingArguments

    curve: list[tuple[int, dict]] = []

    clean_sets = {d: heldout[d] for d in CLEAN}

    class Evaluate(TrainerCallback):  # the clean domains along the way, every domain at the end
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step == args.steps:
                curve.append((state.global_step, heldout_losses(model, heldout)))
            elif state.global_step % args.eval_every == 0:
                curve.append((state.global_step, heldout_losses(model, clean_sets)))

    model = build_model(tokenizer, size="tiny", seed=seed)
    training = WeightedTrainingArguments(
        output_dir=f"/tmp/hfweight_bench_effectiveness/{variant}_{seed}",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 15),
        weight_decay=0.01,
        optim="adamw_torch",
        logging_steps=args.eval_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **VARIANTS[variant],
    )
    trainer = WeightedTrainer(
        model=model, args=training, train_dataset=train, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[Evaluate()],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    clean = [(step, statistics.fmean(losses[d] for d in CLEAN)) for step, losses in curve]
    weights = [h for h in trainer.state.log_history if "weights/min" in h]
    return {
        "variant": variant,
        "seed": seed,
        "seconds": seconds,
        "curve": [{"step": step, "clean": c, **losses} for (step, losses), (_, c) in zip(curve, clean)],
        "final_clean": clean[-1][1],
        "final": curve[-1][1],
        "last_logged_weights": {k: v for k, v in (weights[-1] if weights else {}).items() if k.startswith("weights/")},
    }


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    for point in curve:
        if point["clean"] <= target:
            return point["step"]
    return None


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(results: list[dict], args) -> tuple[str, dict]:
    uniform_final = {r["seed"]: r["final_clean"] for r in results if r["variant"] == "uniform"}
    rows, summary = [], {}
    for variant in args.variants:
        runs = [r for r in results if r["variant"] == variant]
        reached = [steps_to_reach(r["curve"], uniform_final[r["seed"]]) for r in runs]
        got = [s for s in reached if s is not None]
        summary[variant] = {
            "final_clean": [r["final_clean"] for r in runs],
            "final_by_domain": {d: [r["final"][d] for r in runs] for d in DOMAINS},
            "steps_to_uniform_final": reached,
            "delta_vs_uniform": [r["final_clean"] - uniform_final[r["seed"]] for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
        steps = mean_std([float(s) for s in got], digits=0)
        rows.append(
            f"| `{variant}` | {mean_std(summary[variant]['final_clean'])} | "
            f"{mean_std(summary[variant]['delta_vs_uniform'])} | {steps} | {len(reached) - len(got)}/{len(reached)} | "
            + " | ".join(mean_std(summary[variant]["final_by_domain"][d], digits=2) for d in DOMAINS)
            + f" | {statistics.fmean(summary[variant]['seconds']):.0f} |"
        )
    header = (
        f"### Sample weighting effectiveness (built-in corpus, tiny Llama from scratch)\n\n"
        f"{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x {args.batch} x {args.seq} tokens, equal shares of "
        f"{', '.join(DOMAINS)}; held-out evaluated every {args.eval_every} steps. Cells: mean ± std over seeds. "
        f"'clean' = mean held-out token loss of {', '.join(CLEAN)}; 'Δ' = variant − uniform (same seed; < 0 is "
        f"better); 'steps' = first evaluation at or below uniform's final clean loss (seeds that reached it); "
        f"load average at the end: {_load_average()}.\n\n"
        "| variant | clean loss | Δ vs uniform | steps to uniform's final | not reached | "
        + " | ".join(DOMAINS)
        + " | s/run |\n|---|---|---|---|---|"
        + "---|" * len(DOMAINS)
        + "---|\n"
    )
    return header + "\n".join(rows) + "\n", summary


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    torch.manual_seed(0)
    tokenizer, train = blocks("train", args.seq, per_domain=max(64, args.steps * args.batch // len(DOMAINS) + 1))
    _, held = blocks("heldout", args.seq, per_domain=args.eval_blocks)
    heldout = {
        d: torch.tensor([row["input_ids"] for row in held if row["domain"] == d], dtype=torch.long) for d in DOMAINS
    }
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            result = run(variant, seed, args, train, heldout, tokenizer)
            results.append(result)
            print(
                f"[seed {seed}] {variant:15s} clean {result['final_clean']:.4f}  "
                + "  ".join(f"{d} {result['final'][d]:.3f}" for d in DOMAINS)
                + f"  ({result['seconds']:.0f} s)",
                flush=True,
            )
    markdown, summary = summarize(results, args)
    print(markdown)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, f"{args.name}.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(RESULTS_DIR, f"{args.name}.json"), "w") as f:
        payload = {"settings": {k: v for k, v in vars(args).items()}, "variants": VARIANTS, "summary": summary,
                   "runs": results, "environment": _environment()}
        json.dump(payload, f, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))


if __name__ == "__main__":
    main()
