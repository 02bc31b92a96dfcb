"""Domain mixtures through the trainer: DGA's gradient alignment against a plain-PyTorch re-computation, the final
mixture reused by ``static``, WeightedSFTTrainer with per-domain evaluations, and the edge cases and bad configurations
of issue 5 (resume and streaming: tests/test_mixture_resume.py)."""

from __future__ import annotations

import json
import math
import tempfile

import datasets
import numpy as np
import pytest
import torch
from helpers import GradientCapture, pad_collate, tiny_model, toy_dataset, toy_rows, training_args
from helpers_mixture import (
    NAMES,
    RecordingCollator,
    SnapshotParameters,
    _stream_trainer,
    _token_sum,
    _trainer,
    domain_stats_run,
)

from hfweight import WeightedTrainer, WeightedTrainingArguments

# ---- per-domain statistics (what DoReMi, ODM, policy and schedule learn from) -----------------------------------------


@pytest.mark.parametrize("batch,ga", [(4, 1), (2, 3)])
def test_domain_statistics_equal_a_plain_pytorch_recomputation(batch, ga):
    """The DomainStats the controller receives at each step (token-loss sums, token and sample counts, DoReMi's excess
    loss over the reference) equal a recomputation, row by row, from the step's micro-batches and the parameters at
    the step's start; so does the logged per-domain mean loss. Checked with GA 1 and GA 3 over 3 steps (the model
    moves between steps, so stale parameters or a stale step would fail too)."""
    run = domain_stats_run(batch, ga, steps=3)
    assert len(run["received"]) == 3
    for step, (got, expected) in enumerate(zip(run["received"], run["local"])):
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
        exp = np.array(expected)
        assert (exp[1] > 0).sum() >= 2 and len(set(exp[0].round(6))) == 3  # domains present, and told apart
        assert (exp[3] > 0).any() and (exp[3] < exp[0]).all()  # the clamp at 0 matters: excess < loss
        # the reference's loss sum: the per-token clip is never below the clipped gap of the sums (Jensen), and differs
        assert (exp[4] > 0).all() and (exp[3] >= np.maximum(exp[0] - exp[4], 0) - 1e-9).all()
        logged = run["logged"][step]
        for d, name in enumerate(NAMES):
            if exp[1][d] > 0:
                assert logged[name] == pytest.approx(exp[0][d] / exp[1][d], rel=1e-5)


# ---- temperature and Skill-it through the trainer ---------------------------------------------------------------------


def test_temperature_mixture_draws_domains_in_proportion_to_size_to_the_one_over_tau():
    """mixture='temperature' (τ = 2) on unbalanced domains (code 14, math 6, prose 3 rows): the trainer counts the
    domain sizes, the controller's mixture is α_d = n_d^{1/τ} / Σ n^{1/τ}, the first logged mixture is α, and the
    resample sampler's draws over ~3000 indices match α within 4 binomial standard deviations (and are far from the
    proportional mixture, τ = 1)."""
    rows = toy_rows(40)
    sizes = {"code": 14, "math": 6, "prose": 3}
    kept = [r for d in NAMES for r in [x for x in rows if x["domain"] == d][: sizes[d]]]
    n = np.array([sizes[d] for d in NAMES], dtype=float)
    alpha = n ** 0.5 / (n ** 0.5).sum()
    trainer = _trainer(tempfile.mkdtemp(), datasets.Dataset.from_list(kept), max_steps=1, mixture="temperature",
                       mixture_mode="resample", mixture_kwargs={"temperature": 2.0, "min_prob": 0})
    np.testing.assert_allclose(trainer.mixture.probabilities().numpy(), alpha, rtol=1e-12)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    np.testing.assert_allclose([logged[f"mixture/{d}"] for d in NAMES], alpha, rtol=1e-6)

    sampler = trainer._get_train_sampler()
    domain_of_row = [r["domain"] for r in kept]
    draws = [domain_of_row[i] for _ in range(130) for i in sampler]  # 130 epochs × 23 indices
    freq = np.array([draws.count(d) for d in NAMES]) / len(draws)
    sigma = np.sqrt(alpha * (1 - alpha) / len(draws))
    assert (np.abs(freq - alpha) < 4 * sigma).all(), (freq, alpha)
    assert (np.abs(freq - n / n.sum()) > 10 * sigma).any()


def _heldout_domain_losses(parameters: dict, rows: list[dict]) -> np.ndarray:
    """Per-domain token-mean loss of held-out rows (NAMES order), each row alone through a model with ``parameters``."""
    model = tiny_model()
    model.load_state_dict(parameters)
    model.eval()
    loss_sum, tokens = np.zeros(len(NAMES)), np.zeros(len(NAMES))
    with torch.no_grad():
        for r in rows:
            s, c = _token_sum(model, pad_collate([r]))
            loss_sum[NAMES.index(r["domain"])] += float(s)
            tokens[NAMES.index(r["domain"])] += int(c)
    return loss_sum / tokens


def test_skillit_update_matches_its_formula_from_the_held_out_losses(tmp_path):
    """mixture='skillit' through the trainer (graph A, η 0.3, window 2, update every 2 steps, 4 steps): held-out
    per-domain losses are requested before training and after steps 2 and 4; each equals a by-hand token mean over that
    domain's held-out rows with the parameters of that moment; the mixture starts at softmax(η A·1) and after the evals
    at steps 2 and 4 is softmax(log p₀ + η A · Σ of the last 2 evals), p₀ uniform."""
    A = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.8, 0.0, 1.0]])
    eta, window = 0.3, 2
    heldout = toy_rows(9, seed=1)
    model = tiny_model()
    snapshots = SnapshotParameters(model)
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=9,
                        learning_rate=0.5),
        mixture="skillit", mixture_mode="resample",
        mixture_kwargs={"graph": A.tolist(), "eta": eta, "window": window, "update_every": 2, "min_prob": 0},
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=toy_dataset(40),
                              eval_dataset=datasets.Dataset.from_list(heldout), data_collator=pad_collate,
                              callbacks=[snapshots])

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    np.testing.assert_allclose(trainer.mixture.probabilities().numpy(), softmax(eta * A @ np.ones(3)), rtol=1e-12)
    evals = []  # (step, losses received, mixture right after)
    observe_eval = trainer.mixture.observe_eval

    def spy(losses, step):
        observe_eval(losses, step)
        evals.append((step, losses.numpy().copy(), trainer.mixture.probabilities().numpy()))

    trainer.mixture.observe_eval = spy
    trainer.train()
    assert [step for step, _, _ in evals] == [0, 2, 4]
    parameters_at = {0: snapshots.by_step[0], 2: snapshots.by_step[2],
                     4: {k: v.detach().clone() for k, v in model.state_dict().items()}}
    history = []
    for step, losses, probabilities in evals:
        np.testing.assert_allclose(losses, _heldout_domain_losses(parameters_at[step], heldout), rtol=1e-5)
        history.append(losses)
        if step > 0:
            expected = softmax(np.log(np.full(3, 1 / 3)) + eta * A @ np.sum(history[-window:], axis=0))
            np.testing.assert_allclose(probabilities, expected, rtol=1e-10)
    assert not np.allclose(evals[1][2], evals[2][2])  # the held-out losses moved the mixture between updates


# ---- DGA ----------------------------------------------------------------------------------------------------------


def test_dga_alignment_equals_plain_pytorch_and_leaves_training_gradients_alone(tmp_path):
    """One step (batch 2 × GA 2, resample): the per-domain inner products with the target gradient, the squared norms,
    the normalized signal and the updated mixture equal an independent autograd computation on the same rows; the
    gradient the optimizer then receives is the plain token-mean gradient of those rows."""
    train, heldout = toy_dataset(24), toy_dataset(9, seed=1)
    collator = RecordingCollator()
    model_probe = tiny_model()
    capture = GradientCapture(model_probe)
    eta = 0.7
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2),
        mixture="dga", mixture_mode="resample",
        mixture_kwargs={"target": "math", "target_batch_size": 3, "update_every": 1, "eta": eta, "min_prob": 0,
                        "normalize": "doge", "prior_pull": 0, "signal_clip": None},  # the paper's update, by hand below
    )
    trainer = WeightedTrainer(model=model_probe, args=args, train_dataset=train, eval_dataset=heldout,
                              data_collator=collator, callbacks=[capture])
    trainer.train()
    got = trainer.last_alignment
    assert got["step"] == 0

    # independent: the step's 4 rows (its first two micro-batches), their domains, the 3 held-out math rows
    domain_of = {tuple(r["input_ids"]): r["domain"] for r in toy_rows(24)}
    model = tiny_model()
    params = list(model.parameters())
    step_batches = collator.batches[:2]
    total = {d: 0 for d in NAMES}
    for b in step_batches:
        for row, ids in zip(b["labels"], b["input_ids"]):
            n = int((row[1:] != -100).sum())
            total[domain_of[tuple(ids[ids != 0].tolist())]] += n

    def domain_grad(d):
        loss = 0
        for b in step_batches:
            rows = torch.tensor([domain_of[tuple(ids[ids != 0].tolist())] == d for ids in b["input_ids"]])
            select = rows[:, None].expand(-1, b["labels"].shape[1] - 1)
            s, _ = _token_sum(model, b, select)
            loss = loss + s
        return torch.autograd.grad(loss / total[d], params, allow_unused=True)

    target_rows = [r for i, r in enumerate(toy_rows(9, seed=1)) if r["domain"] == "math"]
    tb = pad_collate(target_rows)
    s, n = _token_sum(model, tb)
    g_t = torch.autograd.grad(s / n, params)
    flat = lambda g: torch.cat([x.reshape(-1) for x in g]).double()  # noqa: E731
    dots, sq = [], []
    for d in NAMES:
        g = flat(domain_grad(d))
        dots.append(float(g @ flat(g_t)))
        sq.append(float(g @ g))
    present = np.array([total[d] > 0 for d in NAMES])
    assert 0 < present.sum() < 3  # a domain absent from the step: no gradient, NaN signal, weight unchanged
    dots, sq = np.where(present, dots, np.nan), np.where(present, sq, np.nan)
    np.testing.assert_allclose(got["inner_products"].numpy(), dots, rtol=1e-5)
    np.testing.assert_allclose(got["squared_norms"].numpy(), sq, rtol=1e-5)
    signal = dots / (np.sqrt(sq[present]).mean() + 1e-6)
    np.testing.assert_allclose(got["signal"].numpy(), signal, rtol=1e-5)
    assert got["target_squared_norm"] == pytest.approx(float(flat(g_t) @ flat(g_t)), rel=1e-5)
    z = np.log(np.full(3, 1 / 3)) + eta * np.nan_to_num(signal)
    np.testing.assert_allclose(trainer.mixture.probabilities().numpy(), np.exp(z) / np.exp(z).sum(), rtol=1e-6)

    # the optimizer's gradient: the plain token mean of the step's 4 rows
    s_all = sum(_token_sum(model, b)[0] for b in step_batches)
    n_all = sum(_token_sum(model, b)[1] for b in step_batches)
    expected = torch.autograd.grad(s_all / n_all, params)
    for (name, _), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(capture.steps[0][name], e, rtol=1e-5, atol=1e-7)


def test_dga_without_a_target_set_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"mixture='dga' aligns each domain's gradient with a target set's"):
        _trainer(tmp_path, toy_dataset(8), eval_dataset=toy_dataset(6, seed=1), mixture="dga", mixture_mode="upweight")
    with pytest.raises(ValueError, match=r"mixture_kwargs\['target'\] names \['poetry'\], not found in `eval_dataset`"):
        _trainer(tmp_path, toy_dataset(8), eval_dataset=toy_dataset(6, seed=1), mixture="dga", mixture_mode="upweight",
                 mixture_kwargs={"target": "poetry"})
    with pytest.raises(ValueError, match=r"mixture_kwargs\['target'\] must name the target set"):
        WeightedTrainingArguments(**training_args(str(tmp_path)), mixture="dga", mixture_kwargs={"target": {"a": 1}})


def test_the_trainer_tells_the_mixture_which_domains_its_eval_sets_measure(tmp_path):
    """What the concentration watch treats as wanted: the keys of an eval_dataset dict that are training domains, or
    the domains present in an eval_dataset with the domain column; unknown (None) without per-domain eval sets."""
    held = toy_dataset(12, seed=1)
    by_key = _trainer(tmp_path, toy_dataset(8), eval_dataset={"code": held, "prose": held, "all": held}, mixture="odm")
    assert by_key.mixture.evaluated.tolist() == [n in ("code", "prose") for n in NAMES]
    only_math = held.filter(lambda row: row["domain"] == "math")
    by_column = _trainer(tmp_path, toy_dataset(8), eval_dataset=only_math, mixture="doremi", mixture_mode="upweight")
    assert by_column.mixture.evaluated.tolist() == [n == "math" for n in NAMES]
    assert _trainer(tmp_path, toy_dataset(8), mixture="odm").mixture.evaluated is None
    assert _trainer(tmp_path, toy_dataset(8), eval_dataset={"validation": held}, mixture="odm").mixture.evaluated is None
    # held-out sets of every domain (what `hfweight pretrain` evaluates for its report) say nothing about which matter
    every = _trainer(tmp_path, toy_dataset(8), eval_dataset={n: held for n in NAMES}, mixture="odm")
    assert every.mixture.evaluated is None


# ---- the final mixture, reused by `static` ------------------------------------------------------------------------


def test_final_mixture_json_loads_into_static(tmp_path):
    """DoReMi writes its time-averaged mixture to mixture_weights.json; mixture='static' with that path trains on it."""
    trainer = _trainer(tmp_path / "doremi", toy_dataset(24), max_steps=3, mixture="doremi", mixture_mode="upweight")
    trainer.train()
    path = tmp_path / "doremi" / "mixture_weights.json"
    saved = json.loads(path.read_text())["weights"]
    average = trainer.mixture.average_probabilities()
    assert saved == pytest.approx(dict(zip(NAMES, average.tolist())), rel=1e-12)
    assert not torch.allclose(average, torch.full((3,), 1 / 3, dtype=torch.float64))  # it learned something
    static = _trainer(tmp_path / "static", toy_dataset(24), max_steps=1, mixture="static", mixture_mode="resample",
                      mixture_kwargs={"weights": str(path)})
    assert static.mixture.probabilities().tolist() == pytest.approx([saved[n] for n in NAMES], rel=1e-12)
    static.train()
    with pytest.raises(ValueError, match=r"mixture_kwargs\['weights'\]='nope.json': no such file"):
        WeightedTrainingArguments(**training_args(str(tmp_path)), mixture="static", mixture_kwargs={"weights": "nope.json"})


# ---- edge cases -----------------------------------------------------------------------------------------------------


def test_a_domain_that_runs_out_of_rows_is_repeated_pass_by_pass(tmp_path):
    """Resample with 90 % on a 2-row domain: its rows come back pass after pass, each pass a permutation of both."""
    rows = [r for r in toy_rows(40) if r["domain"] != "math"] + [r for r in toy_rows(40) if r["domain"] == "math"][:2]
    math_rows = {tuple(r["input_ids"]) for r in rows if r["domain"] == "math"}
    trainer = _stream_trainer(tmp_path, 5, datasets.Dataset.from_list(rows), "static",
                              {"weights": {"code": 0.05, "math": 0.9, "prose": 0.05}})
    trainer.train()
    drawn = [tuple(x for x in row if x != 0) for _, ids in trainer.seen for row in ids.tolist()]
    math_drawn = [r for r in drawn if r in math_rows]
    assert len(math_drawn) >= 12  # 20 draws at 0.9: far more than the domain's 2 rows
    for i in range(0, len(math_drawn) - 1, 2):  # pass p = draws 2p, 2p+1: both rows, in some order
        assert set(math_drawn[i : i + 2]) == math_rows


def test_a_domain_absent_from_the_step(tmp_path):
    """ODM starting with math at weight 0: math is absent from step 1, gets no reward and no logged loss; the others
    train and the mixture stays a distribution."""
    trainer = _trainer(tmp_path, toy_dataset(40), max_steps=1, per_device_train_batch_size=8, mixture="odm",
                       mixture_mode="resample",
                       mixture_kwargs={"warmup_steps": 0, "initial_weights": {"code": 1, "prose": 1}, "min_prob": 0})
    trainer.train()
    first = next(h for h in trainer.state.log_history if h.get("step") == 1 and "loss" in h)
    assert "domain_loss/math" not in first and "domain_loss/code" in first
    rewards = trainer.mixture._rewards
    assert float(rewards[1]) == 0.0 and float(rewards[0]) > 0 and float(rewards[2]) > 0
    p = trainer.mixture.probabilities()
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-12 and float(p[1]) > 0  # ε exploration


@pytest.mark.parametrize("mixture,kwargs", [("odm", {"warmup_steps": 0}), ("doremi", {})])
def test_nan_loss_in_one_domain(tmp_path, mixture, kwargs):
    """The model's logits are NaN on math rows for one step: the controller skips that domain's signal (DoReMi keeps
    its last score, ODM gives no reward) and the mixture stays finite; the per-domain logs keep the others."""
    math_rows = {tuple(r["input_ids"]) for r in toy_rows(40) if r["domain"] == "math"}
    trainer = _trainer(tmp_path, toy_dataset(40), max_steps=1, per_device_train_batch_size=6, mixture=mixture,
                       mixture_mode="upweight", mixture_kwargs=kwargs, train_sampling_strategy="sequential")
    model = trainer.model
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kw: seen.update(ids=kw["input_ids"]), with_kwargs=True)

    def poison(module, args, output):
        rows = torch.tensor([tuple(x for x in ids.tolist() if x != 0) in math_rows for ids in seen["ids"]])
        return torch.where(rows[:, None, None], torch.full_like(output, float("nan")), output)

    model.lm_head.register_forward_hook(poison)
    before = trainer.mixture.probabilities()
    with pytest.warns(UserWarning) if mixture == "doremi" else _no_warning():
        trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert "domain_loss/math" not in logged  # a NaN domain loss is not logged
    assert math.isfinite(logged["domain_loss/code"]) and math.isfinite(logged["domain_loss/prose"])
    p = trainer.mixture.probabilities()
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-12
    if mixture == "odm":
        assert float(trainer.mixture._rewards[1]) == 0.0 and float(trainer.mixture._rewards[0]) > 0
    else:
        assert float(trainer.mixture._scores[1]) == 0.0  # kept its initial score
        assert not torch.equal(p, before)  # the finite domains still moved it


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_single_domain(tmp_path):
    rows = [dict(r, domain="code") for r in toy_rows(12)]
    trainer = _trainer(tmp_path, datasets.Dataset.from_list(rows), max_steps=2, mixture="odm", mixture_mode="resample",
                       mixture_kwargs={"warmup_steps": 0})
    trainer.train()
    assert trainer.mixture.probabilities().tolist() == [1.0]
    assert json.loads((tmp_path / "mixture_weights.json").read_text()) == {"weights": {"code": 1.0}}


@pytest.mark.parametrize(
    "mixture,kwargs,message",
    [
        ("static", {"weights": {"poetry": 1.0}}, r"unknown domain\(s\) \['poetry'\]; the dataset's domains are"),
        ("static", {"weights": {"code": -1.0}}, r"gives domain 'code' the weight -1.0; weights must be finite"),
        ("skillit", {"graph": [[1, 0], [0, 1]]}, r"'graph'\] has shape 2×2; expected 3×3 for the domains"),
        ("dga", {}, r"aligns each domain's gradient with a target set's and has none"),
        ("aioli", {"lp_steps": 5, "update_every": 10}, r"one LearnParams phase takes k·lp_rounds·lp_steps = 3·2·5"),
    ],
)
def test_bad_config_through_the_trainer(tmp_path, mixture, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, toy_dataset(8), eval_dataset=toy_dataset(6, seed=1), mixture=mixture,
                 mixture_mode="upweight", mixture_kwargs=kwargs).train()


# ---- WeightedSFTTrainer, per-domain evaluation and the plot ------------------------------------------------------------


def test_sft_aioli_and_dga_with_per_domain_evals_and_plot(tmp_path):
    """Through WeightedSFTTrainer (TRL's preparation maps domains to indices): Aioli's per-domain held-out evals are
    logged and plotted, DGA finds its target among the prepared eval rows."""
    from helpers import sft_rows, tiny_tokenizer

    from hfweight import WeightedSFTConfig, WeightedSFTTrainer
    from hfweight.plots import collect_series

    for mixture, kwargs in [("aioli", {"lp_rounds": 1, "lp_steps": 1, "update_every": 4}),
                            ("dga", {"target": "math", "update_every": 2, "eta": 0.5})]:
        out = tmp_path / mixture
        args = WeightedSFTConfig(**training_args(str(out), max_steps=4, per_device_train_batch_size=2), max_length=24,
                                 bf16=False, mixture=mixture, mixture_mode="resample", mixture_kwargs=kwargs)
        trainer = WeightedSFTTrainer(model=tiny_model(), args=args, train_dataset=datasets.Dataset.from_list(sft_rows(24)),
                                     eval_dataset=datasets.Dataset.from_list(sft_rows(9, seed=1)),
                                     processing_class=tiny_tokenizer())
        trainer.train()
        series = collect_series(trainer.state.log_history)
        prefix = "mixture_eval_" if mixture == "aioli" else "dga_alignment/"
        steps = {s for key, (xs, _) in series.items() if key.startswith(prefix) for s in xs}
        assert len(steps) >= 2, sorted(series)  # logged at every evaluation / alignment
        assert (out / "weighting.png").exists() and (out / "mixture_weights.json").exists()
        p = trainer.mixture.probabilities()
        assert not torch.allclose(p, torch.full((3,), 1 / 3, dtype=torch.float64))
        # the domains the eval rows measure, named back from TRL's indices (what the domain watches spare)
        measured = [name in {row["domain"] for row in sft_rows(9, seed=1)} for name in trainer.domain_names]
        if all(measured):  # eval sets of every domain say nothing about which ones matter
            assert trainer.mixture.evaluated is None
        else:
            assert trainer.mixture.evaluated.tolist() == measured
