"""The README's main command: a chain of weighted training stages on the built-in data, then one summary table.

    hfweight demo                                  # the packaged pipeline tiny/demo (what `make demo` runs)
    hfweight demo --config tiny/demo --max_steps 4 # any extra flag goes to every stage

The pipeline file lists the stages in order; each names a training command (``pretrain``, ``sft``, ``grpo``,
``rloo``: ``script``) and its recipe (``config``: a packaged recipe name, or a path relative to the pipeline file's
folder; :func:`hfweight.resources.resolve`). A stage with ``from_previous: true`` starts from the model the stage
before it saved. Every stage writes to ``<output_dir>/<stage name>``. Stages run one after the other in this process,
each exactly as its own command would run it (same parser, same ``main``), so a stage can be re-run alone with the
command printed before it.

With ``baselines: true`` in the pipeline file (the demo's default), every stage also runs a second time with every
weighting switch off (``token_weighting``, ``sample_weighting``, ``mixture``, ``reward_weighting`` unset: the parent
trainer's behaviour, bit for bit) from the same starting model, with the same recipe, budget and seed, into
``<output_dir>/<stage name>_unweighted``; the final table puts the two side by side, so the table shows what the
weighting did. The next stage starts from the weighted model. ``--no_baselines`` skips them (half the time).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import yaml

from .. import resources
from ..entrypoints import print_summary

STAGE_SCRIPTS = ("pretrain", "sft", "grpo", "rloo")


def load_entry_point(name: str):
    """``hfweight.commands.<name>`` (it exposes ``DATACLASSES`` and ``main``)."""
    if name not in STAGE_SCRIPTS:
        raise ValueError(f"pipeline stage script {name!r}: valid: {', '.join(STAGE_SCRIPTS)}")
    return importlib.import_module(f"{__package__}.{name}")


def read_pipeline(path: str) -> dict:
    """The pipeline file, checked: a list of stages, each with a unique ``name``, a ``script`` and a ``config``."""
    with open(path) as f:
        pipeline = yaml.safe_load(f) or {}
    stages = pipeline.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: `stages` must be a non-empty list of {{name, script, config}} entries.")
    seen = set()
    for i, stage in enumerate(stages):
        missing = [key for key in ("name", "script", "config") if key not in stage]
        if missing:
            raise ValueError(f"{path}: stages[{i}] lacks {missing}; each stage needs name, script and config.")
        if stage["name"] in seen:
            raise ValueError(f"{path}: stage name {stage['name']!r} is used twice; names become output directories.")
        seen.add(stage["name"])
        if i == 0 and stage.get("from_previous"):
            raise ValueError(f"{path}: the first stage ({stage['name']!r}) has no previous stage to start from.")
        # A stage's recipe: relative to this file's folder, else a packaged recipe name (resolved now: a typo fails
        # before the first stage trains).
        stage["config"] = resources.resolve(stage["config"], resources.RECIPES, relative_to=os.path.dirname(path))
    pipeline.setdefault("output_dir", "outputs/demo")
    return pipeline


def stage_arguments(stage: dict, output_dir: str, previous_output: str | None, extra: list[str]) -> list[str]:
    """The command-line arguments of one stage: its recipe, where it writes, where it starts, the user's extras."""
    args = ["--config", stage["config"]]
    args += ["--output_dir", os.path.join(output_dir, stage["name"])]
    if stage.get("from_previous"):
        args += ["--model_name_or_path", previous_output]
    return args + list(extra)


WEIGHTING_SWITCHES = ("token_weighting", "sample_weighting", "mixture", "reward_weighting")
"""The config fields that turn weighting on; all unset gives the parent trainer's behaviour."""
UNWEIGHTED_SUFFIX = "_unweighted"


def switch_weighting_off(configs) -> None:
    """Unset every weighting switch (and its kwargs) in a stage's parsed configs, in place."""
    for config in configs:
        for name in WEIGHTING_SWITCHES:
            if hasattr(config, name):
                setattr(config, name, None)
                setattr(config, f"{name}_kwargs", {})


def run_stage(stage: dict, args: list[str], name: str, weighted: bool) -> dict:
    """One stage as its own script would run it (weighting switched off when not ``weighted``); its summary."""
    from trl import TrlParser

    print(f"    hfweight {stage['script']} " + " ".join(args), flush=True)
    module = load_entry_point(stage["script"])
    configs = TrlParser(module.DATACLASSES).parse_args_and_config(args)
    if not weighted:
        switch_weighting_off(configs)
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = module.main(*configs)
    summary["stage"] = name
    summary["minutes"] = round((time.perf_counter() - started) / 60, 2)
    # CPU time of this process (all its threads): on a shared machine the honest measure of what the stage costs
    summary["cpu_minutes"] = round((time.process_time() - cpu_started) / 60, 2)
    return summary


def run_pipeline(pipeline: dict, extra: list[str]) -> list[dict]:
    """Run every stage in order (and its unweighted baseline with ``baselines: true``); return the weighted stages'
    summaries, each with its baseline's under ``"unweighted"``."""
    summaries, previous = [], None
    started, cpu_started = time.perf_counter(), time.process_time()
    count = len(pipeline["stages"])
    for number, stage in enumerate(pipeline["stages"], start=1):
        print(f"\n=== stage {number}/{count}: {stage['name']} ===")
        args = stage_arguments(stage, pipeline["output_dir"], previous, extra)
        summary = run_stage(stage, args, stage["name"], weighted=True)
        if pipeline.get("baselines"):
            name = stage["name"] + UNWEIGHTED_SUFFIX
            print(f"\n=== stage {number}/{count}: {stage['name']}, unweighted baseline (same start, budget, seed) ===")
            args = stage_arguments({**stage, "name": name}, pipeline["output_dir"], previous, extra)
            summary["unweighted"] = run_stage(stage, args, name, weighted=False)
        summaries.append(summary)
        previous = os.path.join(pipeline["output_dir"], stage["name"])
    total, cpu_total = (time.perf_counter() - started) / 60, (time.process_time() - cpu_started) / 60
    with open(os.path.join(pipeline["output_dir"], "pipeline_summary.json"), "w") as f:
        json.dump({"minutes": round(total, 2), "cpu_minutes": round(cpu_total, 2), "stages": summaries}, f, indent=2)
    print(
        f"\n=== pipeline done in {total:.1f} min ({cpu_total:.1f} CPU min): "
        f"{os.path.join(pipeline['output_dir'], 'pipeline_summary.json')} ==="
    )
    print_summary(summaries)
    if pipeline.get("baselines"):
        print(comparison_table(summaries))
    return summaries


def stage_results(summary: dict) -> tuple[str, dict[str, float]]:
    """(what is measured, its value per domain / reward function, plus their mean) of one stage's summary."""
    if "heldout_reward" in summary:
        kind, values = "held-out mean reward (higher is better)", dict(summary["heldout_reward"])
    else:
        kind, values = "held-out loss (lower is better)", dict(summary.get("heldout_loss", {}))
    if values:
        values["mean"] = sum(values.values()) / len(values)
    return kind, values


def comparison_table(summaries: list[dict]) -> str:
    """Each weighted stage beside its unweighted baseline (same start, recipe, budget and seed): one row per
    held-out domain (or reward function) and their mean, with the difference weighted − unweighted."""
    lines = [
        "",
        "What the weighting did: each stage against the same stage with weighting off (same start, budget, seed)",
        f"{'stage':<10} {'measure':<44} {'domain / reward':<22} {'unweighted':>10} {'weighted':>10} {'Δ':>8}",
        "-" * 110,
    ]
    for summary in summaries:
        if "unweighted" not in summary:
            continue
        kind, weighted = stage_results(summary)
        _, unweighted = stage_results(summary["unweighted"])
        for key, value in weighted.items():
            base = unweighted.get(key, float("nan"))
            lines.append(
                f"{summary['stage']:<10} {kind:<44} {key:<22} {base:>10.3f} {value:>10.3f} {value - base:>+8.3f}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default="tiny/demo", help="pipeline YAML: a path or a packaged recipe name (default: tiny/demo)"
    )
    parser.add_argument("--output_dir", help="where the stages write (default: the pipeline file's output_dir)")
    parser.add_argument("--no_baselines", action="store_true", help="skip the unweighted baseline of every stage")
    args, extra = parser.parse_known_args(argv)
    pipeline = read_pipeline(resources.resolve(args.config, resources.RECIPES))
    if args.no_baselines:
        pipeline["baselines"] = False
    if args.output_dir:
        pipeline["output_dir"] = args.output_dir
    os.makedirs(pipeline["output_dir"], exist_ok=True)
    return run_pipeline(pipeline, extra)

