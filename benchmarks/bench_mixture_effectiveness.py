"""Do dynamic domain mixtures beat stratified sampling? Held-out loss on a target mix after a fixed budget.

    python benchmarks/bench_mixture_effectiveness.py --corpus ops   # 3 seeds × 200 steps, every method (~40 min idle)
    python benchmarks/bench_mixture_effectiveness.py --quick        # 1 seed, 20 steps: a smoke test

``--corpus`` picks one of the corpora of ``benchmarks/corpora.py`` (default ``builtin``; ``language`` is kept aside:
run only for the final table). Results: ``results/mixture_effectiveness_<corpus>.{json,md}``.

Setup (issues 5, 15 and 23). The built-in corpus (five domains: code, prose, arithmetic, and the two problems real data
has — ``redundant``, near-duplicate template texts, and ``noise``, random characters), cut into fixed-length blocks;
the tiny built-in Llama from scratch; every method gets the same budget (steps × batch), seed, model init and
optimizer. The target is the *uniform mix of the clean domains* (code, prose, arithmetic) on held-out text: the
reported loss is the mean of their held-out token-mean losses on a *test* half of the held-out split; the methods
that learn from held-out data (Aioli's probes, DGA's target gradient) see only the other, *validation* half, and only
its clean domains (the common case: held-out sets for the domains the user cares about, not for the junk).

Controls: ``stratified`` (uniform, τ = inf) and ``reshuffled`` — the same uniform mixture and model init with another
data order (``data_seed`` + 1000): its distance to stratified is the noise floor of one comparison, what a method
that changed nothing but the order of the rows would score.

Every method runs with its *documented defaults* (a user's first try); the only settings given are the ones a method
cannot run without (DGA's target: the clean mix). ``--override METHOD='{"eta": 0.5}'`` changes one method's kwargs (a
knob sweep). Methods: stratified (uniform, τ = inf), ``oracle`` (the best static choice given the truth: uniform over
the clean domains, junk left out), temperature (τ = 2 over block counts), DoReMi (reference = the stratified model of
the same seed, weights applied online), ODM, Aioli, DGA (target = the clean mix), ``dga_cosine`` (DGA's junk-domain
setting, not its default: ``DGA_COSINE``), learning progress, plus DGA with a
specific target (arithmetic only; scored on arithmetic). Reported per method: the target loss after the budget, the
difference to stratified, the fraction of the stratified → oracle gap it closes ``(stratified − method) / (stratified −
oracle)`` (same seed), and the steps needed to reach stratified's final loss (evaluated every ``--eval_every``
steps), mean ± std over seeds; and how many runs emitted the method's run-time warning (each run stores the texts of
the warnings starting with ``"<mixture>:"`` in ``runs[].warnings``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import method_warnings, quiet, warned  # noqa: E402
from corpora import CORPORA, corpus_spec, lm_block_splits, tokenizer_and_corpus  # noqa: E402
from harness import save_results  # noqa: E402

from hfweight.builtin import build_model  # noqa: E402

SPEC = corpus_spec("builtin")  # --corpus: the corpus trained on (set once in main)
SEQ_LEN = 64
BATCH = 16
HELDOUT_PER_DOMAIN = 32  # blocks per domain in each of the validation and test halves
METHODS = ("stratified", "reshuffled", "oracle", "temperature", "doremi", "odm", "aioli", "dga", "dga_cosine",
           "learning_progress", "dga_first")
# DGA's junk-domain setting (not its default): scale-free clipped cosine signal, entropy-regularized step
DGA_COSINE = {"normalize": "cosine", "eta": 2.0, "prior_pull": 0.1, "signal_clip": 0.2}
RESHUFFLE_SEED_OFFSET = 1000  # `reshuffled`: stratified with another data order (data_seed = seed + this), same init
OVERRIDES: dict[str, dict] = {}  # --override METHOD=JSON: extra kwargs for one method (knob sweeps)



def clean() -> tuple[str, ...]:
    """The clean domains of the corpus trained on: the target is the uniform mix of their held-out losses."""
    return SPEC.clean


def configs() -> dict[str, tuple[str, dict]]:
    """method -> (mixture name, the kwargs a user must give; everything else is the method's documented default).
    ``dga_first``: DGA with a specific target, the corpus's first clean domain (scored on that domain alone)."""
    return {
        "stratified": ("temperature", {"temperature": "inf"}),
        "reshuffled": ("temperature", {"temperature": "inf"}),
        "oracle": ("static", {"weights": {d: 1.0 for d in clean()}}),
        "temperature": ("temperature", {"temperature": 2.0}),
        "doremi": ("doremi", {}),
        "odm": ("odm", {}),
        "aioli": ("aioli", {}),
        "dga": ("dga", {"target": list(clean()), "target_batch_size": BATCH}),
        "dga_cosine": ("dga", {"target": list(clean()), "target_batch_size": BATCH, **DGA_COSINE}),
        "learning_progress": ("learning_progress", {}),
        "dga_first": ("dga", {"target": clean()[0], "target_batch_size": BATCH}),
    }


def mixture_config(method: str, steps: int) -> dict:
    """The weighting fields of a method: documented defaults plus what it cannot run without, then any override."""
    del steps  # the defaults must fit the run by themselves (issue 15): nothing is scaled here
    mixture, kwargs = configs()[method]
    return {"mixture": mixture, "mixture_kwargs": {**kwargs, **OVERRIDES.get(method, {})}}


@functools.cache
def data(seed: int = 0):
    """(tokenizer, train blocks with `domain`, {domain: validation blocks}, {domain: test blocks})."""
    tokenizer, corpus = tokenizer_and_corpus(SPEC.name, seed)
    return (tokenizer, *lm_block_splits(tokenizer, corpus, SEQ_LEN, HELDOUT_PER_DOMAIN))


@torch.no_grad()
def test_losses(model, test: dict) -> dict[str, float]:
    """Token-mean held-out loss per domain (fixed-length blocks: every position but the first is a label)."""
    was = model.training
    model.eval()
    out = {}
    for domain, rows in test.items():
        if domain not in clean():
            continue
        ids = torch.tensor(rows["input_ids"])
        total, count = 0.0, 0
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            logits = model(input_ids=chunk).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + chunk[:, 1:].numel()
        out[domain] = total / count
    model.train(was)
    return out


def run(method: str, seed: int, steps: int, eval_every: int, reference=None) -> dict:
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from hfweight import WeightedTrainer, WeightedTrainingArguments

    tokenizer, train, validation, test = data()

    class Curve(TrainerCallback):
        def __init__(self):
            self.points = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0 or state.global_step == steps:
                self.points.append((state.global_step, test_losses(model, test)))

    config = mixture_config(method, steps)
    args = WeightedTrainingArguments(
        output_dir=tempfile.mkdtemp(prefix=f"mixeff_{method}_"), max_steps=steps, per_device_train_batch_size=BATCH,
        learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
        logging_steps=max(1, steps // 10), save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=seed, data_seed=seed + (RESHUFFLE_SEED_OFFSET if method == "reshuffled" else 0),
        dataloader_num_workers=0, mixture_mode="resample", **config,
    )
    curve = Curve()
    started = time.perf_counter()
    model = build_model(tokenizer, size="tiny", seed=seed)
    trainer = WeightedTrainer(
        model=model, args=args, train_dataset=train,
        eval_dataset={d: validation[d] for d in clean()}, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[curve], reference_model=reference if method == "doremi" else None,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    final = curve.points[-1][1]
    return {
        "method": method, "seed": seed, "seconds": time.perf_counter() - started,
        "curve": curve.points, "final": final, "warnings": method_warnings(caught, f"{config['mixture']}:"),
        "mixture": dict(zip(trainer.domain_names, trainer.mixture.final_probabilities().tolist())),
        "model": model,
    }


def _reference_path(cache_dir: str, seed: int, steps: int) -> str:
    return os.path.join(cache_dir, f"stratified_{SPEC.name}_seed{seed}_steps{steps}.pt")


def cached_reference(cache_dir: str | None, seed: int, steps: int):
    """The stratified model of this seed and budget from ``--reference_cache``, or None (not cached)."""
    if cache_dir is None or not os.path.exists(_reference_path(cache_dir, seed, steps)):
        return None
    tokenizer = data()[0]
    model = build_model(tokenizer, size="tiny", seed=seed)
    model.load_state_dict(torch.load(_reference_path(cache_dir, seed, steps), weights_only=True))
    return model


def save_reference(cache_dir: str | None, seed: int, steps: int, model) -> None:
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(model.state_dict(), _reference_path(cache_dir, seed, steps))


def target_loss(losses: dict, method: str) -> float:
    return losses[clean()[0]] if method == "dga_first" else sum(losses[d] for d in clean()) / len(clean())


def gap_closed(baseline: float, score: float, oracle: float) -> float:
    """Fraction of the baseline → oracle gap a method closes: 1 = as good as the oracle, 0 = the baseline, < 0 worse."""
    gap = baseline - oracle
    return (baseline - score) / gap if gap != 0 else float("nan")


def steps_to_reach(curve, threshold: float, method: str) -> int | None:
    return next((step for step, losses in curve if target_loss(losses, method) <= threshold), None)


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def save_partial(name: str, args, results: list[dict]) -> None:
    save_results(f"{name}.partial", {"settings": vars(args), "runs": results})


def included_runs(paths: list[str], steps: int) -> list[dict]:
    """The runs stored in earlier result files, checked to have the same budget."""
    runs = []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        if saved["settings"]["steps"] != steps:
            raise SystemExit(f"--include {path}: its runs have {saved['settings']['steps']} steps, this run {steps}.")
        runs += saved["runs"]
    unique = {(r["method"], r["seed"]): r for r in runs}  # a run stored in several files counts once
    return list(unique.values())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="builtin", choices=list(CORPORA),
                        help="the corpus trained on (benchmarks/corpora.py; 'language' is kept aside for the final table)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--override", action="append", default=[], metavar="METHOD=JSON",
                        help='extra mixture_kwargs for one method, e.g. aioli=\'{"probe_fraction": 0.2}\'')
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps: a smoke test")
    parser.add_argument("--name", default=None)
    parser.add_argument("--include", nargs="+", default=[], metavar="JSON",
                        help="result files of earlier runs (same --steps): their runs join the table and are not re-run "
                             "(split a long benchmark over several invocations, e.g. one per seed)")
    parser.add_argument("--reference_cache", default=None, metavar="DIR",
                        help="keep each seed's stratified model (DoReMi's reference) in DIR and reuse it in later "
                             "invocations with the same --steps, instead of training it again")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads ran 4x slower per step)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.eval_every = 20, [0], 5
    global SPEC
    SPEC = corpus_spec(args.corpus)
    name = args.name or (f"mixture_effectiveness_{args.corpus}" + ("_quick" if args.quick else ""))
    for spec in args.override:
        method, _, text = spec.partition("=")
        if method not in METHODS:
            parser.error(f"--override {spec!r}: unknown method {method!r}; choose from {METHODS}")
        OVERRIDES[method] = json.loads(text)
    quiet()
    torch.set_num_threads(args.threads)
    loads, results = [os.getloadavg()[0]], included_runs(args.include, args.steps)
    done = {(r["method"], r["seed"]) for r in results}
    wall = time.perf_counter()
    for seed in args.seeds:
        reference = cached_reference(args.reference_cache, seed, args.steps)
        for method in ["stratified"] + [m for m in args.methods if m != "stratified"]:
            needed_as_reference = (method == "stratified" and reference is None and "doremi" in args.methods
                                   and ("doremi", seed) not in done)
            if (method, seed) in done and not needed_as_reference:
                continue
            out = run(method, seed, args.steps, args.eval_every, reference)
            if method == "stratified":
                reference = out["model"]
                save_reference(args.reference_cache, seed, args.steps, reference)
            out.pop("model")
            loads.append(os.getloadavg()[0])
            print(f"[seed {seed}] {method:<15} target loss {target_loss(out['final'], method):.4f}  "
                  f"({out['seconds']:.0f} s)  mixture {json.dumps({k: round(v, 3) for k, v in out['mixture'].items()})}"
                  + "".join(f"\n    warned: {text}" for text in out["warnings"]), flush=True)
            if (method, seed) not in done:
                results.append(out)
                save_partial(name, args, results)  # an interrupted benchmark keeps its finished runs (--include them)
    by = {(r["method"], r["seed"]): r for r in results}
    args.seeds = sorted({seed for _, seed in by})
    args.methods = [m for m in METHODS if any((m, seed) in by for seed in args.seeds)]
    rows = []
    for method in ["stratified"] + [m for m in args.methods if m != "stratified"]:
        finals, reach, deltas, closed, missed = [], [], [], [], 0
        seeds = [seed for seed in args.seeds if (method, seed) in by and ("stratified", seed) in by]
        for seed in seeds:
            r, base = by[(method, seed)], by[("stratified", seed)]
            score = target_loss(r["final"], method)
            base_final = target_loss(base["final"], method)  # the first clean domain for dga_first, else the mix
            finals.append(score)
            deltas.append(score - base_final)
            if ("oracle", seed) in by:
                closed.append(gap_closed(base_final, score, target_loss(by[("oracle", seed)]["final"], method)))
            step = steps_to_reach(r["curve"], base_final, method)
            reach.append(step) if step is not None else None
            missed += step is None
        rows.append({"method": method, "final": finals, "delta_vs_stratified": deltas, "gap_closed": closed,
                     "steps_to_reach": reach, "warned": warned([by[(method, seed)] for seed in seeds]),
                     "missed": missed, "beats_stratified": sum(d < 0 for d in deltas), "seeds": seeds})
    minutes = (time.perf_counter() - wall) / 60
    lines = [
        f"### Mixture effectiveness: tiny Llama, corpus `{args.corpus}`"
        + (" (KEPT ASIDE: no default was tuned on it)" if SPEC.kept_aside else "")
        + f", {args.steps} steps × batch {BATCH} × seq {SEQ_LEN}",
        "",
        f"Seeds {args.seeds}; target = uniform mix of the clean domains {list(clean())} (held-out test half; "
        f"`dga_first`: {clean()[0]} only, compared with stratified's {clean()[0]} loss). {len(by)} runs, "
        f"{sum(r['seconds'] for r in by.values()) / 60:.0f} min of run time in all (stored with each run); this "
        f"invocation {minutes:.1f} min, 1-minute load average {min(loads):.1f}–{max(loads):.1f} (2 shared cores).",
        "",
        "| method | target loss (mean ± std) | Δ vs stratified (same seed) | stratified → oracle gap closed | "
        f"seeds beating stratified | steps to stratified's final loss (of {args.steps}) | runs that warned |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        reach = mean_std([float(s) for s in row["steps_to_reach"]]).replace(".0000", "")
        if row["missed"]:
            reach += f" ({row['missed']} of {len(row['seeds'])} seeds never)"
        closed = mean_std([100 * c for c in row["gap_closed"]]).replace(" ± ", "% ± ") + "%" if row["gap_closed"] else "–"
        lines.append(f"| `{row['method']}` | {mean_std(row['final'])} | {mean_std(row['delta_vs_stratified'])} | "
                     f"{closed} | {row['beats_stratified']}/{len(row['seeds'])} | {reach} | {row['warned']} |")
    lines += ["", "Runs that warned: of a method's runs that recorded their warnings, how many emitted its run-time "
              "warning (– : runs stored before the benchmark recorded warnings). Rows have the seeds of their runs "
              "(\"seeds beating stratified\" counts them). First warning of each method:", ""]
    for method in args.methods:
        texts = [(seed, r["warnings"][0]) for (m, seed), r in sorted(by.items()) if m == method and r.get("warnings")]
        if texts:
            lines.append(f"- `{method}` (seed {texts[0][0]}): {texts[0][1]}")
    if OVERRIDES:
        lines += ["", "Overrides: " + "; ".join(f"`{m}`: `{json.dumps(kw)}`" for m, kw in OVERRIDES.items())]
    lines += ["", "Final mixtures (first seed of each method):", ""]
    for method in ["stratified"] + [m for m in args.methods if m != "stratified"]:
        mix = by[(method, min(seed for m, seed in by if m == method))]["mixture"]
        lines.append(f"- `{method}`: " + ", ".join(f"{k} {v:.3f}" for k, v in mix.items()))
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    finite = all(math.isfinite(v) for r in rows for v in r["final"])
    payload = {"settings": vars(args), "rows": rows, "runs": results, "load": loads, "finite": finite}
    save_results(name, payload, text, indent=1)


if __name__ == "__main__":
    main()
