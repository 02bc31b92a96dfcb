"""Step-time and memory overhead of per-token weighting: ``trl.SFTTrainer`` vs ``WeightedSFTTrainer`` with weighting
off, ``static``, ``dft``, ``focal``, and ``rho1``/``prior`` with a live reference model or a cached ``ref_logps``
column, on the built-in tiny model and the built-in SFT data (same model weights, rows, order and seed everywhere).

    OMP_NUM_THREADS=1 python benchmarks/bench_sft_overhead.py            # every variant, ~8 min on 2 shared cores (load ~5)
    OMP_NUM_THREADS=1 python benchmarks/bench_sft_overhead.py --quick    # a smoke run, ~1 min
    OMP_NUM_THREADS=1 python benchmarks/bench_sft_overhead.py --isolate  # + peak memory (fresh process per run)
    OMP_NUM_THREADS=1 python benchmarks/bench_sft_overhead.py --isolate --repeats 1 --steps 6 --warmup 2  # ~5 min

What to expect: weighting off calls the parent directly (ratio ≈ 1); ``static``/``dft``/``focal`` swap the model's
loss for per-token log-probabilities and a few vector operations (goal ≤ 1.05); a cached reference reads one more
column (≈ ``static``); a live reference adds one no-grad forward of the reference model per micro-batch (here the
reference has the policy's size, so about one third of a forward+backward step more).

The rows are the built-in SFT pairs tokenized once by TRL's own preparation (chat template, prompt labels masked,
``max_length`` 128) and cached on disk with a ``token_weights`` column (uniform in [0.5, 1.5]) and a ``ref_logps``
column scored by the same frozen reference model the live variants run, so cached and live variants compute the same
loss. Each variant receives only the columns it uses.

On a shared machine read the CPU-time ratio: wall time follows the other processes' load. Weighted variants can be
*cheaper* than ``SFTTrainer``: TRL's fused LM head also computes each token's entropy and top-1 hit for its
``entropy`` / ``mean_token_accuracy`` logs, which the weighted loss path does not compute (nor log).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import quiet, timing_arguments  # noqa: E402
from harness import add_timing_arguments, compare, report, resolve_timing  # noqa: E402
from sft_common import cached_dataset, sft_tokenizer, tokenize_like_trl  # noqa: E402

MAX_LENGTH = 128
ROWS = 1024
BATCH_SIZE = 16
REFERENCE_SEED = 1  # the reference is the built-in tiny model initialised with another seed (same vocabulary)
WEIGHT_RANGE = (0.5, 1.5)

# variant name → (WeightedSFTConfig weighting fields or None for the parent ``trl.SFTTrainer``, extra columns the
# variant reads, whether it runs a live reference model). Everything else is identical.
VARIANTS: dict[str, tuple[dict | None, tuple[str, ...], bool]] = {
    "sft_trainer": (None, (), False),
    "weighted_off": ({}, (), False),
    "static": ({"token_weighting": "static"}, ("token_weights",), False),
    "dft": ({"token_weighting": "dft"}, (), False),
    "focal": ({"token_weighting": "focal"}, (), False),
    "rho1_cached": ({"token_weighting": "rho1"}, ("ref_logps",), False),
    "rho1_live": ({"token_weighting": "rho1"}, (), True),
    "prior_cached": ({"token_weighting": "prior"}, ("ref_logps",), False),
    "prior_live": ({"token_weighting": "prior"}, (), True),
    # optional extras (not in the default comparison)
    "sft_trainer_dft": ({"loss_type": "dft"}, (), False),  # TRL's own DFT loss, parent trainer
    "asft_live": ({"token_weighting": "asft"}, (), True),
}
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("sft_trainer_dft", "asft_live")]
PARENT_VARIANTS = ("sft_trainer", "sft_trainer_dft")

# (steps, warmup, repeats): full ≈ 8 min for the 9 default variants on 2 shared cores with OMP_NUM_THREADS=1.
FULL = (10, 2, 3)
QUICK = (3, 1, 1)


def reference_model(seed: int = 0):
    from hfweight.builtin import build_model

    return build_model(sft_tokenizer(seed), size="tiny", seed=REFERENCE_SEED)


def _build_workload(rows: int, max_length: int, seed: int):
    import numpy as np
    from transformers import DataCollatorForLanguageModeling

    from hfweight.builtin import sft_dataset
    from hfweight.reference import score_dataset

    tokenizer = sft_tokenizer(seed)
    data = tokenize_like_trl(sft_dataset(seed=seed, n=rows), tokenizer, max_length)
    rng = np.random.default_rng(seed)
    data = data.add_column(
        "token_weights", [rng.uniform(*WEIGHT_RANGE, size=len(ids)).tolist() for ids in data["input_ids"]]
    )
    with tempfile.TemporaryDirectory() as scores:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        return score_dataset(reference_model(seed), data, collator, scores, batch_size=32)


@functools.cache
def workload(rows: int = ROWS, max_length: int = MAX_LENGTH, seed: int = 0):
    """The tokenized SFT rows with ``token_weights`` and ``ref_logps`` (built once, then loaded from the disk cache)."""
    params = {"rows": rows, "max_length": max_length, "seed": seed, "reference_seed": REFERENCE_SEED, "v": 1}
    return cached_dataset("overhead", params, lambda: _build_workload(rows, max_length, seed))


def _config(variant: str, batch_size: int, seed: int):
    import trl

    from hfweight import WeightedSFTConfig

    weighting, _, _ = VARIANTS[variant]
    output_dir = os.path.join(tempfile.gettempdir(), "hfweight_bench_sft", variant)
    fields = timing_arguments(output_dir, batch_size, seed, max_length=MAX_LENGTH, bf16=False, **(weighting or {}))
    if variant in PARENT_VARIANTS:
        return trl.SFTConfig(**fields)
    return WeightedSFTConfig(**fields)


def make_trainer(variant: str, batch_size: int = BATCH_SIZE, rows: int = ROWS, seed: int = 0):
    """A ready trainer of ``variant``: same model weights, rows and order for every variant; only the weighting, the
    columns it reads and (live variants) the reference model differ."""
    import trl

    from hfweight import WeightedSFTTrainer
    from hfweight.builtin import build_model

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    _, columns, live = VARIANTS[variant]
    tokenizer = sft_tokenizer(seed)
    data = workload(rows, MAX_LENGTH, seed).select_columns(["input_ids", "labels", "domain", *columns])
    kwargs = dict(
        model=build_model(tokenizer, size="tiny", seed=seed),
        args=_config(variant, batch_size, seed),
        train_dataset=data,
        processing_class=tokenizer,
    )
    if variant in PARENT_VARIANTS:
        return trl.SFTTrainer(**kwargs)
    return WeightedSFTTrainer(**kwargs, reference_model=reference_model(seed) if live else None)


def variant_factories(variants, **workload_kwargs) -> dict:
    """name → picklable zero-argument factory, for :func:`harness.compare`."""
    return {name: functools.partial(make_trainer, name, **workload_kwargs) for name in variants}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument(
        "--isolate", action="store_true", help="each run in a fresh subprocess: peak memory comparable"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANTS,
        help="variants to compare; the first is the baseline of the ratios (default: %(default)s)",
    )
    parser.add_argument("--name", help="result file name under benchmarks/results (default: sft_overhead[_quick])")
    args = parser.parse_args(argv)
    resolve_timing(args, FULL, QUICK)
    args.name = args.name or "sft_overhead" + ("_isolated" if args.isolate else "") + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    workload()  # build the cached rows once, before any timing
    result = compare(
        variant_factories(args.variants, batch_size=args.batch_size),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        baseline=args.variants[0],
        isolate=args.isolate,
        settings={
            "model": "tiny",
            "data": f"builtin SFT ({ROWS} rows, max_length {MAX_LENGTH}, completion-only labels)",
            "batch": args.batch_size,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        },
    )
    report(result, args.name, title="Per-token weighting overhead vs `trl.SFTTrainer` (tiny model, built-in SFT data)")


if __name__ == "__main__":
    main()
