"""Does dynamic reward weighting reach better multi-objective trade-offs in fewer steps than fixed weights?

GRPO from a tiny SFT model, with fixed linear weights and with each dynamic weighter, for the same step budget and
seeds. Every `--eval_every` steps the *test* prompts are generated and scored (the same callback for every variant);
a weighter that validates (`hypervolume`) generates on a disjoint *validation* split, so no weighter sees the prompts
it is measured on. The per-objective test means form a trajectory. Reported per variant, mean ± std over seeds:

- `HV final`: hypervolume of the final policy's test scores; `HV front`: of the Pareto front of every evaluation of
  the run. Reference point (`--reference`): `zero` = the nadir of rewards in [0, 1] (default for copy), or `start` =
  the starting model's scores − 0.01 (default for arithmetic; with it a policy that trades a little brevity for much
  more correctness has volume 0, which is why copy does not use it);
- `steps to fixed's final HV`: the first evaluation step whose scores reach the fixed-weight run's final hypervolume
  (same seed); `—` if it never does within the budget;
- the final per-objective test means.

The published claim checked (Lu et al. 2025): dynamic weighting reaches Pareto-dominant solutions in fewer steps
than fixed weights.

``--task copy`` (issue 15) is the task the tiny model can learn (the arithmetic one stays at correctness ≈ 0.01):
prompts "Repeat after me: <2-5 words>" (:func:`hfweight.builtin.copy_dataset`), rewards ``copy`` (share of words
copied in place), ``brevity`` (1 − characters/64) and ``words_format`` (nothing but lowercase words; empty fails). The
starting model is the tiny Llama after ``--sft_steps`` (300) SFT steps on copy pairs from random init (disjoint seed
from the GRPO prompts), built once and cached in ``/tmp/hfweight_copy_start_<sft_steps>``: it copies 0.67 of the
words when sampling (0.87 greedy), so GRPO has room to sharpen it. The settings were found with seed 0 and fixed
weights (`TASK_DEFAULTS`): with weights 1/1/1 GRPO collapses onto one-word or empty answers (the brevity shortcut:
a short answer's brevity gain beats the copy it loses while copying is unreliable) at lr ≥ 2e-4, and learns nothing
measurable at 1e-4; from a 200-step SFT start (copy 0.25) it collapses or crawls; with weights 1/0.25/0.25 and lr 3e-4
the copy reward rises from 0.67 to ~0.74 in 300 steps (~3 minutes per run on one free core).

    python benchmarks/bench_reward_effectiveness.py --task copy --seed_list 0 1 2        # every variant, ~1 h
    python benchmarks/bench_reward_effectiveness.py --task copy --seed_list 0 1 2 --variants fixed popart saw \
        --only --name part1                                                               # split over processes
    python benchmarks/bench_reward_effectiveness.py --task copy --merge benchmarks/results/part*.json --name merged
    python benchmarks/bench_reward_effectiveness.py --model outputs/tiny/demo/sft          # arithmetic, 3 seeds, 60 steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from harness import save_results  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

VARIANTS = {
    "fixed": {"reward_weighting": "static"},
    "popart": {"reward_weighting": "popart", "reward_weighting_kwargs": {"beta": 0.1}},
    "saw": {"reward_weighting": "saw"},
    "hypervolume": {"reward_weighting": "hypervolume", "reward_weighting_kwargs": {"eta": 0.5},
                    "reward_validation_steps": 10},
    "gradient": {"reward_weighting": "gradient", "reward_weighting_kwargs": {"reg": 1e-4}},
    "constrained": {"reward_weighting": "constrained", "multi_objective_aggregation": "normalize_then_sum",
                    "reward_weighting_kwargs": {"thresholds": {"brevity_reward": 0.8, "format_reward": 0.5}}},
}
REWARDS = ["correctness", "brevity", "format"]
# --task copy: the constrained variant keeps brevity and format above these while maximizing the copy reward.
COPY_VARIANT_OVERRIDES = {
    "constrained": {"reward_weighting": "constrained", "multi_objective_aggregation": "normalize_then_sum",
                    "reward_weighting_kwargs": {"thresholds": {"brevity_reward": 0.7, "words_format_reward": 0.8}}},
}
COPY_SFT_SEED = 1000  # the starting model's SFT pairs come from this seed, the GRPO prompts from seed 0
COPY_PROMPTS = 2000  # 1,800 training prompts, 100 validation, 100 test
# Settings per task when not given on the command line (arithmetic: the original benchmark's). Copy: found with seed 0
# and fixed weights (see the module docstring): the SFT start copies 0.67 of the words, lr 3e-4 improves it within
# 300 steps; with weights 1/1/1 or lr ≥ 1e-3 GRPO collapses onto short answers (the brevity shortcut).
TASK_DEFAULTS = {
    "arithmetic": {"sft_steps": 0, "steps": 60, "eval_every": 10, "learning_rate": 5e-5, "reward_weights": None,
                   "heldout_per_domain": 8, "reference": "start"},
    "copy": {"sft_steps": 300, "steps": 300, "eval_every": 25, "learning_rate": 3e-4, "reward_weights": [1, 0.25, 0.25],
             "heldout_per_domain": 25, "reference": "zero"},
}


def held_out_splits(data) -> dict:
    """``data`` (prompts with a ``domain`` column) → ``train`` (90%) and two disjoint held-out halves: ``validation``
    (what a weighter that validates — ``hypervolume`` — generates on, the trainer's ``eval_dataset``) and ``test``
    (what the benchmark measures on; no weighter ever sees it)."""
    split = data.train_test_split(test_size=0.1, seed=0)
    held = split["test"].train_test_split(test_size=0.5, seed=0)
    return {"train": split["train"], "validation": held["train"], "test": held["test"]}


def task_setup(task: str):
    """(reward functions, GRPO dataset splits, variant table, max completion tokens) of ``task``."""
    from hfweight.builtin import grpo_dataset
    from hfweight.builtin.tasks import brevity_reward, copy_dataset, copy_reward, words_format_reward
    from hfweight.entrypoints import resolve_reward_functions

    if task == "arithmetic":
        return resolve_reward_functions(REWARDS), held_out_splits(grpo_dataset(seed=0, n=1000)), VARIANTS, 8
    data = held_out_splits(copy_dataset(seed=0, n=COPY_PROMPTS))
    return [copy_reward, brevity_reward, words_format_reward], data, {**VARIANTS, **COPY_VARIANT_OVERRIDES}, 12


def copy_start_model(path: str, steps: int) -> str:
    """The copy task's starting model: the tiny Llama (random init, seed 0) after ``steps`` SFT steps on copy pairs
    ("Repeat after me: x y" → "x y", seed ``COPY_SFT_SEED``), weighting off; built once, then read from ``path``."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from hfweight import WeightedSFTConfig, WeightedSFTTrainer
    from hfweight.builtin.tasks import assistant, copy_dataset
    from hfweight.entrypoints import load_causal_lm

    model, tokenizer = load_causal_lm("builtin:tiny", seed=0)
    pairs = copy_dataset(seed=COPY_SFT_SEED, n=16 * steps).map(
        lambda row: {"completion": assistant(row["answer"])}, remove_columns=["answer", "domain"]
    )
    args = WeightedSFTConfig(
        output_dir=path, per_device_train_batch_size=16, max_steps=steps, learning_rate=2e-3, lr_scheduler_type="cosine",
        warmup_steps=5, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=0,
        max_length=64, disable_tqdm=True,
    )
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(path)
    tokenizer.save_pretrained(path)
    return path


class HeldOutTrajectory(TrainerCallback):
    """Per-objective means on the ``test`` prompts at step 0 and every ``every`` steps (identical for every variant;
    the weighters' own validation uses other prompts), and the reward weights in use at each of those steps."""

    def __init__(self, every: int, test):
        self.every, self.test, self.trainer, self.points, self.weights = every, test, None, [], []

    def _evaluate(self, step: int):
        metrics = self.trainer.evaluate(eval_dataset=self.test, metric_key_prefix="traj")
        names = self.trainer.reward_func_names
        self.points.append((step, [metrics.get(f"eval_rewards/{n}/mean", metrics.get(f"traj_rewards/{n}/mean"))
                                   for n in names]))
        self.weights.append((step, [round(float(w), 4) for w in self.trainer.reward_weights]))

    def on_train_begin(self, args, state, control, **kwargs):
        self._evaluate(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self._evaluate(state.global_step)


def run(variant: str, model_path: str, seed: int, steps: int, every: int, task: str = "arithmetic",
        learning_rate: float = 5e-5, reward_weights: list[float] | None = None, num_generations: int = 4,
        heldout_per_domain: int = 8) -> list:
    """One GRPO run of ``variant`` from ``model_path``; the held-out trajectory ``[(step, per-reward means)]``.

    ``reward_weights`` are the fixed weights *and* every dynamic weighter's initial weights (TRL's
    ``reward_weights``; all 1 when None); ``heldout_per_domain`` prompts per domain of the test split are scored."""
    from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer
    from hfweight.entrypoints import heldout_prompts, load_causal_lm

    model, tokenizer = load_causal_lm(model_path, seed=seed)
    reward_funcs, data, variants, completion_tokens = task_setup(task)
    trajectory = HeldOutTrajectory(every, heldout_prompts(data["test"], "domain", heldout_per_domain))
    args = WeightedGRPOConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "hfweight_reward_eff", f"{task}_{variant}_{seed}"),
        per_device_train_batch_size=16, per_device_eval_batch_size=16, num_generations=num_generations,
        max_completion_length=completion_tokens, max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="constant", beta=0.0, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=seed, disable_tqdm=True, reward_weights=reward_weights, **variants[variant],
    )
    trainer = WeightedGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=data["train"],
        eval_dataset=heldout_prompts(data["validation"], "domain", heldout_per_domain), processing_class=tokenizer,
        callbacks=[trajectory],
    )
    trajectory.trainer = trainer
    trainer.train()
    return trajectory.points, trajectory.weights


REFERENCES = ("start", "zero")


def reference_point(start_scores: list, reference: str) -> np.ndarray:
    """The hypervolume reference: ``"start"`` = the starting model's held-out scores − 0.01 (Lu et al.'s reference,
    with a margin so an objective that does not improve does not zero the volume); ``"zero"`` = the origin, the worst
    value of rewards in [0, 1] (the nadir), so a point trading one objective for another still counts."""
    start = np.asarray(start_scores, dtype=float)
    return start - 0.01 if reference == "start" else np.zeros_like(start)


def front_hypervolume(points: list, reference: np.ndarray, upto: int | None = None) -> float:
    """Hypervolume of the Pareto front of the trajectory's points up to step ``upto`` (all of them when None)."""
    from hfweight.hypervolume import hypervolume

    chosen = np.array([p for s, p in points if upto is None or s <= upto], dtype=float)
    return hypervolume(chosen, reference)


def point_hypervolume(scores: list, reference: np.ndarray) -> float:
    """Hypervolume of one evaluation point: the volume of the box between the reference and it."""
    return front_hypervolume([(0, scores)], reference)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std (0 for one value)."""
    return statistics.mean(values), statistics.pstdev(values)


def summarize_seed(points: list, fixed: list, reference: str) -> dict:
    """One run's numbers: final point's hypervolume, the front's, and the first evaluation step whose point reaches
    the fixed-weight run's final point (same seed; None if never)."""
    ref = reference_point(points[0][1], reference)
    target = point_hypervolume(fixed[-1][1], reference_point(fixed[0][1], reference))
    reached = [s for s, p in points if point_hypervolume(p, ref) >= target - 1e-12]
    return {"hv_final": point_hypervolume(points[-1][1], ref), "hv_front": front_hypervolume(points, ref),
            "steps_to_fixed": reached[0] if reached else None, "final": points[-1][1], "start": points[0][1]}


def summarize(trajectories: dict, reference: str = "start") -> dict:
    """trajectories[variant][seed] = [(step, scores)] → per variant, mean ± std over seeds of the final point's
    hypervolume, the trajectory front's, the steps to reach fixed's final hypervolume, and the final scores."""
    out = {}
    order = list(VARIANTS)
    for variant in sorted(trajectories, key=lambda v: order.index(v) if v in order else len(order)):
        by_seed = trajectories[variant]
        runs = [summarize_seed(points, trajectories["fixed"][seed], reference) for seed, points in by_seed.items()]
        reach = [r["steps_to_fixed"] for r in runs]
        reached = [r for r in reach if r is not None]
        finals = np.array([r["final"] for r in runs], dtype=float)
        (hv_mean, hv_std), (front_mean, front_std) = (mean_std([r[k] for r in runs]) for k in ("hv_final", "hv_front"))
        out[variant] = {
            "hv_final_mean": hv_mean, "hv_final_std": hv_std, "hv_front_mean": front_mean, "hv_front_std": front_std,
            "hv_final": [r["hv_final"] for r in runs],
            "steps_to_fixed": reach, "steps_to_fixed_mean": statistics.mean(reached) if reached else None,
            "reached": f"{len(reached)}/{len(reach)}",
            "final_means": finals.mean(axis=0).tolist(), "final_stds": finals.std(axis=0).tolist(),
            "start_means": np.mean([r["start"] for r in runs], axis=0).tolist(),
        }
    return out


def to_markdown(summary: dict, settings: dict) -> str:
    task = settings.get("task", "arithmetic")
    names = "correctness / brevity / format" if task == "arithmetic" else "copy / brevity / words_format"
    reference = settings.get("reference", "start")
    described = "starting scores − 0.01" if reference == "start" else "0 in every reward (the nadir)"
    lines = [
        f"### Reward weighting effectiveness (tiny GRPO, {task}, 3 objectives)",
        "",
        f"Settings: {json.dumps(settings)}. Hypervolume (reference = {described}) of the final policy's held-out "
        "scores, and of the Pareto front of every evaluation of the run; steps: the first evaluation whose scores "
        "reach the fixed-weight run's final hypervolume (same seed; 0 = the start already does). Mean ± std over seeds.",
        "",
        f"| variant | HV final | HV front | steps to fixed's final HV (mean; reached) | final held-out {names} |",
        "|---|---|---|---|---|",
    ]
    for variant, s in summary.items():
        steps = "—" if s["steps_to_fixed_mean"] is None else f"{s['steps_to_fixed_mean']:.0f}"
        finals = " / ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(s["final_means"], s.get("final_stds", s["final_means"])))
        lines.append(f"| `{variant}` | {s['hv_final_mean']:.4g} ± {s['hv_final_std']:.2g} | {s['hv_front_mean']:.4g} ± "
                     f"{s['hv_front_std']:.2g} | {steps} ({s['reached']}) | {finals} |")
    start = summary["fixed"]["start_means"]
    lines += ["", "Start (mean over seeds): " + " / ".join(f"{v:.3f}" for v in start) + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """Command line; settings left unset take the task's :data:`TASK_DEFAULTS`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("arithmetic", "copy"), default="arithmetic")
    parser.add_argument("--model", default=None, help="starting model (arithmetic: outputs/tiny/demo/sft, run `make "
                        "demo` first; copy: /tmp/hfweight_copy_start_<sft_steps>, built on first use)")
    parser.add_argument("--sft_steps", type=int, help="--task copy: SFT steps of the starting model (default 300)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed_list", type=int, nargs="+", default=None, help="these seeds instead of 0..seeds-1")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval_every", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--reward_weights", type=float, nargs="+",
                        help="fixed weights, and every weighter's initial weights, in reward order (arithmetic: all "
                        "1; copy: 1 0.25 0.25); `constrained` does not use them")
    parser.add_argument("--num_generations", type=int, default=4, help="completions per prompt (GRPO group size)")
    parser.add_argument("--reference", choices=REFERENCES, help="hypervolume reference point (default: start for "
                        "arithmetic, zero for copy)")
    parser.add_argument("--heldout_per_domain", type=int, help="validation and test prompts per domain")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="store_true", help="run only --variants (no fixed reference: merge later)")
    parser.add_argument("--name", default=None, help="result file name")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="summarize earlier result files")
    args = parser.parse_args(argv)
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.seeds, args.steps = 1, 20
    if "fixed" not in args.variants and not args.only:
        args.variants.insert(0, "fixed")
    if args.model is None:
        args.model = "outputs/tiny/demo/sft" if args.task == "arithmetic" else f"/tmp/hfweight_copy_start_{args.sft_steps}"
    return args


def merged_runs(paths: list[str], key: str) -> dict:
    """``key`` (``trajectories`` or ``weights``)[variant][seed] from several result files (later files win on the
    same variant and seed; files without ``key`` add nothing)."""
    merged = {}
    for path in paths:
        with open(path) as f:
            for variant, by_seed in json.load(f).get(key, {}).items():
                merged.setdefault(variant, {}).update(by_seed)
    return merged


def main(argv=None) -> None:
    args = parse_args(argv)
    from common import quiet

    quiet()
    if args.merge:
        trajectories, weight_paths = merged_runs(args.merge, "trajectories"), merged_runs(args.merge, "weights")
        seeds = sorted({int(seed) for by_seed in trajectories.values() for seed in by_seed})
    else:
        if args.task == "copy":
            copy_start_model(args.model, args.sft_steps)
        trajectories, weight_paths = {}, {}
        seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    settings = {"task": args.task, "seeds": seeds, **{key: getattr(args, key) for key in TASK_DEFAULTS[args.task]},
                "model": args.model, "num_generations": args.num_generations}
    default_name = "reward_effectiveness" + ("" if args.task == "arithmetic" else f"_{args.task}")
    name = args.name or default_name + ("_quick" if args.quick else "")
    if not args.merge:
        for seed in seeds:  # every run is saved as it ends, so a cut-short benchmark keeps what it measured
            for variant in args.variants:
                points, weights = run(variant, args.model, seed, args.steps, args.eval_every, args.task, args.learning_rate,
                             args.reward_weights, args.num_generations, args.heldout_per_domain)
                trajectories.setdefault(variant, {})[seed] = points
                weight_paths.setdefault(variant, {})[seed] = weights
                save_results(name, {"settings": settings, "partial": True, "trajectories": trajectories,
                                    "weights": weight_paths}, indent=1)
                print(f"[seed {seed}] {variant}: {points}", flush=True)
    if "fixed" not in trajectories:
        print(f"{name}.json holds no fixed-weight run: summarize it with --merge beside one.")
        return
    summary = summarize(trajectories, settings["reference"])
    markdown = to_markdown(summary, settings)
    save_results(name, {"settings": settings, "summary": summary, "trajectories": trajectories,
                        "weights": weight_paths}, markdown, indent=1)
    print(markdown)


if __name__ == "__main__":
    main()
