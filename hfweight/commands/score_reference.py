"""Precompute per-token reference log-probabilities (`ref_logps`) for a tokenized dataset, so Rho-1 / PRIOR training
pays nothing for the reference.

    hfweight score-reference --reference outputs/tiny/pretrain --dataset builtin --output outputs/ref_scores

Batched, with a progress bar, resumable (re-run the same command after an interruption: finished shards are kept).
The output directory holds `dataset/` (`datasets.load_from_disk`) with the new `ref_logps` column.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", required=True, help="Reference model directory or hub id ('builtin:tiny' too).")
    parser.add_argument("--dataset", default="builtin", help="'builtin' (the embedded corpus) or a `load_from_disk` path.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--max_rows", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--shard_rows", type=int, default=1024)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import datasets
    from transformers import DataCollatorForLanguageModeling

    from ..entrypoints import load_causal_lm
    from ..reference import score_dataset

    reference, tokenizer = load_causal_lm(args.reference, seed=args.seed)
    if args.dataset == "builtin":
        from ..builtin import build_corpus, lm_dataset

        dataset = lm_dataset(tokenizer, build_corpus(seed=args.seed)[args.split], max_length=args.max_length)
    else:
        dataset = datasets.load_from_disk(args.dataset)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[args.split]
    if args.max_rows is not None:
        dataset = dataset.select(range(min(args.max_rows, len(dataset))))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    scored = score_dataset(reference, dataset, collator, args.output, args.batch_size, shard_rows=args.shard_rows)
    print(f"wrote {len(scored)} rows with `ref_logps` to {os.path.join(args.output, 'dataset')}")

