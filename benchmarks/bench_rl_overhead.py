"""Step-time overhead of the reward weighters: ``trl.GRPOTrainer`` (or ``RLOOTrainer``) vs ``WeightedGRPOTrainer``
with each weighter, on the built-in tiny model and arithmetic prompts (3 reward functions), same seed and data.

    python benchmarks/bench_rl_overhead.py                       # GRPO, every weighter
    python benchmarks/bench_rl_overhead.py --algo rloo --quick   # a smoke run

A GRPO step here is dominated by generation (8 completions of up to 16 tokens); the weighters add a few vector
operations per generation batch (static, popart, saw, constrained), a held-out generation pass every
`reward_validation_steps` steps (hypervolume, here every 5 steps on 16 prompts) or K extra backward passes over the
generation batch (gradient).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import quiet, run_arguments, tokenizer_and_corpus  # noqa: E402
from harness import add_timing_arguments, compare, report, resolve_timing  # noqa: E402

FULL = (10, 2, 3)  # steps, warmup, repeats
QUICK = (3, 1, 1)

WEIGHTERS = {
    "parent": None,
    "weighted_off": {},
    "static": {"reward_weighting": "static"},
    "popart": {"reward_weighting": "popart"},
    "saw": {"reward_weighting": "saw"},
    "constrained": {"reward_weighting": "constrained", "reward_weighting_kwargs": {"thresholds": [0.7, 0.5]}},
    "hypervolume": {"reward_weighting": "hypervolume", "reward_validation_steps": 5},
    "gradient": {"reward_weighting": "gradient"},
}


def make_trainer(variant: str, algo: str, seed: int = 0):
    import trl

    import hfweight
    from hfweight.builtin import build_model, grpo_dataset
    from hfweight.entrypoints import resolve_reward_functions

    tokenizer, _ = tokenizer_and_corpus(seed)
    model = build_model(tokenizer, size="tiny", seed=seed)
    prompts = grpo_dataset(seed=seed, n=400)
    weighting = WEIGHTERS[variant]
    name = algo.upper()
    if weighting is None:
        trainer_cls, config_cls = getattr(trl, f"{name}Trainer"), getattr(trl, f"{name}Config")
        weighting = {}
    else:
        trainer_cls, config_cls = getattr(hfweight, f"Weighted{name}Trainer"), getattr(hfweight, f"Weighted{name}Config")
    args = config_cls(
        **run_arguments(
            os.path.join(tempfile.gettempdir(), "hfweight_bench_rl", variant),
            seed,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=16,
            max_steps=1,
            learning_rate=1e-4,
            beta=0.0,
            logging_strategy="no",
            bf16=False,
            per_device_eval_batch_size=16,
            **weighting,
        )
    )
    return trainer_cls(
        model=model,
        reward_funcs=resolve_reward_functions(["correctness", "brevity", "format"]),
        args=args,
        train_dataset=prompts.select(range(384)),
        eval_dataset=prompts.select(range(384, 400)),
        processing_class=tokenizer,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", choices=["grpo", "rloo"], default="grpo")
    parser.add_argument("--variants", nargs="+", choices=list(WEIGHTERS), default=list(WEIGHTERS))
    add_timing_arguments(parser)
    args = parser.parse_args(argv)
    resolve_timing(args, FULL, QUICK)
    quiet()
    result = compare(
        {v: functools.partial(make_trainer, v, args.algo) for v in args.variants},
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        baseline=args.variants[0],
        settings={"algo": args.algo, "model": "tiny", "generation_batch": 8, "num_generations": 4, "max_completion": 16},
    )
    name = f"rl_overhead_{args.algo}" + ("_quick" if args.quick else "")
    report(result, name, title=f"Reward-weighting overhead, {args.algo.upper()} (tiny model, 3 rewards)")


if __name__ == "__main__":
    main()
