"""Does the offline mixture search (``hfweight.search_mixture``) find a good static mixture, and at what cost?

    python benchmarks/bench_mixture_search.py --quick                         # smoke test: 1 seed, 8 proxies, 20 steps
    python benchmarks/bench_mixture_search.py --corpus builtin --seeds 0 1 2  # the table (tens of minutes, 2 cores)
    python benchmarks/bench_mixture_search.py --corpus records --seeds 0 --scaling 8 16 32

Setup (issue 22). A corpus from ``benchmarks/corpora.py`` (``builtin``: code, prose, arithmetic + the junk domains
``redundant`` and ``noise``; ``pydocs``, ``records``, ``ops``: three clean domains + one harmful), cut into 64-token
blocks per domain; held-out blocks split into a validation half (what the search's proxies are evaluated on) and a
test half (what the final models are scored on). The target is the mean held-out loss of the clean domains.

- Final run (the model the mixture is for): the built-in ``tiny`` Llama (≈1.3M parameters incl. embeddings) from
  scratch, ``--final_steps`` steps × batch 16 × 64 tokens, lr 3e-3 cosine — the setup of
  ``bench_mixture_effectiveness.py``. Trained three ways per seed: ``stratified`` (uniform over all domains),
  ``oracle`` (uniform over the clean domains, junk left out: the best static choice given the truth) and
  ``searched`` (``mixture="static"`` with the search's weights).
- Proxies: a smaller Llama (``--proxy_size``; ``micro`` = hidden 32, 2 layers) trained ``--proxy_steps`` steps ×
  batch ``--proxy_batch`` at learning rate ``--proxy_lr`` (1e-2: a small model takes a larger one), one per proposal, through ``search_mixture`` (journal-file storage under ``--cache``, so an
  interrupted benchmark resumes and never retrains a proxy). Proposal seed = the run's seed.
- Reported per seed: the stratified → oracle gap closed ``(stratified − searched) / (stratified − oracle)`` at the
  final size; the proxies' total compute against the final run's (wall-clock seconds, and FLOPs ≈ 6 · parameters ·
  tokens); the fitted model and its out-of-fold Spearman; the search's own time (proposals + fit + choice) against
  the proxies' training time. ``--scaling`` refits on the first 8/16/32 proposals of the same study (proposals are a
  prefix-stable stream, so the 8 are the first 8 of the 32) and trains a final model on each choice.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import quiet  # noqa: E402
from corpora import corpus_spec, lm_block_splits, tokenizer_and_corpus  # noqa: E402
from harness import save_results  # noqa: E402

from hfweight.builtin import build_model  # noqa: E402

SEQ_LEN = 64
FINAL_BATCH = 16
HELDOUT_PER_DOMAIN = 32  # blocks per domain in each of the validation and test halves
PROXY_SIZES = {  # overrides of the built-in "tiny" preset (hidden 128, 4 layers)
    "micro": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 86},
    "mini": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 172},
    "tiny": {},
}
_DATA: dict = {}


def data(corpus: str):
    """(tokenizer, train blocks with `domain`, {domain: validation blocks}, {domain: test blocks})."""
    if corpus not in _DATA:
        tokenizer, raw = tokenizer_and_corpus(corpus, 0)
        _DATA[corpus] = (tokenizer, *lm_block_splits(tokenizer, raw, SEQ_LEN, HELDOUT_PER_DOMAIN))
    return _DATA[corpus]


@torch.no_grad()
def clean_test_loss(model, test: dict, clean) -> dict[str, float]:
    """Token-mean loss per clean domain on the test blocks (every position but the first is a label)."""
    model.eval()
    out = {}
    for domain in clean:
        ids = torch.tensor(test[domain]["input_ids"])
        total, count = 0.0, 0
        for start in range(0, len(ids), 32):
            rows = ids[start : start + 32]
            logits = model(input_ids=rows).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             rows[:, 1:].reshape(-1), reduction="sum"))
            count += rows[:, 1:].numel()
        out[domain] = total / count
    return out


def train_args(output_dir: str, steps: int, batch: int, seed: int, lr: float = 3e-3, **mixture):
    from hfweight import WeightedTrainingArguments

    return WeightedTrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01, logging_steps=max(1, steps),
        save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0, mixture_mode="resample", **mixture)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


ONLINE = {"doremi": {"mixture": "doremi", "mixture_kwargs": {}}, "odm": {"mixture": "odm", "mixture_kwargs": {}}}


def final_run(corpus: str, method: str, weights: dict | None, seed: int, steps: int, cache: str) -> dict:
    """The final model on one mixture: stratified, oracle, given weights, or an online mixer with its documented
    defaults (DoReMi's reference = the stratified model of the seed). Results are cached in ``cache`` (and the
    stratified model's weights, for DoReMi), so a rerun adds only what is missing."""
    from transformers import DataCollatorForLanguageModeling

    from hfweight import WeightedTrainer

    spec = corpus_spec(corpus)
    tokenizer, train, _, test = data(corpus)
    key = os.path.join(cache, f"final_{corpus}_{method}_seed{seed}_{steps}steps")
    if os.path.exists(f"{key}.json") and (weights is None or json.load(open(f"{key}.json"))["weights"] == weights):
        return json.load(open(f"{key}.json"))
    reference = None
    if method == "stratified":
        mixture = {"mixture": "temperature", "mixture_kwargs": {"temperature": "inf"}}
    elif method == "oracle":
        mixture = {"mixture": "static", "mixture_kwargs": {"weights": {d: 1.0 for d in spec.clean}}}
    elif method in ONLINE:
        mixture = ONLINE[method]
        if method == "doremi":
            final_run(corpus, "stratified", None, seed, steps, cache)
            reference = build_model(tokenizer, size="tiny", seed=seed)
            reference.load_state_dict(torch.load(
                os.path.join(cache, f"final_{corpus}_stratified_seed{seed}_{steps}steps.pt"), weights_only=True))
    else:
        mixture = {"mixture": "static", "mixture_kwargs": {"weights": weights}}
    args = train_args(tempfile.mkdtemp(prefix=f"search_final_{method}_"), steps, FINAL_BATCH, seed, **mixture)
    model = build_model(tokenizer, size="tiny", seed=seed)
    started = time.perf_counter()
    trainer = WeightedTrainer(model=model, args=args, train_dataset=train, reference_model=reference,
                              data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    seconds = time.perf_counter() - started
    losses = clean_test_loss(model, test, spec.clean)
    final_mixture = dict(zip(trainer.domain_names, trainer.mixture.final_probabilities().tolist()))
    out = {"method": method, "seed": seed, "seconds": seconds, "losses": losses,
           "target": statistics.mean(losses.values()), "weights": weights, "final_mixture": final_mixture,
           "flops": 6.0 * parameters(model) * steps * FINAL_BATCH * SEQ_LEN}
    os.makedirs(cache, exist_ok=True)
    if method == "stratified":
        torch.save(model.state_dict(), f"{key}.pt")
    with open(f"{key}.json", "w") as f:
        json.dump(out, f)
    return out


def search(corpus: str, seed: int, n_trials: int, proxy_size: str, proxy_steps: int, proxy_batch: int,
           proxy_lr: float, cache: str, final_steps: int) -> dict:
    """``search_mixture`` with proxies of ``proxy_size`` (resumable: journal file under ``cache``)."""
    from transformers import DataCollatorForLanguageModeling

    from hfweight import search_mixture

    spec = corpus_spec(corpus)
    tokenizer, train, validation, _ = data(corpus)

    def model_init():
        return build_model(tokenizer, size="tiny", seed=seed, **PROXY_SIZES[proxy_size])

    os.makedirs(cache, exist_ok=True)
    name = f"{corpus}_seed{seed}_{proxy_size}_{proxy_steps}x{proxy_batch}_lr{proxy_lr:g}"
    args = train_args(os.path.join(cache, name), proxy_steps, proxy_batch, seed, lr=proxy_lr)
    result = search_mixture(
        model_init, args, train, {d: validation[d] for d in spec.clean}, target=list(spec.clean), n_trials=n_trials,
        storage=os.path.join(cache, f"{name}.journal"), seed=seed,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), study_name=name,
        final_tokens=final_steps * FINAL_BATCH * SEQ_LEN,
    )
    proxy_params = parameters(model_init())
    report = result.report
    return {"weights": result.weights, "n_trials": n_trials, "proxy_size": proxy_size,
            "fit": report["fit"]["chosen"], "spearman": report["fit"]["spearman"],
            "proxy_seconds": report["timing"]["proxy_seconds"], "search_seconds": report["timing"]["search_seconds"],
            "proxy_flops": 6.0 * proxy_params * proxy_steps * proxy_batch * SEQ_LEN * len(report["proxies"]),
            "proxy_params": proxy_params, "best_proxy": report["best_proxy"],
            "predicted_target_loss": report["predicted_target_loss"]}


def gap_closed(stratified: float, score: float, oracle: float) -> float:
    gap = stratified - oracle
    return (stratified - score) / gap if gap != 0 else float("nan")


def mean_spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if v == v]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} (min {min(values):.{digits}f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="builtin", choices=["builtin", "pydocs", "records", "ops", "language"],
                        help="language is the kept-aside corpus: run it only once the search defaults are frozen")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n_trials", type=int, default=16)
    parser.add_argument("--scaling", type=int, nargs="*", default=[],
                        help="also refit on the first N proposals (first seed only) and train a final model on each")
    parser.add_argument("--proxy_size", default="micro", choices=list(PROXY_SIZES))
    parser.add_argument("--proxy_steps", type=int, default=30)
    parser.add_argument("--proxy_batch", type=int, default=8)
    parser.add_argument("--proxy_lr", type=float, default=1e-2, help="small proxies take a larger learning rate")
    parser.add_argument("--final_steps", type=int, default=60)
    parser.add_argument("--online", nargs="*", default=list(ONLINE), choices=list(ONLINE),
                        help="online mixers trained on the same final runs for comparison (documented defaults)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "hfweight_bench_search"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.n_trials, args.final_steps, args.scaling = [0], 8, 20, []
    name = args.name or f"mixture_search_{args.corpus}" + ("_quick" if args.quick else "")
    quiet()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    wall, loads = time.perf_counter(), [os.getloadavg()[0]]
    runs, searches = [], []
    for seed in args.seeds:
        sizes = sorted(set([args.n_trials] + (args.scaling if seed == args.seeds[0] else [])), reverse=True)
        found = {}
        for n in sizes:  # largest first: trains every proxy once; the smaller ones refit a prefix
            found[n] = search(args.corpus, seed, n, args.proxy_size, args.proxy_steps, args.proxy_batch,
                              args.proxy_lr, args.cache, args.final_steps)
            found[n]["seed"] = seed
            searches.append(found[n])
            print(f"[seed {seed}] search n={n}: {json.dumps({d: round(v, 3) for d, v in found[n]['weights'].items()})}"
                  f" fit {found[n]['fit']} spearman {found[n]['spearman']}", flush=True)
        for method in ("stratified", "oracle", *args.online):
            runs.append(final_run(args.corpus, method, None, seed, args.final_steps, args.cache))
        for n in sizes:
            runs.append(final_run(args.corpus, f"searched_{n}", found[n]["weights"], seed, args.final_steps,
                                  args.cache))
        loads.append(os.getloadavg()[0])
        for r in runs[-2 - len(args.online) - len(sizes):]:
            print(f"[seed {seed}] {r['method']:<14} target {r['target']:.4f} ({r['seconds']:.0f} s)", flush=True)
        save_results(f"{name}.partial", {"settings": vars(args), "runs": runs, "searches": searches})
    by = {(r["method"], r["seed"]): r for r in runs}
    rows = []
    for s in searches:
        seed, n = s["seed"], s["n_trials"]
        strat, oracle = by[("stratified", seed)], by[("oracle", seed)]
        final = by[(f"searched_{n}", seed)]
        rows.append({**s, "target": final["target"], "stratified": strat["target"], "oracle": oracle["target"],
                     "gap_closed": gap_closed(strat["target"], final["target"], oracle["target"]),
                     "compute_ratio_seconds": s["proxy_seconds"] / strat["seconds"],
                     "compute_ratio_flops": s["proxy_flops"] / strat["flops"],
                     "overhead": s["search_seconds"] / s["proxy_seconds"] if s["proxy_seconds"] else float("nan")})
    main_rows = [r for r in rows if r["n_trials"] == args.n_trials]

    def online_gap(method: str, seed: int) -> float:
        return gap_closed(by[("stratified", seed)]["target"], by[(method, seed)]["target"], by[("oracle", seed)]["target"])

    spec = corpus_spec(args.corpus)
    minutes = (time.perf_counter() - wall) / 60
    lines = [
        f"### Mixture search on `{args.corpus}`: {args.n_trials} `{args.proxy_size}` proxies × {args.proxy_steps} "
        f"steps × batch {args.proxy_batch} (lr {args.proxy_lr:g}) → tiny Llama {args.final_steps} steps × batch {FINAL_BATCH} × seq {SEQ_LEN}",
        "",
        f"Seeds {args.seeds}; target = mean test loss of the clean domains {list(spec.clean)}; harmful: "
        f"{list(spec.harmful)} ({spec.harm}). Wall time {minutes:.1f} min; load average "
        f"{min(loads):.1f}–{max(loads):.1f} (2 shared cores).",
        "",
        "| | mean ± std over seeds (min) |",
        "|---|---|",
        f"| stratified target loss | {mean_spread([r['stratified'] for r in main_rows], digits=4)} |",
        f"| oracle target loss | {mean_spread([r['oracle'] for r in main_rows], digits=4)} |",
        f"| searched target loss | {mean_spread([r['target'] for r in main_rows], digits=4)} |",
        f"| stratified → oracle gap closed (%) | {mean_spread([r['gap_closed'] for r in main_rows], 100, 1)} |",
        *[f"| `{m}` (online, defaults): target loss / gap closed (%) | "
          f"{mean_spread([by[(m, s)]['target'] for s in args.seeds], digits=4)} / "
          f"{mean_spread([online_gap(m, s) for s in args.seeds], 100, 1)} |" for m in args.online],
        f"| proxy compute / final run, wall-clock | {mean_spread([r['compute_ratio_seconds'] for r in main_rows])} |",
        f"| proxy compute / final run, FLOPs (6·N·D) | {mean_spread([r['compute_ratio_flops'] for r in main_rows])} |",
        f"| search overhead (proposals + fit + choice) / proxy training | "
        f"{mean_spread([r['overhead'] for r in main_rows], 100, 2)} % |",
        "",
        "| seed | proxies | fit chosen | OOF Spearman (loglinear / lightgbm) | gap closed | searched mixture |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        rho = r["spearman"]
        mix = ", ".join(f"{d} {v:.2f}" for d, v in r["weights"].items())
        lines.append(f"| {r['seed']} | {r['n_trials']} | {r['fit']} | {rho['loglinear']:.2f} / {rho['lightgbm']:.2f} "
                     f"| {100 * r['gap_closed']:.1f}% | {mix} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    save_results(name, {"settings": vars(args), "rows": rows, "runs": runs, "load": loads}, text, indent=1)


if __name__ == "__main__":
    main()
