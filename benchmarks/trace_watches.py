"""Per-update traces of the mixtures' run-time watches on the benchmark corpora: the data their thresholds were set from.

    python benchmarks/trace_watches.py --method learning_progress --runs builtin:0 builtin:1 ...  # ~1 min a run
    python benchmarks/trace_watches.py --method doremi --runs records:0 ... --reference_cache /tmp/ref
    python benchmarks/trace_watches.py --method odm --runs records:0 ... --include results/concentration_watch.json

(the full lists: ``benchmarks/README.md``). Each run is the mixture benchmark's run of ``--method``
(``bench_mixture_effectiveness.run``: documented defaults, 200 steps, the same seed, init and data; DoReMi's reference
is that seed's stratified model, trained first or read from ``--reference_cache``) with what its watch sees at every
update recorded: the domains' training losses, the mixture and, for the concentration watch, which domains the
benchmark's per-domain eval sets measure (its clean domains). The table replays the watch with its defaults over
each trace and reports the longest streak of consecutive updates in which its signature held, the domain, and the
step it fired at:

- ``learning_progress``: :class:`~hfweight.strategies.mixture.base.MemorizedDomainWatch` (fires at a streak of 80);
  ``results/learning_progress_watch.{json,md}``;
- ``doremi`` and ``odm``: :class:`~hfweight.strategies.mixture.base.ConcentratedDomainWatch` (fires at 50), replayed
  twice: with the eval sets the run had, and as if it had none (then only the concentration on the hardest domain
  counts); ``results/concentration_watch.{json,md}``.

``--include`` reuses stored traces (their runs are not repeated).
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

from hfweight.strategies.mixture.base import ConcentratedDomainWatch, MemorizedDomainWatch  # noqa: E402

F64 = torch.float64
WATCHES = {"learning_progress": MemorizedDomainWatch, "doremi": ConcentratedDomainWatch, "odm": ConcentratedDomainWatch}
RESULTS = {"learning_progress": "learning_progress_watch", "doremi": "concentration_watch",
           "odm": "concentration_watch"}


def trace(method: str, corpus: str, seed: int, steps: int, reference_cache: str | None = None) -> dict:
    """One benchmark run of ``method`` with its watch's inputs recorded at each update:
    {method, corpus, seed, names, rows: [{step, loss, probs, evaluated}], target_loss, mixture}. ``step`` is the
    optimizer step of the update (the watch is fed ``step + 1``)."""
    import bench_mixture_effectiveness as bench

    bench.SPEC = corpus_spec(corpus)
    bench.data.cache_clear()
    watch_class, rows = WATCHES[method], []
    observe = watch_class.observe

    def recording(self, step, loss, probs, initial):
        evaluated = getattr(self, "evaluated", None)
        rows.append({"step": step - 1, "loss": loss.tolist(), "probs": probs.tolist(),
                     "evaluated": None if evaluated is None else evaluated.tolist()})
        return observe(self, step, loss, probs, initial)

    reference = None
    if method == "doremi":
        reference = bench.cached_reference(reference_cache, seed, steps)
        if reference is None:
            reference = bench.run("stratified", seed, steps, steps)["model"]
            bench.save_reference(reference_cache, seed, steps, reference)
    watch_class.observe = recording
    try:
        out = bench.run(method, seed, steps, steps, reference)
    finally:
        watch_class.observe = observe
    return {"method": method, "corpus": corpus, "seed": seed, "names": list(out["mixture"]), "rows": rows,
            "target_loss": bench.target_loss(out["final"], method), "mixture": out["mixture"],
            "warnings": out["warnings"]}


def replay(run: dict, evaluated: bool = True) -> dict:
    """The method's watch (defaults) over a trace: the step it fired at (or None), and the longest streak of its
    signature with the streak's domain (from a twin that never fires, so the streak is measured past the firing
    point). ``evaluated=False`` replays the concentration watch as if the run had no per-domain eval sets."""
    watch_class = WATCHES[run.get("method", "learning_progress")]  # traces stored before the method was recorded: LP
    k = len(run["names"])
    initial = torch.full((k,), 1.0 / k, dtype=F64)  # every benchmark run starts from the uniform mixture
    watch, twin = watch_class(), watch_class(patience=10**9)
    fired, longest, domain = None, 0, None
    for row in run["rows"]:
        if evaluated and row.get("evaluated") is not None:
            watch.evaluated = twin.evaluated = torch.tensor(row["evaluated"])
        step, loss, probs = row["step"] + 1, torch.tensor(row["loss"], dtype=F64), torch.tensor(row["probs"], dtype=F64)
        if watch.observe(step, loss, probs, initial) is not None:
            fired = step
        twin.observe(step, loss, probs, initial)
        if twin.held > longest:
            longest, domain = twin.held, twin.domain
    return {"longest_streak": longest, "domain": None if domain is None else run["names"][domain], "fired_at": fired}


CAPTIONS = {
    "learning_progress_watch": (
        "### Learning progress: its memorization watch replayed over per-step traces",
        "Longest streak: consecutive updates in which the signature held (the most upweighted domain gets ≥ 1.3 × its "
        "initial share, its loss is ≤ 0.3 × the other domains' median and fell the most since the first window; "
        "20-update windows). The watch fires at 80."),
    "concentration_watch": (
        "### DoReMi and ODM: the concentration watch replayed over per-update traces",
        "Longest streak: consecutive updates in which the signature held (over the last 10 updates, the most "
        "upweighted domain gets ≥ 1.5 × its initial share, has the highest training loss, and no eval set measures "
        "it). The watch fires at 50. The benchmark passes per-domain eval sets of the clean domains (columns \"with "
        "the run's eval sets\"); the columns \"without eval sets\" replay the same trace as if it had none."),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(WATCHES), default="learning_progress")
    parser.add_argument("--runs", nargs="*", default=[], metavar="CORPUS:SEED")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--include", nargs="*", default=[], metavar="JSON", help="stored traces (results JSON)")
    parser.add_argument("--reference_cache", default=None, metavar="DIR",
                        help="doremi: each seed's stratified model (its reference), kept and reused (as the mixture "
                             "benchmark's option)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="results file name (default: the method's table)")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    name = RESULTS[args.method]
    runs = {}
    for path in args.include:
        with open(path) as f:
            for r in json.load(f)["runs"]:
                runs[(r.get("method", "learning_progress"), r["corpus"], r["seed"])] = r
    for spec in args.runs:
        corpus, _, seed = spec.partition(":")
        key = (args.method, corpus, int(seed))
        if key not in runs:
            runs[key] = trace(args.method, corpus, int(seed), args.steps, args.reference_cache)
            print(f"{args.method} {spec}: target loss {runs[key]['target_loss']:.4f}", flush=True)
    runs = {key: run for key, run in runs.items() if RESULTS[key[0]] == name}
    title, caption = CAPTIONS[name]
    both = name == "concentration_watch"
    lines = [title, "", f"Documented defaults, {args.steps} steps (the mixture benchmark's runs). {caption} The "
             "defaults of the watch were set from these traces: tuning corpora only (the kept-aside `language` is not "
             "traced; its runs are in `mixture_effectiveness_language.md`).", "",
             "| method | corpus | seed | longest streak | domain | fired at step |"
             + (" without eval sets: longest streak | domain | fired at step |" if both else "") + " final mixture |",
             "|---|---|---|---|---|---|" + ("---|---|---|" if both else "") + "---|"]
    table = []
    for (method, corpus, seed), run in sorted(runs.items()):
        seen = replay(run)
        blind = replay(run, evaluated=False) if both else None
        table.append({"method": method, "corpus": corpus, "seed": seed, **seen,
                      **({"without_eval_sets": blind} if both else {})})
        cells = [str(seen["longest_streak"]), seen["domain"] or "–", str(seen["fired_at"] or "–")]
        if both:
            cells += [str(blind["longest_streak"]), blind["domain"] or "–", str(blind["fired_at"] or "–")]
        mix = ", ".join(f"{k} {v:.2f}" for k, v in run["mixture"].items())
        lines.append(f"| `{method}` | `{corpus}` | {seed} | " + " | ".join(cells) + f" | {mix} |")
    text = "\n".join(lines) + "\n"
    print(text)
    save_results(args.name or name, {"settings": vars(args), "table": table, "runs": list(runs.values())}, text)


if __name__ == "__main__":
    main()
