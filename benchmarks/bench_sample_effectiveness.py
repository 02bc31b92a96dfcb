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

Reported as mean ± std over seeds in ``benchmarks/results/sample_effectiveness.{md,json}``.

``--problem`` chooses what is wrong with the training data (``domains``, above, is the default):

- ``corrupt``: blocks of the three clean domains only, of which ``--rate`` (0.3) are replaced by uniformly random
  token ids (the same rows for every variant and seed);
- ``duplicate``: blocks of the three clean domains, of which ``--rate`` are copies of 8 of the others.

Both add an ``oracle`` row (the same run on the data with the bad rows dropped, i.e. the best choice given the
truth) and a column "gap closed" = (uniform − variant) / (uniform − oracle) per seed: 1 is the oracle, 0 is no
better than uniform, < 0 is worse. Their variants are the methods with their **documented defaults** (a user's first
try), plus the settings named in the row:

    python benchmarks/bench_sample_effectiveness.py --problem corrupt      # 3 seeds x 120 steps
    python benchmarks/bench_sample_effectiveness.py --problem duplicate --seeds 0

On a shared machine, one process per seed and a merge (what ``results/sample_effectiveness_corrupt.md`` ran)::

    python benchmarks/bench_sample_effectiveness.py --problem corrupt --steps 60 --batch 8 --eval-every 20 \
        --eval-blocks 16 --seeds S --name corrupt_seedS                                   # S = 0, 1, 2
    python benchmarks/bench_sample_effectiveness.py --merge results/corrupt_seed*.json --name sample_effectiveness_corrupt
 The paper's direction
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
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import _chunk_by_domain, method_warnings, quiet, run_arguments, warned  # noqa: E402
from corpora import CORPORA, corpus_spec, corrupt_blocks, tokenizer_and_corpus  # noqa: E402
from harness import _environment, _load_average, save_results  # noqa: E402

from hfweight.builtin import build_model, lm_dataset  # noqa: E402

CLEAN = ("code", "prose", "arithmetic")  # the built-in corpus's; --corpus replaces both (use_corpus)
DOMAINS = ("code", "prose", "arithmetic", "redundant", "noise")
CORPUS = "builtin"


def use_corpus(name: str) -> None:
    """Train on corpus ``name`` of ``benchmarks/corpora.py``: its clean domains and all its domains."""
    global CLEAN, DOMAINS, CORPUS
    spec = corpus_spec(name)
    CORPUS, CLEAN, DOMAINS = name, spec.clean, spec.domains
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


# --problem corrupt / duplicate: the documented defaults of each method (no kwargs), plus knob settings named in the row.
DEFAULT_VARIANTS: dict[str, dict] = {
    "uniform": {},
    "oracle": {},  # uniform weights on the data without the bad rows
    # the bad rows kept in the batches but weighted 0 (a `sample_weight` column from the truth): the best a method that
    # drops samples can do, since unlike the oracle it trains on the clean rows of each batch only
    "known_drop": {"sample_weighting": "static"},
    "loss": {"sample_weighting": "loss"},  # linupper, r = 1, no warm-up
    "loss_quadratic": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "quadratic"}},
    "truncation": {"sample_weighting": "truncation"},  # drop 40%, window scaled with the run
    "storm": {"sample_weighting": "storm"},
    # sweeps of the main knobs (--variants to pick them)
    "loss_r0.4": {"sample_weighting": "loss", "sample_weighting_kwargs": {"temperature": 0.4}},
    "loss_r4": {"sample_weighting": "loss", "sample_weighting_kwargs": {"temperature": 4.0}},
    "loss_quadratic_r0.4": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "quadratic", "temperature": 0.4}},
    "loss_quadratic_r0.2": {"sample_weighting": "loss", "sample_weighting_kwargs": {"strategy": "quadratic", "temperature": 0.2}},
    "truncation_d0.2": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"drop_fraction": 0.2}},
    "truncation_d0.3": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"drop_fraction": 0.3}},
    # issue 23's sweep of the cutoff's timing (docs/guidance.md#loss-truncation-hot-start-and-cutoff-issue-23)
    "truncation_recompute1": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"recompute_every": 1}},
    "truncation_hot16_recompute1": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 16, "recompute_every": 1}},
    "truncation_hot96_recompute1": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 96, "recompute_every": 1}},
    "truncation_gap": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"cutoff": "gap"}},
    "truncation_authors_window": {"sample_weighting": "truncation", "sample_weighting_kwargs": {"min_samples": 10000, "buffer_size": 10000}},
    "storm_meta_lr1e-2": {"sample_weighting": "storm", "sample_weighting_kwargs": {"meta_lr": 1e-2}},
}
PROBLEM_DEFAULT_VARIANTS = ("uniform", "oracle", "loss", "loss_quadratic", "truncation", "storm")
DUPLICATED_SOURCES = 8  # --problem duplicate: the copies repeat this many distinct blocks


OVERRIDES: dict[str, dict] = {}  # --override VARIANT=JSON: extra sample_weighting_kwargs for one variant


def variant_table(problem: str) -> dict[str, dict]:
    """variant → its WeightingArguments fields for ``problem``, with the ``--override`` kwargs applied."""
    table = VARIANTS if problem == "domains" else DEFAULT_VARIANTS
    return {
        name: {**fields, "sample_weighting_kwargs": {**fields.get("sample_weighting_kwargs", {}), **OVERRIDES[name]}}
        if name in OVERRIDES else fields
        for name, fields in table.items()
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
    parser.add_argument("--problem", choices=("domains", "corrupt", "duplicate"), default="domains")
    parser.add_argument("--corpus", default="builtin", choices=list(CORPORA),
                        help="the corpus (benchmarks/corpora.py; 'language' is kept aside for the final table)")
    parser.add_argument("--rate", type=float, default=0.3, help="--problem corrupt/duplicate: share of bad rows")
    parser.add_argument("--variants", nargs="+", choices=sorted(set(VARIANTS) | set(DEFAULT_VARIANTS)), default=None)
    parser.add_argument("--quick", action="store_true", help="1 seed x 30 steps: a smoke test, not a measurement")
    parser.add_argument("--name", default=None, help="result file name (default: sample_effectiveness[_quick])")
    parser.add_argument(
        "--only", action="store_true", help="run only --variants, without uniform/oracle (summarize them with --merge)"
    )
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="JSON",
        help="summarize the runs of earlier result files (e.g. one process per seed) instead of training; a run of a "
        "later file replaces one of the same variant and seed in an earlier file (rerun one variant, keep the rest)",
    )
    parser.add_argument("--override", action="append", default=[], metavar="VARIANT=JSON",
                        help='extra sample_weighting_kwargs for one variant (knob sweeps), e.g. '
                        'truncation=\'{"min_samples": 64}\'; recorded in the results file')
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_every = 30, [0], 10
    table = variant_table(args.problem)
    if args.variants is None:
        args.variants = list(VARIANTS) if args.problem == "domains" else list(PROBLEM_DEFAULT_VARIANTS)
    for spec in args.override:
        variant, _, text = spec.partition("=")
        if variant not in table:
            parser.error(f"--override {spec!r}: unknown variant {variant!r}; choose from {list(table)}")
        OVERRIDES[variant] = json.loads(text)
    unknown = [v for v in args.variants if v not in table]
    if unknown:
        parser.error(f"--problem {args.problem} has no variant(s) {unknown}; choose from {list(table)}")
    required = [] if args.only else ["uniform"] if args.problem == "domains" else ["uniform", "oracle"]
    args.variants = required + [v for v in args.variants if v not in required]
    use_corpus(args.corpus)
    suffix = "" if args.problem == "domains" else f"_{args.problem}"
    args.name = args.name or f"sample_effectiveness{suffix}_{args.corpus}" + ("_quick" if args.quick else "")
    return args


def blocks(split: str, seq: int, per_domain: int, domains=None):
    """``per_domain`` blocks of ``seq`` tokens of each of ``domains`` (default: all the corpus's; round-robin over
    domains), from ``split``."""
    import datasets

    domains = DOMAINS if domains is None else domains
    tokenizer, corpus = tokenizer_and_corpus(CORPUS, 0)
    texts = corpus[split].filter(lambda row: row["domain"] in domains)
    tokenized = lm_dataset(tokenizer, texts, max_length=1 << 16)
    rows = _chunk_by_domain(tokenized, seq, per_domain * len(domains))
    return tokenizer, datasets.Dataset.from_list(rows)


def spoil(train, problem: str, rate: float, vocab_size: int, seed: int = 0):
    """(the training set with ``rate`` of its rows spoiled, the indices of the spoiled rows). ``corrupt``: the rows'
    tokens become uniform random ids; ``duplicate``: the rows become copies of ``DUPLICATED_SOURCES`` unspoiled rows.
    The same rows (fixed ``seed``) for every variant and training seed."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(train)
    bad = sorted(rng.choice(n, size=int(round(rate * n)), replace=False).tolist())
    bad_set = set(bad)
    rows = train.to_list()
    if problem == "corrupt":  # the corpora's noisy-sample variant (the same rows and tokens as drawn above)
        rows, bad = corrupt_blocks(train.to_list(), rate, vocab_size, seed)
    elif problem == "duplicate":
        sources = rng.choice([i for i in range(n) if i not in bad_set], size=DUPLICATED_SOURCES, replace=False)
        for k, i in enumerate(bad):
            rows[i] = dict(rows[int(sources[k % len(sources)])])
    else:
        raise ValueError(f"unknown problem {problem!r}")
    return datasets.Dataset.from_list(rows), bad


def truth_weighted(spoiled, bad: list[int]):
    """``spoiled`` with a ``sample_weight`` column from the truth: 0 on the rows in ``bad``, 1 elsewhere (the
    ``known_drop`` variant: the bad rows stay in the batches but count for nothing)."""
    bad_set = set(bad)
    return spoiled.add_column("sample_weight", [0.0 if i in bad_set else 1.0 for i in range(len(spoiled))])


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


def run(variant: str, seed: int, args, train, heldout, tokenizer, clean_domains=None) -> dict:
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from hfweight import WeightedTrainer, WeightedTrainingArguments

    curve: list[tuple[int, dict]] = []
    clean_domains = CLEAN if clean_domains is None else clean_domains

    clean_sets = {d: heldout[d] for d in clean_domains}

    class Evaluate(TrainerCallback):  # the clean domains along the way, every domain at the end
        def on_step_end(self, targs, state, control, model=None, **kwargs):
            if state.global_step == args.steps:
                curve.append((state.global_step, heldout_losses(model, heldout)))
            elif state.global_step % args.eval_every == 0:
                curve.append((state.global_step, heldout_losses(model, clean_sets)))

    model = build_model(tokenizer, size="tiny", seed=seed)
    training = WeightedTrainingArguments(
        **run_arguments(
            f"/tmp/hfweight_bench_effectiveness/{variant}_{seed}",
            seed,
            per_device_train_batch_size=args.batch,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 15),
            weight_decay=0.01,
            optim="adamw_torch",
            logging_steps=args.eval_every,
            data_seed=seed,
            dataloader_num_workers=0,
            **variant_table(args.problem)[variant],
        )
    )
    trainer = WeightedTrainer(
        model=model, args=training, train_dataset=train, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[Evaluate()],
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the method's own run-time warning, if it fires
        warnings.simplefilter("always")
        trainer.train()
    seconds = time.perf_counter() - start
    method = training.sample_weighting
    clean = [(step, statistics.fmean(losses[d] for d in clean_domains)) for step, losses in curve]
    weights = [h for h in trainer.state.log_history if "weights/min" in h]
    return {
        "variant": variant,
        "seed": seed,
        "seconds": seconds,
        "curve": [{"step": step, "clean": c, **losses} for (step, losses), (_, c) in zip(curve, clean)],
        "final_clean": clean[-1][1],
        "final": curve[-1][1],
        "last_logged_weights": {k: v for k, v in (weights[-1] if weights else {}).items() if k.startswith("weights/")},
        "warnings": method_warnings(caught, f"sample_weighting='{method}':") if method else [],
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


def problem_domains(problem: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the domains trained on, the clean domains the held-out loss is measured on)."""
    return (DOMAINS, CLEAN) if problem == "domains" else (CLEAN, CLEAN)


def gap_closed(variant_loss: float, uniform_loss: float, oracle_loss: float) -> float:
    """Share of the uniform → oracle gap a variant closes: 1 = the oracle, 0 = uniform, < 0 = worse than uniform."""
    return (uniform_loss - variant_loss) / (uniform_loss - oracle_loss)


def summarize(results: list[dict], args) -> tuple[str, dict]:
    domains, clean_domains = problem_domains(args.problem)
    uniform_final = {r["seed"]: r["final_clean"] for r in results if r["variant"] == "uniform"}
    oracle_final = {r["seed"]: r["final_clean"] for r in results if r["variant"] == "oracle"}
    with_oracle = bool(oracle_final)
    rows, summary = [], {}
    for variant in args.variants:
        runs = [r for r in results if r["variant"] == variant]
        reached = [steps_to_reach(r["curve"], uniform_final[r["seed"]]) for r in runs]
        got = [s for s in reached if s is not None]
        summary[variant] = {
            "final_clean": [r["final_clean"] for r in runs],
            "final_by_domain": {d: [r["final"][d] for r in runs] for d in domains},
            "steps_to_uniform_final": reached,
            "delta_vs_uniform": [r["final_clean"] - uniform_final[r["seed"]] for r in runs],
            "seconds": [r["seconds"] for r in runs],
            "warned": warned(runs),
        }
        if with_oracle:
            summary[variant]["gap_closed"] = [
                gap_closed(r["final_clean"], uniform_final[r["seed"]], oracle_final[r["seed"]]) for r in runs
            ]
        steps = mean_std([float(s) for s in got], digits=0)
        gap = f" {mean_std(summary[variant]['gap_closed'], digits=2)} |" if with_oracle else ""
        rows.append(
            f"| `{variant}` | {mean_std(summary[variant]['final_clean'])} | "
            f"{mean_std(summary[variant]['delta_vs_uniform'])} |{gap} {steps} | {len(reached) - len(got)}/{len(reached)} | "
            + " | ".join(mean_std(summary[variant]["final_by_domain"][d], digits=2) for d in domains)
            + f" | {statistics.fmean(summary[variant]['seconds']):.0f} | {summary[variant]['warned']} |"
        )
    data = {
        "domains": f"equal shares of {', '.join(domains)}",
        "corrupt": f"equal shares of {', '.join(domains)}, {args.rate:.0%} of the blocks replaced by uniform random tokens",
        "duplicate": f"equal shares of {', '.join(domains)}, {args.rate:.0%} of the blocks replaced by copies of "
        f"{DUPLICATED_SOURCES} other blocks",
    }[args.problem]
    oracle_note = (
        "'oracle' = uniform weights on the data with the bad blocks dropped; 'gap closed' = (uniform − variant) / "
        "(uniform − oracle), same seed (1 = oracle, < 0 = worse than uniform); 'known_drop' = the bad blocks kept in the "
        "batches but weighted 0 from the truth (the best a method that drops rows can do); other rows use the "
        "method's documented defaults unless the name says otherwise; "
        if with_oracle
        else ""
    )
    header = (
        f"### Sample weighting effectiveness ({args.problem}; corpus `{args.corpus}`"
        + (" (KEPT ASIDE: no default was tuned on it)" if corpus_spec(args.corpus).kept_aside else "")
        + ", tiny Llama from scratch)\n\n"
        f"{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps x {args.batch} x {args.seq} tokens, {data}; "
        f"held-out evaluated every {args.eval_every} steps. Cells: mean ± std over seeds. "
        f"'clean' = mean held-out token loss of {', '.join(clean_domains)}; 'Δ' = variant − uniform (same seed; < 0 is "
        f"better); {oracle_note}'steps' = first evaluation at or below uniform's final clean loss (seeds that reached "
        f"it); 'runs that warned': of the runs that recorded their warnings, how many emitted the method's run-time "
        f"warning (–: runs stored before the benchmark recorded warnings); load average at the end: "
        f"{_load_average()}.\n\n"
        "| variant | clean loss | Δ vs uniform |"
        + (" gap closed |" if with_oracle else "")
        + " steps to uniform's final | not reached | "
        + " | ".join(domains)
        + " | s/run | runs that warned |\n|---|---|---|---|---|---|"
        + ("---|" if with_oracle else "")
        + "---|" * len(domains)
        + "---|\n"
    )
    return header + "\n".join(rows) + "\n", summary


def merged_runs(args) -> list[dict]:
    """The runs of ``args.merge``'s result files; sets ``args.seeds``, ``args.variants`` and the run settings to what
    they hold."""
    by_key: dict[tuple[str, int], dict] = {}  # (variant, seed) → run; later files win, first order kept
    for path in args.merge:
        with open(path) as f:
            saved = json.load(f)
        for r in saved["runs"]:
            by_key[(r["variant"], r["seed"])] = r
        for key in ("steps", "batch", "seq", "eval_every", "rate", "problem", "corpus"):  # what the runs were made with
            setattr(args, key, saved["settings"].get(key, getattr(args, key)))
    runs = list(by_key.values())
    use_corpus(args.corpus)
    args.seeds = sorted({r["seed"] for r in runs})
    args.variants = [v for v in dict.fromkeys(r["variant"] for r in runs)]
    return runs


def train_all(args, domains, clean_domains) -> list[dict]:
    """Every (seed, variant) run of ``args`` on the data of ``args.problem``."""
    per_domain = max(64, args.steps * args.batch // len(domains) + 1)
    tokenizer, train = blocks("train", args.seq, per_domain=per_domain, domains=domains)
    _, held = blocks("heldout", args.seq, per_domain=args.eval_blocks, domains=domains)
    heldout = {
        d: torch.tensor([row["input_ids"] for row in held if row["domain"] == d], dtype=torch.long) for d in domains
    }
    datasets_by_variant = {}
    if args.problem != "domains":
        spoiled, bad = spoil(train, args.problem, args.rate, len(tokenizer))
        bad_set = set(bad)
        clean_only = spoiled.select([i for i in range(len(spoiled)) if i not in bad_set])
        datasets_by_variant = {"oracle": clean_only, "known_drop": truth_weighted(spoiled, bad)}
        train = spoiled
    results = []
    for seed in args.seeds:
        for variant in args.variants:
            data = datasets_by_variant.get(variant, train)
            result = run(variant, seed, args, data, heldout, tokenizer, clean_domains)
            results.append(result)
            print(
                f"[seed {seed}] {variant:15s} clean {result['final_clean']:.4f}  "
                + "  ".join(f"{d} {result['final'][d]:.3f}" for d in domains)
                + f"  ({result['seconds']:.0f} s)",
                flush=True,
            )
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    torch.manual_seed(0)
    domains, clean_domains = problem_domains(args.problem)
    results = merged_runs(args) if args.merge else train_all(args, domains, clean_domains)
    if args.only and not args.merge:  # no baseline in this file: keep the runs, summarize after --merge
        save_results(args.name, {"settings": vars(args), "runs": results, "environment": _environment()}, indent=2)
        return
    markdown, summary = summarize(results, args)
    command = "python benchmarks/bench_sample_effectiveness.py " + " ".join(sys.argv[1:] if argv is None else argv)
    markdown += f"\nCommand: `{command.strip()}`\n"
    print(markdown)
    table = variant_table(args.problem)
    payload = {"settings": {k: v for k, v in vars(args).items()}, "variants": {v: table[v] for v in args.variants},
               "summary": summary, "runs": results, "environment": _environment()}
    save_results(
        args.name, payload, markdown, indent=2,
        default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x),
    )


if __name__ == "__main__":
    main()
