"""Is hfweight's weighted loss cheaper than the parent's? One forward + backward of the same model on the same batch,
timed in CPU seconds, with (a) the parent Trainer's loss — labels passed to the model, transformers' ``ForCausalLMLoss``
— and (b) the weighted path: logits without labels, per-token cross-entropy (``hfweight.loss.token_log_probs``), then
``Σ w ℓ / Σ w`` with static token weights. Alternating order, one thread. Written to explain the overhead table's ratios
below 1 (README, "Results"): if (b) costs the same as (a), such a ratio is drift between runs, not skipped work.

    OMP_NUM_THREADS=1 python benchmarks/bench_loss_path.py            # ~20M-parameter "small" preset, batch 4 × 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hfweight.builtin.model import SIZES  # noqa: E402
from hfweight.loss import token_log_probs  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--vocab", type=int, default=2048, help="the built-in tokenizer's size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, **SIZES[args.size]))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    inputs = {"input_ids": ids, "labels": ids.clone()}
    weights = torch.rand(args.batch, args.seq - 1) + 0.5
    num_items = torch.tensor(args.batch * (args.seq - 1))

    def parent():
        model(**inputs, num_items_in_batch=num_items).loss.backward()

    def weighted():
        logps, mask = token_log_probs(model, inputs, fused=False)
        w = weights * mask
        (-(logps * w).sum() / w.sum()).backward()

    paths = {"parent ForCausalLMLoss": parent, "hfweight weighted loss": weighted}
    for run in paths.values():  # warm-up
        run()
        model.zero_grad()
    seconds = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
            model.zero_grad()
    print(f"{args.size} model, batch {args.batch} × {args.seq}, vocab {args.vocab}, 1 thread; CPU s per forward+backward")
    for name, values in seconds.items():
        print(f"  {name:24s} median {statistics.median(values):.3f}  [{min(values):.3f}, {max(values):.3f}]")


if __name__ == "__main__":
    main()
