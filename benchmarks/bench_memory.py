"""Peak memory with a realistic vocabulary: ``transformers.Trainer`` vs ``WeightedTrainer`` (weighting off, and
static token + sample weights), each run in a fresh subprocess.

    python benchmarks/bench_memory.py            # vocab 32768, seq 512, batch 4
    python benchmarks/bench_memory.py --quick    # one repeat, under 2 minutes on 2 cores

With a 32k vocabulary the parent's loss materializes ``(batch, seq, vocab)`` fp32 logits (256 MiB here) plus their
log-softmax and gradient. The claim checked: with weighting on, the peak stays at the parent's level. On a GPU the
weighted loss takes per-token log-probabilities from TRL's fused LM head; on the CPU, where that head has no Triton
kernel and costs more than the logits (see ``hfweight.loss.FUSED_HEAD_DEVICES``), it runs the parent's own
cross-entropy per token. The ``weighted_static_fused`` variant forces the fused head to measure it anyway. The model is the built-in ``tiny``
Llama with its vocabulary widened to 32768 (hidden size 128, so a step stays around a second on 2 cores); the tokens
come from the built-in corpus (ids below 2048), which does not change the cost of the LM head.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import VARIANTS, quiet, variant_factories  # noqa: E402
from harness import add_timing_arguments, compare, report, resolve_timing  # noqa: E402

VOCAB_SIZE = 32768
SEQ_LEN = 512
BATCH_SIZE = 4
FULL = (4, 2, 3)  # steps, warmup, repeats
QUICK = (1, 1, 1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_timing_arguments(parser)
    parser.add_argument("--name", help="result file name under benchmarks/results (default: memory)")
    args = parser.parse_args(argv)
    resolve_timing(args, FULL, QUICK)
    args.name = args.name or ("memory_quick" if args.quick else "memory")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet()
    workload = {"size": "tiny", "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "vocab_size": VOCAB_SIZE}
    result = compare(
        variant_factories((*VARIANTS, "weighted_static_fused"), **workload),
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        baseline="trainer",
        isolate=True,
        settings={"model": "tiny", "vocab": VOCAB_SIZE, "batch": BATCH_SIZE, "seq": SEQ_LEN},
    )
    report(result, args.name, title=f"Peak memory, vocabulary {VOCAB_SIZE}")


if __name__ == "__main__":
    main()
