"""Effectiveness of per-token weighting in SFT: plain NLL vs DFT vs Rho-1 vs PRIOR on the built-in SFT data, from a
briefly pretrained tiny model (*weak*) or from one already fine-tuned on the task (*strong*), fixed step budget,
several seeds; held-out completion NLL per domain, mean token probability, arithmetic exact match and echo word
accuracy (greedy decoding), mean ± std over seeds.

    OMP_NUM_THREADS=1 python benchmarks/bench_sft_effectiveness.py              # 4 methods × 3 seeds: ~5.5 min, ~8.5 min cold
    OMP_NUM_THREADS=1 python benchmarks/bench_sft_effectiveness.py --quick      # a smoke run (1 seed, 10 steps)
    OMP_NUM_THREADS=1 python benchmarks/bench_sft_effectiveness.py --methods nll dft rho1 prior focal rho1_start \\
        prior_start --seeds 0 1 2 3 4 --steps 300                                # the fuller version (~1 h)
    python benchmarks/bench_sft_effectiveness.py --methods nll dft focal rho1 prior --strong_steps 400 \
        --name sft_effectiveness_strong                                          # from the strong start
    python benchmarks/bench_sft_effectiveness.py --compare weak=results/sft_effectiveness_weak.json \
        strong=results/sft_effectiveness_strong.json --name cmp                  # Δ vs NLL, one table

Setup (every expensive piece is built once and cached under ``$HFWEIGHT_CACHE/bench_sft``):

- **Starting model**: the built-in tiny Llama pretrained with plain NLL for ``--start_steps`` (150) steps on the
  built-in five-domain corpus by ``hfweight pretrain``'s ``main`` (or ``--start_model DIR``, e.g. the demo's
  ``outputs/tiny/demo/pretrain``). This is the *weak* start: mean probability of a held-out completion token 0.006.
- **Strong start** (``--strong_steps K``, issue 15): the weak start already fine-tuned on the task — K steps of plain
  NLL (batch 8, lr 1e-3 cosine) on a disjoint draw of all three domains (``sft_dataset(seed=3, n=4000)``, held-out
  prompts removed). K = 400: mean token probability 0.222, held-out NLL 3.30; K = 1500 ("stronger"): 0.299, 2.80 and
  echo word accuracy 0.53. DFT's claim (Wu et al. 2025) is for models that already solve part of the task; a model
  that already predicts the completions is the closest this tiny model gets (it never learns 2-digit arithmetic).
- **Training rows**: ``sft_dataset(seed=0, n=2000)`` (arithmetic 50 %, code 35 %, redundant echo 15 %), tokenized once
  by ``trl.SFTTrainer``'s own preparation (chat template, completion-only labels, ``max_length`` 96).
- **Held-out rows**: another draw (``sft_dataset(seed=7)``) with every prompt seen in training or by the reference
  removed; 64 rows per domain for the NLL, the first 48 arithmetic ones for exact match, the redundant ones for echo
  word accuracy (share of the phrase's words in place in the greedy answer — the one task off the floor).
- **Reference** (Rho-1 and PRIOR need one): ``clean`` = the starting model fine-tuned with plain NLL, same budget,
  on the *clean* domains only (arithmetic and code, from a separate draw ``sft_dataset(seed=1)``; the redundant echo
  rows are left out, as the corpus's ``redundant`` domain is the low-value one) — Rho-1's "reference trained on
  high-quality data". ``rho1_start`` / ``prior_start`` (not run by default) use the starting model itself instead
  (PRIOR's "reference lacking the information to learn"); from a model this weak, ``p_ref`` is tiny on completion
  tokens, ``(1 − p_ref)^α ≈ 1`` and ``prior_start`` is plain NLL to 3 decimals (measured). Reference scores are
  precomputed once as a ``ref_logps`` column (``hfweight.reference.score_dataset``), which gives exactly the live
  reference's loss.
- **Runs**: ``WeightedSFTTrainer`` from the starting model, batch 8, lr 1e-3 cosine (``--learning_rate``; 5 warmup
  steps), ``--steps`` steps; the seed changes the data order only. Held-out NLL is computed in plain PyTorch (unweighted mean NLL per
  completion token), identical for every method.

Findings (60 steps, 3 seeds; ``results/sft_effectiveness.md`` and ``sft_effectiveness_extras.md``): no method beats
plain NLL on any domain. DFT fails badly from this weak model (``p`` is small on most target tokens, so it mostly
sharpens what the model already predicts; held-out NLL ends *above* the starting model's on code and redundant).
Rho-1 with the clean reference matches NLL on arithmetic/code and drops the redundant tokens, as designed (their
reference loss is high, so their excess loss is low). PRIOR with the clean reference down-weights the arithmetic
tokens the reference already predicts and learns arithmetic more slowly. Exact match stays at the floor (≤ 1/48).

Weak vs strong (issue 15; ``results/sft_effectiveness_weak_vs_strong.md``, 60 steps, 3 seeds, lr 1e-3 and 1e-4): DFT's
held-out NLL gap to plain NLL shrinks as the start gets stronger (lr 1e-3: +4.11 weak, +1.94 strong, +1.05 stronger;
lr 1e-4: +0.72, +0.18, +0.08) but never turns into a gain, and its echo word accuracy is lower too (−0.13 ± 0.05 from
the stronger start at lr 1e-3); it raises the mean token probability (it sharpens what the model predicts). Focal
stays within ±0.013 nats of NLL over all domains (up to +0.08 on arithmetic from the weak start); Rho-1 and PRIOR
cost less from a strong start and never win. DFT's claim
does not show at this scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import quiet, run_arguments  # noqa: E402
from harness import RESULTS_DIR, _load_average, save_results  # noqa: E402
from sft_common import (  # noqa: E402
    arithmetic_exact_match,
    cache_root,
    cached_dataset,
    completion_nll,
    completion_probability,
    echo_word_accuracy,
    mean_std,
    sft_tokenizer,
    tokenize_like_trl,
)

DOMAINS = ("arithmetic", "code", "redundant")
CLEAN_DOMAINS = ("arithmetic", "code")
TRAIN_ROWS, TRAIN_SEED = 2000, 0
REFERENCE_ROWS, REFERENCE_DATA_SEED = 2000, 1
HELDOUT_ROWS, HELDOUT_SEED = 800, 7
EVAL_PER_DOMAIN, EXACT_MATCH_ROWS = 64, 48
MAX_LENGTH, EVAL_MAX_LENGTH = 96, 256
BATCH_SIZE, LEARNING_RATE = 8, 1e-3
START_STEPS = 150
STRONG_ROWS, STRONG_DATA_SEED, STRONG_STEPS = 4000, 3, 400

# method → (weighting fields of WeightedSFTConfig, reference: None, "start" or "clean")
METHODS: dict[str, tuple[dict, str | None]] = {
    "nll": ({}, None),
    "dft": ({"token_weighting": "dft"}, None),
    "rho1": ({"token_weighting": "rho1", "token_weighting_kwargs": {"keep_percent": 60}}, "clean"),
    "prior": ({"token_weighting": "prior", "token_weighting_kwargs": {"alpha": 1.0}}, "clean"),
    # not in the default comparison
    "focal": ({"token_weighting": "focal", "token_weighting_kwargs": {"gamma": 1.0}}, None),
    "rho1_start": ({"token_weighting": "rho1", "token_weighting_kwargs": {"keep_percent": 60}}, "start"),
    "prior_start": ({"token_weighting": "prior", "token_weighting_kwargs": {"alpha": 1.0}}, "start"),
}
DEFAULT_METHODS = ["nll", "dft", "rho1", "prior"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- the pieces (each cached) ----------------------------------------------------------------------------------------


def start_model_dir(steps: int = START_STEPS, seed: int = 0) -> str:
    """The starting model: the built-in tiny Llama after ``steps`` steps of plain-NLL pretraining on the built-in corpus
    (``hfweight pretrain``'s ``main``, :mod:`hfweight.commands.pretrain`), built once in the cache."""
    from hfweight.builtin.corpus import atomic_build, cache_key

    params = {"steps": steps, "seed": seed, "lr": 3e-3, "batch": 16, "max_length": 128, "v": 1}
    path = os.path.join(cache_root(), f"start-{cache_key(params)}")
    if os.path.isdir(path):
        return path

    def write(out: str) -> None:
        from hfweight import WeightedTrainingArguments
        from hfweight.commands import pretrain

        script = pretrain.PretrainScriptArguments(max_length=128, max_eval_samples_per_domain=32)
        args = WeightedTrainingArguments(
            **run_arguments(
                out,
                seed,
                max_steps=steps,
                per_device_train_batch_size=16,
                learning_rate=3e-3,
                lr_scheduler_type="cosine",
                warmup_steps=10,
                weight_decay=0.01,
                logging_steps=50,
            )
        )
        pretrain.main(script, args)

    log(f"pretraining the starting model ({steps} steps) into {path}")
    atomic_build(path, write)
    return path


def _prompt_key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def heldout_raw():
    """Held-out rows: a separate draw with every prompt of the training and reference rows removed."""
    from hfweight.builtin import sft_dataset

    seen = {_prompt_key(p) for p in sft_dataset(seed=TRAIN_SEED, n=TRAIN_ROWS)["prompt"]}
    seen |= {_prompt_key(p) for p in sft_dataset(seed=REFERENCE_DATA_SEED, n=REFERENCE_ROWS)["prompt"]}
    data = sft_dataset(seed=HELDOUT_SEED, n=HELDOUT_ROWS)
    data = data.filter(lambda row: _prompt_key(row["prompt"]) not in seen)
    keep, counts = [], dict.fromkeys(DOMAINS, 0)
    for i, domain in enumerate(data["domain"]):
        if counts[domain] < EVAL_PER_DOMAIN:
            keep.append(i)
            counts[domain] += 1
    if min(counts.values()) < EVAL_PER_DOMAIN // 2:
        raise RuntimeError(f"too few unseen held-out rows per domain: {counts}")
    return data.select(keep)


def reference_rows():
    """The clean reference's training rows: arithmetic and code from a separate draw, held-out prompts removed."""
    from hfweight.builtin import sft_dataset

    heldout = {_prompt_key(p) for p in heldout_raw()["prompt"]}
    data = sft_dataset(seed=REFERENCE_DATA_SEED, n=REFERENCE_ROWS)
    return data.filter(lambda row: row["domain"] in CLEAN_DOMAINS and _prompt_key(row["prompt"]) not in heldout)


def sft_arguments(output_dir: str, steps: int, seed: int, learning_rate: float = LEARNING_RATE, **weighting):
    """The benchmark's SFT settings (batch 8, cosine schedule, 5 warm-up steps) with ``weighting`` fields; the
    references and the strong start are always built at ``LEARNING_RATE``."""
    from hfweight import WeightedSFTConfig

    return WeightedSFTConfig(
        **run_arguments(
            output_dir,
            seed,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=5,
            max_length=MAX_LENGTH,
            logging_steps=10,
            bf16=False,
            data_seed=seed,
            **weighting,
        )
    )


def nll_finetuned_dir(start_dir: str, steps: int, name: str, rows) -> str:
    """``start_dir`` fine-tuned with plain NLL for ``steps`` steps on ``rows()`` (raw conversational rows), built once
    in the cache as ``<name>-<hash>``."""
    from transformers import AutoModelForCausalLM

    from hfweight import WeightedSFTTrainer
    from hfweight.builtin.corpus import atomic_build, cache_key

    sizes = {"reference-clean": REFERENCE_ROWS, "strong": STRONG_ROWS}
    params = {"start": os.path.abspath(start_dir), "steps": steps, "rows": sizes[name], "v": 1}
    path = os.path.join(cache_root(), f"{name}-{cache_key(params)}")
    if os.path.isdir(path):
        return path

    def write(out: str) -> None:
        tokenizer = sft_tokenizer()
        data = tokenize_like_trl(rows(), tokenizer, MAX_LENGTH)
        trainer = WeightedSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(start_dir),
            args=sft_arguments(out, steps, seed=0),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model(out)

    log(f"fine-tuning {name} ({steps} steps of plain NLL) into {path}")
    atomic_build(path, write)
    return path


def clean_reference_dir(start_dir: str, steps: int) -> str:
    """The ``clean`` reference: the starting model fine-tuned with plain NLL on :func:`reference_rows`."""
    return nll_finetuned_dir(start_dir, steps, "reference-clean", reference_rows)


def strong_rows():
    """The strong start's rows: a separate draw of all three domains (the task itself), held-out prompts removed."""
    from hfweight.builtin import sft_dataset

    heldout = {_prompt_key(p) for p in heldout_raw()["prompt"]}
    data = sft_dataset(seed=STRONG_DATA_SEED, n=STRONG_ROWS)
    return data.filter(lambda row: _prompt_key(row["prompt"]) not in heldout)


def strong_start_dir(weak_dir: str, steps: int) -> str:
    """The *strong* starting model: the weak one already fine-tuned on the task (plain NLL, ``steps`` steps on
    :func:`strong_rows`, batch 8, lr 1e-3 cosine). It gives the held-out completion tokens a much higher probability
    (reported as ``heldout_p``) — the regime where DFT is claimed to help (Wu et al. 2025 fine-tune models that
    already solve part of the task)."""
    return nll_finetuned_dir(weak_dir, steps, "strong", strong_rows)


def train_rows(references: dict[str, str]):
    """Tokenized training rows with one ``ref_logps_<name>`` column per reference (precomputed, cached)."""
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling

    from hfweight.builtin import sft_dataset
    from hfweight.reference import score_dataset

    tokenizer = sft_tokenizer()

    def build():
        data = tokenize_like_trl(sft_dataset(seed=TRAIN_SEED, n=TRAIN_ROWS), tokenizer, MAX_LENGTH)
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        for name, path in references.items():
            log(f"scoring the training rows with the {name!r} reference")
            with tempfile.TemporaryDirectory() as scores:
                scored = score_dataset(
                    AutoModelForCausalLM.from_pretrained(path), data, collator, scores, batch_size=32
                )
            data = data.add_column(f"ref_logps_{name}", scored["ref_logps"])
        return data

    params = {"references": {k: os.path.abspath(v) for k, v in references.items()}, "max_length": MAX_LENGTH, "v": 1}
    return cached_dataset("train", params, build)


# ---- one run and its evaluation --------------------------------------------------------------------------------------


def evaluate(model, heldout_tokenized, heldout) -> dict:
    exact_rows = heldout.filter(lambda row: row["domain"] == "arithmetic").select(range(EXACT_MATCH_ROWS))
    echo_rows = heldout.filter(lambda row: row["domain"] == "redundant")
    return {
        "heldout_nll": completion_nll(model, heldout_tokenized),
        "heldout_p": completion_probability(model, heldout_tokenized),
        "arithmetic_exact_match": arithmetic_exact_match(model, sft_tokenizer(), exact_rows),
        "echo_word_accuracy": echo_word_accuracy(model, sft_tokenizer(), echo_rows),
    }


def train_once(method: str, seed: int, data, start_dir: str, steps: int, learning_rate: float = LEARNING_RATE):
    """Fine-tune the starting model with ``method`` for ``steps`` steps; return the trained model and train losses."""
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    from hfweight import WeightedSFTTrainer

    weighting, reference = METHODS[method]
    columns = ["input_ids", "labels", "domain"]
    if reference is not None:
        data = data.select_columns([*columns, f"ref_logps_{reference}"]).rename_column(
            f"ref_logps_{reference}", "ref_logps"
        )
    else:
        data = data.select_columns(columns)
    with tempfile.TemporaryDirectory() as out:
        trainer = WeightedSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(start_dir),
            args=sft_arguments(out, steps, seed, learning_rate, **weighting),
            train_dataset=data,
            processing_class=sft_tokenizer(),
        )
        trainer.remove_callback(PrinterCallback)  # one line per run instead
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return trainer.model, losses


# ---- report ----------------------------------------------------------------------------------------------------------


def _cell(stat: dict, fmt: str = ".3f") -> str:
    return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt.lstrip('+')}}"


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "### Per-token weighting effectiveness (tiny model, built-in SFT data)",
        "",
        f"{len(s['seeds'])} seeds × {s['steps']} steps (batch {s['batch']}, lr {s['lr']} cosine) from a tiny Llama "
        f"pretrained {s['start']}. Held-out: mean NLL per completion token over {EVAL_PER_DOMAIN} unseen rows per "
        f"domain (lower is better); exact match: greedy answer of {EXACT_MATCH_ROWS} unseen arithmetic prompts, and "
        "share of words in place in the greedy echo of the unseen redundant (\"Repeat after me\") prompts. "
        f"Cells: mean ± std over seeds (sample std). Reference `clean` = starting model fine-tuned {s['steps']} steps "
        "on arithmetic + code only (rows of its own draw); `start` = the starting model. "
        f"1-minute load average: {s['load_min']:.1f}–{s['load_max']:.1f}; OMP_NUM_THREADS={s['omp_threads']}; "
        f"wall time {s['wall_minutes']:.1f} min.",
        "",
        "| method | reference | arithmetic | code | redundant | all | arithmetic exact match | echo word accuracy "
        "| mean token p (all) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["baselines"].items():
        nll = row["heldout_nll"]
        p = f"{row['heldout_p']['all']:.3f}" if "heldout_p" in row else "–"
        echo = f"{row['echo_word_accuracy']:.3f}" if "echo_word_accuracy" in row else "–"
        lines.append(
            f"| ({name}) | – | {nll['arithmetic']:.3f} | {nll['code']:.3f} | {nll['redundant']:.3f} | {nll['all']:.3f} "
            f"| {row['arithmetic_exact_match']:.3f} | {echo} | {p} |"
        )
    for method, row in result["methods"].items():
        nll = row["heldout_nll"]
        cells = [_cell(nll[d]) for d in (*DOMAINS, "all")]
        p = _cell(row["heldout_p"]["all"]) if "heldout_p" in row else "–"
        echo = _cell(row["echo_word_accuracy"]) if "echo_word_accuracy" in row else "–"
        lines.append(
            f"| `{method}` | {row['reference'] or '–'} | "
            + " | ".join(cells)
            + f" | {_cell(row['arithmetic_exact_match'])} | {echo} | {p} |"
        )
    return "\n".join(lines) + "\n"


def start_description(args: argparse.Namespace) -> str:
    """How the starting model was made, for the report ("pretrained <this>")."""
    weak = f"from {args.start_model}" if args.start_model else f"{args.start_steps} steps on the built-in corpus"
    if not args.strong_steps:
        return weak
    return (f"{weak}, then fine-tuned {args.strong_steps} steps with plain NLL on a disjoint draw of the task "
            f"({STRONG_ROWS} rows of seed {STRONG_DATA_SEED}; the *strong* start)")


def paired_delta(method_runs: list[dict], nll_runs: list[dict], metric: str, key: str | None) -> dict:
    """Mean ± std over seeds of ``method − nll`` on the same seed for one metric (``key`` = a domain, or None)."""
    def value(run):
        return run[metric] if key is None else run[metric][key]

    return mean_std([value(m) - value(n) for m, n in zip(method_runs, nll_runs)])


COMPARED = (("heldout_nll", "arithmetic"), ("heldout_nll", "code"), ("heldout_nll", "all"),
            ("arithmetic_exact_match", None), ("echo_word_accuracy", None))


def start_summary(result: dict) -> str:
    """How a result's starting model was made, with its held-out mean token probability and NLL."""
    start = result["baselines"]["starting model"]
    return (f"pretrained {result['settings']['start']}: mean token p {start['heldout_p']['all']:.3f}, held-out NLL "
            f"{start['heldout_nll']['all']:.3f}")


def comparison_markdown(results: dict[str, dict]) -> str:
    """One table over several result files (e.g. weak and strong start): each method's held-out NLL on the clean
    domains and over all, arithmetic exact match and echo word accuracy, as paired differences to plain NLL (same
    seed)."""
    lines = [
        "### Per-token weighting from a weak and a strong start (Δ vs plain NLL, same seed)",
        "",
        "Held-out NLL per completion token (lower is better; Δ < 0 beats NLL) on the clean domains (arithmetic, code) "
        "and over all three; greedy exact match on unseen arithmetic prompts and echo word accuracy (higher is "
        "better). Mean ± sample std over seeds of the per-seed difference. Starts (each once, whatever the runs' learning rate): "
        + "; ".join(dict.fromkeys(start_summary(r) for r in results.values()))
        + ".",
        "",
        "| start | method | plain NLL: all | Δ arithmetic | Δ code | Δ all | Δ arithmetic exact match | Δ echo word "
        "accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        nll_runs = result["methods"]["nll"]["runs"]
        nll_all = result["methods"]["nll"]["heldout_nll"]["all"]
        for method, row in result["methods"].items():
            if method == "nll":
                continue
            deltas = [paired_delta(row["runs"], nll_runs, metric, key) for metric, key in COMPARED]
            lines.append(f"| {label} | `{method}` | {_cell(nll_all)} | " + " | ".join(_cell(d, "+.3f") for d in deltas)
                         + " |")
    return "\n".join(lines) + "\n"


def write_comparison(specs: list[str], name: str, results_dir: str = RESULTS_DIR) -> str:
    """Read ``LABEL=path.json`` result files and write their :func:`comparison_markdown` as
    ``<results_dir>/<name>.md``."""
    results = {}
    for spec in specs:
        label, path = spec.split("=", 1)
        with open(path) as f:
            results[label] = json.load(f)
    markdown = comparison_markdown(results)
    print(markdown)
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
    return markdown


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (and for the clean reference)")
    parser.add_argument("--start_steps", type=int, default=START_STEPS, help="pretraining steps of the starting model")
    parser.add_argument("--start_model", help="use this pretrained model directory as the starting model instead")
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE, help="peak learning rate of the runs "
                        "(the references and the strong start are built at the default)")
    parser.add_argument("--strong_steps", type=int, default=0, help="start from the *strong* model: the starting "
                        "model after this many plain-NLL SFT steps on a disjoint draw of the task (0: the weak start)")
    parser.add_argument("--compare", nargs="+", metavar="LABEL=JSON", help="no training: one table of Δ vs plain NLL "
                        "from earlier result files, e.g. weak=results/a.json strong=results/b.json")
    parser.add_argument("--quick", action="store_true", help="1 seed, 10 steps: a smoke test of the benchmark")
    parser.add_argument("--results_dir", default=RESULTS_DIR, help="where the result files go (default: %(default)s)")
    parser.add_argument(
        "--name", help="result file name under benchmarks/results (default: sft_effectiveness[_quick])"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = args.seeds[:1], 10
    args.name = args.name or "sft_effectiveness" + ("_quick" if args.quick else "")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return write_comparison(args.compare, args.name, args.results_dir)
    quiet()
    began = time.time()
    loads = [_load_average()]
    start_dir = args.start_model or start_model_dir(args.start_steps)
    if args.strong_steps:
        start_dir = strong_start_dir(start_dir, args.strong_steps)
    needed = {METHODS[m][1] for m in args.methods} - {None}
    references = {}
    if "start" in needed:
        references["start"] = start_dir
    if "clean" in needed:
        references["clean"] = clean_reference_dir(start_dir, args.steps)
    data = train_rows(references)
    heldout = heldout_raw()
    heldout_tokenized = tokenize_like_trl(heldout, sft_tokenizer(), EVAL_MAX_LENGTH)

    from transformers import AutoModelForCausalLM

    baselines = {
        "starting model": evaluate(AutoModelForCausalLM.from_pretrained(start_dir), heldout_tokenized, heldout)
    }
    if "clean" in references:
        model = AutoModelForCausalLM.from_pretrained(references["clean"])
        baselines["clean reference"] = evaluate(model, heldout_tokenized, heldout)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            model, losses = train_once(method, seed, data, start_dir, args.steps, args.learning_rate)
            metrics = evaluate(model, heldout_tokenized, heldout)
            metrics["train_losses"] = losses
            runs[method].append(metrics)
            loads.append(_load_average())
            nll = metrics["heldout_nll"]
            log(
                f"{method} seed {seed}: held-out NLL "
                + ", ".join(f"{d} {nll[d]:.3f}" for d in (*DOMAINS, "all"))
                + f"; exact match {metrics['arithmetic_exact_match']:.3f}, echo {metrics['echo_word_accuracy']:.3f}"
            )
    methods = {}
    for method, method_runs in runs.items():
        methods[method] = {
            "reference": METHODS[method][1],
            "weighting": METHODS[method][0],
            "heldout_nll": {d: mean_std([r["heldout_nll"][d] for r in method_runs]) for d in (*DOMAINS, "all")},
            "arithmetic_exact_match": mean_std([r["arithmetic_exact_match"] for r in method_runs]),
            "heldout_p": {d: mean_std([r["heldout_p"][d] for r in method_runs]) for d in (*DOMAINS, "all")},
            "echo_word_accuracy": mean_std([r["echo_word_accuracy"] for r in method_runs]),
            "runs": method_runs,
        }
    loads = [v for v in loads if v is not None] or [float("nan")]
    result = {
        "settings": {
            "seeds": args.seeds,
            "steps": args.steps,
            "batch": BATCH_SIZE,
            "lr": args.learning_rate,
            "max_length": MAX_LENGTH,
            "start": start_description(args),
            "strong_steps": args.strong_steps,
            "start_dir": start_dir,
            "references": references,
            "train_rows": len(data),
            "heldout_rows": {d: sum(1 for x in heldout["domain"] if x == d) for d in DOMAINS},
            "exact_match_rows": EXACT_MATCH_ROWS,
            "omp_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "load_min": min(loads),
            "load_max": max(loads),
            "wall_minutes": (time.time() - began) / 60,
        },
        "baselines": baselines,
        "methods": methods,
    }
    markdown = to_markdown(result)
    print(markdown)
    save_results(args.name, result, markdown, args.results_dir, indent=2)
    return result


if __name__ == "__main__":
    main()
