"""Side-by-side benchmark harness: time optimizer steps and peak memory of several trainers under the same conditions.

    from harness import compare, report
    results = compare({"trainer": make_trainer, "weighted": make_weighted}, steps=20, warmup=3, repeats=3)
    report(results, "overhead")      # prints a markdown table, writes results/overhead.md and results/overhead.json

Why it is built this way:

- **Fresh trainers, alternating order.** Every repeat builds each variant's trainer anew, and odd repeats run the
  variants in reverse order, so slow drift of the machine (thermal state, other load, allocator growth) falls on all
  variants alike instead of on whichever runs last.
- **Paired ratios.** A variant's ratio to the baseline is computed inside each repeat (its median step time over the
  baseline's in the same repeat), then summarized over repeats as median [min, max]: pairing cancels drift between
  repeats, and the spread shows how much the number can be trusted.
- **Whole optimizer steps.** Step time is the interval between consecutive ``on_step_end`` callbacks, so it covers
  everything a step costs: fetching and collating the batch, the weighting's prepare phase (which runs in
  ``get_batch_samples``, before ``on_step_begin``), forward, backward and the optimizer. Warmup steps (first-call
  allocations, lazy initialization) are run but not timed. Each step's CPU time (all threads of the process) is
  kept next to its wall time: on a shared machine, other processes competing for the cores inflate wall time far
  more than CPU time, and each run records the load average so such runs can be recognized.
- **Peak memory on CPU.** Peak resident set size (RSS) over the timed steps. On Linux the kernel's own high-water mark
  (``VmHWM``) can be reset through ``/proc/self/clear_refs``, which gives the exact peak at no cost; elsewhere a
  background thread samples ``psutil`` RSS every few milliseconds. Two numbers are kept: the absolute peak, and the
  increase over the RSS at the start of the timed window (what a step adds on top of weights and optimizer state).
  Large temporaries (the ``(batch, seq, vocab)`` logits) are returned to the OS when freed, so the increase is what
  distinguishes one loss implementation from another. ``isolate=True`` runs each variant in a fresh ``spawn``
  subprocess, so no variant inherits another's heap: the honest setting for memory.

A variant is a zero-argument callable returning a ready ``transformers.Trainer`` (any subclass). The harness sets
``args.max_steps = warmup + steps`` and attaches its callback; the factory should disable saving, evaluation and
progress bars. With ``isolate=True`` factories are pickled into the subprocess: use module-level functions or
``functools.partial`` of them, not lambdas.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MIB = 1024 * 1024


# ---- memory --------------------------------------------------------------------------------------------------------


def _read_status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_kernel_peak() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where that is not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kb("VmHWM") is not None


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak RSS between :meth:`start` and :meth:`stop`: the kernel's exact high-water mark where it can be reset
    (Linux), otherwise the maximum of ``psutil`` samples taken every ``interval`` seconds by a background thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.method = None
        self.start_rss = self.peak_rss = 0
        self.running = False
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.running = True
        self.start_rss = self.peak_rss = _current_rss()
        if _reset_kernel_peak():
            self.method = "kernel VmHWM"
            return
        self.method = f"psutil sampling every {self.interval * 1000:g} ms"
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, _current_rss())

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.peak_rss = max(self.peak_rss, _current_rss())
        hwm = _read_status_kb("VmHWM") if self.method == "kernel VmHWM" else None
        if hwm is not None:
            self.peak_rss = max(self.peak_rss, hwm * 1024)


# ---- one timed run ---------------------------------------------------------------------------------------------------


def _now() -> tuple[float, float]:
    """(wall clock, CPU time of this process over all its threads)."""
    return time.perf_counter(), time.process_time()


def _step_clock(warmup: int, steps: int, memory: PeakMemory):
    """A ``TrainerCallback`` marking the end of every optimizer step; memory is watched over the timed steps only."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [_now()]
            if warmup == 0:
                memory.start()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(_now())
            done = len(self.marks) - 1
            if done == warmup:
                memory.start()
            elif done == warmup + steps:
                memory.stop()

    return StepClock()


def _load_average() -> float | None:
    """The 1-minute load average: a run under heavy outside load shows it here instead of hiding in the numbers."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover (not on every platform)
        return None


@dataclass
class RunResult:
    """One variant in one repeat."""

    step_times: list[float]
    """Wall-clock seconds per timed optimizer step."""
    cpu_times: list[float]
    """CPU seconds (all threads of the process) per timed step: less sensitive than wall time to other processes
    competing for the cores, which is what a shared machine mostly adds."""
    peak_rss_mib: float
    peak_increase_mib: float
    """Peak RSS over the timed steps minus the RSS when they started."""
    memory_method: str
    load_average: float | None = None

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_times)


def run_variant(factory: Callable, steps: int, warmup: int) -> RunResult:
    """Build the variant's trainer, train ``warmup + steps`` optimizer steps, and return the timed steps' numbers."""
    from transformers.trainer_callback import PrinterCallback

    trainer = factory()
    trainer.args.max_steps = warmup + steps
    trainer.remove_callback(PrinterCallback)  # the harness prints its own one line per run
    memory = PeakMemory()
    clock = _step_clock(warmup, steps, memory)
    trainer.add_callback(clock)
    try:
        trainer.train()
    finally:
        memory.stop()  # no-op after a complete run; stops the sampler if training ended early
    if len(clock.marks) != warmup + steps + 1:
        raise RuntimeError(f"expected {warmup + steps} optimizer steps, the trainer ran {len(clock.marks) - 1}")
    wall, cpu = ([b[i] - a[i] for a, b in zip(clock.marks, clock.marks[1:])][warmup:] for i in (0, 1))
    del trainer
    gc.collect()
    return RunResult(
        step_times=wall,
        cpu_times=cpu,
        peak_rss_mib=memory.peak_rss / MIB,
        peak_increase_mib=(memory.peak_rss - memory.start_rss) / MIB,
        memory_method=memory.method,
        load_average=_load_average(),
    )


def _run_isolated(factory: Callable, steps: int, warmup: int) -> RunResult:
    """:func:`run_variant` in a fresh ``spawn`` process: no heap, allocator state or cache shared with other runs."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_variant, factory, steps, warmup).result()


# ---- comparison ------------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


@dataclass
class VariantSummary:
    runs: list[RunResult]
    step_s: dict[str, float] = field(default_factory=dict)
    """Median wall-clock step time of each repeat, summarized over repeats."""
    ratio: dict[str, float] = field(default_factory=dict)
    """Median step time over the baseline's in the same repeat, summarized over repeats."""
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_ratio: dict[str, float] = field(default_factory=dict)
    """As ``step_s`` and ``ratio``, for CPU time per step."""
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    peak_increase_mib: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    baseline: str
    steps: int
    warmup: int
    repeats: int
    isolate: bool
    variants: dict[str, VariantSummary]
    environment: dict
    settings: dict = field(default_factory=dict)
    """Free-form description of the workload (model, batch, sequence length...), recorded in the outputs."""

    def to_dict(self) -> dict:
        return asdict(self)


def _environment() -> dict:
    """What the numbers depend on, so a result file can be compared with another machine's."""
    import torch
    import transformers

    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.is_available(),
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _order(names: list[str], repeat: int) -> list[str]:
    """Forward on even repeats, reversed on odd ones, so drift within a repeat does not favor one variant."""
    return names if repeat % 2 == 0 else names[::-1]


def _paired(runs: list[RunResult], base: list[RunResult], metric: str) -> tuple[dict, dict]:
    """``metric`` of each repeat and its ratio to the baseline's in the same repeat, each as median [min, max]."""
    values = [getattr(r, metric) for r in runs]
    ratios = [v / getattr(b, metric) for v, b in zip(values, base)]
    return _spread(values), _spread(ratios)


def _summarize(runs: dict[str, list[RunResult]], baseline: str) -> dict[str, VariantSummary]:
    out = {}
    for name, variant_runs in runs.items():
        step_s, ratio = _paired(variant_runs, runs[baseline], "median_step")
        cpu_s, cpu_ratio = _paired(variant_runs, runs[baseline], "median_cpu")
        out[name] = VariantSummary(
            runs=variant_runs,
            step_s=step_s,
            ratio=ratio,
            cpu_s=cpu_s,
            cpu_ratio=cpu_ratio,
            peak_rss_mib=_spread([r.peak_rss_mib for r in variant_runs]),
            peak_increase_mib=_spread([r.peak_increase_mib for r in variant_runs]),
        )
    return out


def compare(
    variants: dict[str, Callable],
    steps: int,
    warmup: int,
    repeats: int,
    baseline: str | None = None,
    isolate: bool = False,
    settings: dict | None = None,
    progress: Callable[[str], None] | None = print,
) -> Comparison:
    """Run every variant ``repeats`` times (fresh trainer each time, order alternating) and compare to ``baseline``.

    Args:
        variants: name → zero-argument factory returning a Trainer. Insertion order is the table's order.
        steps: timed optimizer steps per run.
        warmup: untimed optimizer steps before them.
        repeats: runs per variant.
        baseline: the variant ratios are relative to (default: the first).
        isolate: run each (variant, repeat) in a fresh ``spawn`` subprocess (factories must be picklable).
        settings: a description of the workload, copied into the result.
        progress: called with a one-line message after each run (None: silent).
    """
    names = list(variants)
    baseline = names[0] if baseline is None else baseline
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {names}")
    if steps < 1 or warmup < 0 or repeats < 1:
        raise ValueError("need steps >= 1, warmup >= 0 and repeats >= 1")
    run = _run_isolated if isolate else run_variant
    runs: dict[str, list[RunResult]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in _order(names, repeat):
            result = run(variants[name], steps, warmup)
            runs[name].append(result)
            if progress is not None:
                progress(
                    f"[repeat {repeat + 1}/{repeats}] {name}: median step {result.median_step * 1000:.1f} ms "
                    f"(CPU {result.median_cpu * 1000:.1f} ms), load {result.load_average}, peak RSS {result.peak_rss_mib:.0f} MiB (+{result.peak_increase_mib:.0f} MiB)"
                )
    return Comparison(
        baseline=baseline,
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        isolate=isolate,
        variants=_summarize(runs, baseline),
        environment=_environment(),
        settings=dict(settings or {}),
    )


# ---- reporting -------------------------------------------------------------------------------------------------------


def _fmt_spread(spread: dict[str, float], fmt: str) -> str:
    return f"{spread['median']:{fmt}} [{spread['min']:{fmt}}, {spread['max']:{fmt}}]"


def _scaled(spread: dict[str, float], factor: float) -> dict[str, float]:
    return {k: v * factor for k, v in spread.items()}


def to_markdown(result: Comparison, title: str | None = None) -> str:
    """The comparison as a markdown table; every cell is ``median [min, max]`` over the repeats."""
    lines = [f"### {title}", ""] if title else []
    header = f"{result.repeats} repeats × {result.steps} timed steps (after {result.warmup} warmup steps)"
    if result.isolate:
        header += ", each run in a fresh subprocess"
    if result.settings:
        header += "; " + ", ".join(f"{k}={v}" for k, v in result.settings.items())
    first_runs = next(iter(result.variants.values())).runs
    loads = [r.load_average for s in result.variants.values() for r in s.runs if r.load_average is not None]
    load = f" 1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f}." if loads else ""
    # Memory is only comparable between runs that start from the same state: shown for isolated runs only
    # (the JSON keeps it either way).
    memory = result.isolate
    lines += [
        header + ".",
        "Cells: median [min, max] over repeats."
        + (f" Peak memory: {first_runs[0].memory_method}." if memory else "")
        + load,
        "",
        f"| variant | step time (ms) | ratio vs `{result.baseline}` | CPU time/step (ms) | CPU ratio |"
        + (" peak RSS (MiB) | peak increase in step (MiB) |" if memory else ""),
        "|---|---|---|---|---|" + ("---|---|" if memory else ""),
    ]
    for name, summary in result.variants.items():
        cells = [
            _fmt_spread(_scaled(summary.step_s, 1000), ".1f"),
            _fmt_spread(summary.ratio, ".3f"),
            _fmt_spread(_scaled(summary.cpu_s, 1000), ".1f"),
            _fmt_spread(summary.cpu_ratio, ".3f"),
        ]
        if memory:
            cells += [_fmt_spread(summary.peak_rss_mib, ".0f"), _fmt_spread(summary.peak_increase_mib, ".0f")]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_results(
    name: str, payload: dict, markdown: str | None = None, results_dir: str = RESULTS_DIR, **json_options
) -> str:
    """Write ``<results_dir>/<name>.json`` (``payload`` through ``json.dump(payload, f, **json_options)``, e.g.
    ``indent``) and, when ``markdown`` is given, ``<name>.md``; return the JSON's path. Every benchmark writes its
    result files (partial ones too) through here."""
    os.makedirs(results_dir, exist_ok=True)
    if markdown is not None:
        with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
            f.write(markdown)
    path = os.path.join(results_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, **json_options)
    return path


def report(result: Comparison, name: str, results_dir: str = RESULTS_DIR, title: str | None = None) -> str:
    """Print the table and write ``<results_dir>/<name>.md`` and ``<name>.json``; return the markdown."""
    markdown = to_markdown(result, title)
    print(markdown)
    save_results(name, result.to_dict(), markdown, results_dir, indent=2)
    return markdown


# ---- command line --------------------------------------------------------------------------------------------------


def add_timing_arguments(parser) -> None:
    """``--steps``, ``--warmup``, ``--repeats`` and ``--quick`` on an ``argparse`` parser; unset ones are filled by
    :func:`resolve_timing` from the benchmark's full or quick preset."""
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, help="runs per variant (order alternates between repeats)")
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat: a smoke test of the benchmark")


def resolve_timing(args, full: tuple[int, int, int], quick: tuple[int, int, int]) -> None:
    """Fill ``args.steps``, ``args.warmup`` and ``args.repeats`` the command line left unset from the preset
    ``(steps, warmup, repeats)``: ``quick`` with ``--quick``, else ``full``. ``--warmup 0`` is kept."""
    steps, warmup, repeats = quick if args.quick else full
    args.steps = args.steps or steps
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = args.repeats or repeats
