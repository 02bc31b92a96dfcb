"""Per-rank memory and step time of the sharded engines against DDP, on 2 gloo CPU ranks (issue 12, "Measure and
report"): DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 vs DDP, on the built-in ``small`` model (~20M parameters), with
weighting off, with loss-based sample weights plus an online (ODM) mixture, and with PRIOR token weights
from a separate frozen reference model (issue 12 item 5: where the reference lives and what it costs).

    python benchmarks/bench_engines.py                 # 4 engines × 2 variants, 2 warm-up + 6 timed steps each
    python benchmarks/bench_engines.py --quick         # 1 warm-up + 2 timed steps

Every (engine, variant) is its own ``torchrun --nproc_per_node 2`` launch (through tests/engines.py, which also
proves the engine is the one running), so the peak RSS of one run does not carry over into the next. Per rank it
records: the peak RSS over the timed steps (kernel ``VmHWM``, reset after warm-up), the elements of the model this
rank stores, the bytes of optimizer state it holds (the engine's inner optimizer: DeepSpeed's ZeRO partitions,
FSDP2's sharded states), and the mean wall time of a timed step. Adam(W) fp32 throughout, sequence 128, batch 4 per
rank. Results: benchmarks/results/engines.{json,md} (``--name`` to change).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests")]

from harness import save_results  # noqa: E402

ENGINE_ORDER = ("ddp", "zero2", "zero3", "fsdp2")
VARIANTS = {
    "weighting_off": {},
    "loss+odm": {
        "sample_weighting": "loss",  # mode "auto": rescale under DDP/FSDP2, score (an extra forward) under DeepSpeed
        "mixture": "odm",
        "mixture_mode": "resample",
    },
    # A separate frozen reference model (PRIOR weights from its log-probs): where it lives and what it costs.
    "prior+reference": {"token_weighting": "prior"},
}
SEQ_LEN = 128
BATCH = 4


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of tensors in the innermost torch optimizer's state (DeepSpeed wraps it; its state is the partition)."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if hasattr(value, "to_local"):
                value = value.to_local()
            if hasattr(value, "numel") and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


def measure(engine: str, variant: str, warmup: str, steps: str) -> dict:
    """One rank of one run (called by tests/scripts/engine_worker.py under ``engine``)."""
    import tempfile

    import engines
    from common import quiet, timing_arguments, tokenizer_and_corpus, weighted_blocks
    from engine_cases import _reference_facts
    from harness import PeakMemory
    from transformers import DataCollatorForLanguageModeling, TrainerCallback

    from hfweight import WeightedTrainer, WeightedTrainingArguments
    from hfweight.builtin import build_model

    quiet()
    warmup, steps = int(warmup), int(steps)
    memory = PeakMemory()
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())
            if len(marks) == warmup:
                memory.start()
            elif len(marks) == warmup + steps:
                memory.stop()

    tokenizer, _ = tokenizer_and_corpus(0)
    model = build_model(tokenizer, size="small", seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        args = WeightedTrainingArguments(
            **timing_arguments(
                tmp,
                BATCH,
                max_steps=warmup + steps,
                **VARIANTS[variant],
                **engines.training_overrides(engine, type(model.model.layers[0]).__name__),
            )
        )
        reference = build_model(tokenizer, size="small", seed=1) if variant == "prior+reference" else None
        trainer = WeightedTrainer(
            model=model,
            args=args,
            train_dataset=weighted_blocks(SEQ_LEN, seed=0),
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
            callbacks=[Clock()],
            reference_model=reference,
        )
        del reference  # the trainer holds it (wrapped, and under ZeRO-3/FSDP2 sharded)
        trainer.train()
        facts = engines.assert_engine(trainer, engine)
        placed = _reference_facts(trainer)
    timed = [b - a for a, b in zip(marks[warmup - 1 :], marks[warmup:])] if warmup else []
    return {
        "engine": engine,
        "variant": variant,
        "facts": facts,
        "reference": placed,
        "peak_rss_mib": memory.peak_rss / 2**20,
        "optimizer_state_mib": _optimizer_state_bytes(trainer.optimizer) / 2**20,
        "step_seconds": sum(timed) / len(timed),
        "steps": timed,
    }


def run_all(engines_list, variants, warmup: int, steps: int) -> list[dict]:
    import engines

    os.environ["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")])
    rows = []
    for variant in variants:
        for engine in engines_list:
            started = time.perf_counter()
            ranks = engines.run_engine(engine, "bench_engines:measure", variant, str(warmup), str(steps), timeout=3600)
            print(f"{engine:6s} {variant:14s} {time.perf_counter() - started:6.0f} s launch", flush=True)
            rows.append({"engine": engine, "variant": variant, "ranks": ranks})
    return rows


def _reference_cell(reference: dict | None) -> str:
    if not reference or "local_numel" not in reference:
        return "–"
    return f"{reference['local_numel'] / 1e6:.2f}M ({reference['wrapper']})"


def to_markdown(rows: list[dict], meta: dict) -> str:
    base = {(r["variant"]): r for r in rows if r["engine"] == "ddp"}
    lines = [
        f"# Sharded engines vs DDP on 2 gloo CPU ranks — built-in `small` model ({meta['params'] / 1e6:.1f}M params)",
        "",
        f"seq {SEQ_LEN}, batch {BATCH}/rank, AdamW fp32, {meta['warmup']} warm-up + {meta['steps']} timed steps; "
        f"load average at start {meta['load']}. Per rank: peak RSS over the timed steps, model elements stored, "
        "optimizer state held, mean step time (max over ranks). Ratios vs DDP of the same variant.",
        "",
        "| variant | engine | peak RSS MiB (r0 / r1) | vs DDP | model elems/rank | optimizer state MiB/rank | "
        "reference elems/rank | step s | vs DDP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ranks, ddp = r["ranks"], base.get(r["variant"])
        peak = max(x["peak_rss_mib"] for x in ranks)
        step = max(x["step_seconds"] for x in ranks)
        ddp_peak = max(x["peak_rss_mib"] for x in ddp["ranks"]) if ddp else float("nan")
        ddp_step = max(x["step_seconds"] for x in ddp["ranks"]) if ddp else float("nan")
        lines.append(
            f"| {r['variant']} | {r['engine']} | {ranks[0]['peak_rss_mib']:.0f} / {ranks[1]['peak_rss_mib']:.0f} | "
            f"{peak / ddp_peak:.2f} | {ranks[0]['facts']['local_numel'] / 1e6:.2f}M of "
            f"{ranks[0]['facts']['full_numel'] / 1e6:.2f}M | {ranks[0]['optimizer_state_mib']:.1f} | "
            f"{_reference_cell(ranks[0]['reference'])} | {step:.2f} | "
            f"{step / ddp_step:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINE_ORDER), choices=ENGINE_ORDER)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps")
    parser.add_argument("--name", default="engines")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
    load = round(os.getloadavg()[0], 1)
    rows = run_all(args.engines, args.variants, args.warmup, args.steps)
    meta = {
        "warmup": args.warmup,
        "steps": args.steps,
        "load": load,
        "params": rows[0]["ranks"][0]["facts"]["full_numel"],
        "cpus": os.cpu_count(),
    }
    text = to_markdown(rows, meta)
    save_results(args.name, {"meta": meta, "rows": rows}, text, indent=1)
    print(text)


if __name__ == "__main__":
    main()
