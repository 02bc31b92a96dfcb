"""Per-step traces of learning progress on the benchmark corpora: the data its memorization watch was set from.

    python benchmarks/trace_learning_progress.py --runs builtin:0 builtin:1 builtin:2 pydocs:0 ...   # ~1 min a run (list: benchmarks/README.md)

Each run is the mixture benchmark's ``learning_progress`` run (``bench_mixture_effectiveness.run``: documented
defaults, 200 steps, the same seed, init and data) with every update's domain training losses and mixture recorded.
The table replays :class:`~hfweight.strategies.mixture.base.MemorizedDomainWatch` (its defaults) over each trace and
reports the longest streak of consecutive updates in which its signature held (the watch fires at ``patience`` = 80),
the domain, and the step it fired at. Results: ``results/learning_progress_watch.{json,md}``; ``--include`` reuses
stored traces (their runs are not repeated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import quiet  # noqa: E402
from corpora import corpus_spec  # noqa: E402
from harness import save_results  # noqa: E402

from hfweight.strategies.mixture.base import MemorizedDomainWatch  # noqa: E402
from hfweight.strategies.mixture.learning_progress import LearningProgressMixture  # noqa: E402

F64 = torch.float64


def trace(corpus: str, seed: int, steps: int) -> dict:
    """One benchmark run of learning progress with its updates recorded: {names, rows: [{step, loss, probs}], final}."""
    import bench_mixture_effectiveness as bench

    bench.SPEC = corpus_spec(corpus)
    bench.data.cache_clear()
    rows = []
    observe = LearningProgressMixture.observe

    def recording(self, stats):
        observe(self, stats)
        rows.append({"step": int(stats.step), "loss": stats.mean_loss.tolist(), "probs": self._probs.tolist(),
                     "names": list(self.domain_names)})

    LearningProgressMixture.observe = recording
    try:
        out = bench.run("learning_progress", seed, steps, steps)
    finally:
        LearningProgressMixture.observe = observe
    return {"corpus": corpus, "seed": seed, "names": rows[0]["names"],
            "rows": [{k: r[k] for k in ("step", "loss", "probs")} for r in rows],
            "target_loss": bench.target_loss(out["final"], "learning_progress"), "mixture": out["mixture"]}


def replay(run: dict) -> dict:
    """The watch (defaults) over a trace: the step it fired at (or None), and the longest streak of its signature
    with the streak's domain (from a twin that never fires, so the streak is measured past the firing point)."""
    k = len(run["names"])
    initial = torch.full((k,), 1.0 / k, dtype=F64)
    watch, twin = MemorizedDomainWatch(), MemorizedDomainWatch(patience=10**9)
    fired, longest, domain = None, 0, None
    for row in run["rows"]:
        step, loss, probs = row["step"] + 1, torch.tensor(row["loss"], dtype=F64), torch.tensor(row["probs"], dtype=F64)
        if watch.observe(step, loss, probs, initial) is not None:
            fired = step
        twin.observe(step, loss, probs, initial)
        if twin.held > longest:
            longest, domain = twin.held, twin.domain
    return {"longest_streak": longest, "domain": None if domain is None else run["names"][domain], "fired_at": fired}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], metavar="CORPUS:SEED")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--include", nargs="*", default=[], metavar="JSON", help="stored traces (results JSON)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    runs = {}
    for path in args.include:
        with open(path) as f:
            runs.update({(r["corpus"], r["seed"]): r for r in json.load(f)["runs"]})
    for spec in args.runs:
        corpus, _, seed = spec.partition(":")
        if (corpus, int(seed)) not in runs:
            runs[(corpus, int(seed))] = trace(corpus, int(seed), args.steps)
            print(f"{spec}: target loss {runs[(corpus, int(seed))]['target_loss']:.4f}", flush=True)
    lines = ["### Learning progress: its memorization watch replayed over per-step traces", "",
             f"Documented defaults, {args.steps} steps (the mixture benchmark's runs). Longest streak: consecutive "
             "updates in which the signature held (the most upweighted domain gets ≥ 1.3 × its initial share, its "
             "loss is ≤ 0.3 × the other domains' median and fell the most since the first window; 20-update windows). "
             "The watch fires at 80. The defaults of the watch were set from these traces: tuning corpora only (the "
             "kept-aside `language` is not traced; its run is in `mixture_effectiveness_language.md`).", "",
             "| corpus | seed | longest streak | domain | fired at step | final mixture |", "|---|---|---|---|---|---|"]
    table = []
    for (corpus, seed), run in sorted(runs.items()):
        seen = replay(run)
        table.append({"corpus": corpus, "seed": seed, **seen})
        mix = ", ".join(f"{k} {v:.2f}" for k, v in run["mixture"].items())
        lines.append(f"| `{corpus}` | {seed} | {seen['longest_streak']} | {seen['domain'] or '–'} | "
                     f"{seen['fired_at'] or '–'} | {mix} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_results("learning_progress_watch", {"settings": vars(args), "table": table, "runs": list(runs.values())}, text)


if __name__ == "__main__":
    main()
