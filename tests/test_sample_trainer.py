"""Loss-based sample weighting inside the trainers (docs/methods.md#exact-modes): both exact modes give the same
gradients at (batch 8, GA 1, 1 rank), (2, 4, 1) and (4, 1, 2 ranks); each rank's weights are its slice of the 1-rank
computation on the global batch, and equal an independent NumPy computation; STORM's meta step gives the exact
look-ahead meta gradient of the trainer's real loss. Resume: tests/test_sample_resume.py.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from helpers import (
    max_relative_difference,
    pad_collate,
    run_two_ranks,
    tiny_model,
    toy_dataset,
    toy_rows,
    training_args,
)
from helpers_sample import CONFIGS, EMPTY_ROWS, ROWS, STEPS, TRUNCATION, run_sft_steps, run_steps
from test_sample_strategies import RefDropper, ref_sow

from hfweight import WeightedTrainer, WeightedTrainingArguments, register_sample_weighting
from hfweight.strategies.base import SampleWeighting

HERE = os.path.dirname(__file__)
TOLERANCE = 1e-12  # float64 model (see helpers_sample.run_steps); float32 gives ~1e-6, loss-amplified to ~1e-5


@pytest.fixture(scope="module", autouse=True)
def no_plots():
    """The end-of-training plot (tested elsewhere) costs ~1.5 s per run here; these tests run ~25 trainers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("hfweight.plots.plot_weighting_history", lambda *args, **kwargs: None)
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, no_plots):
    out = str(tmp_path_factory.mktemp("ref"))
    return {name: run_steps(config, 8, 1, out) for name, config in CONFIGS.items()}


def _normalized(w: torch.Tensor) -> np.ndarray:
    """Weights up to the global factor the step normalization cancels: mean 1 over the non-zero ones' support."""
    w = w.double().numpy()
    return w / w[w > 0].mean() if (w > 0).any() else w


def _assert_same_run(got: dict, expected: dict, tolerance: float = TOLERANCE, weight_rtol: float = 1e-6):
    for step, (g, e) in enumerate(zip(got["gradients"], expected["gradients"])):
        assert max_relative_difference(g, e) <= tolerance, f"step {step + 1}"
        assert any(d.abs().sum() > 0 for d in e.values())
    for step, (g, e) in enumerate(zip(got["weights"], expected["weights"])):
        np.testing.assert_allclose(
            g["weights"].numpy(), e["weights"].numpy(), rtol=weight_rtol, atol=weight_rtol, err_msg=f"step {step + 1}"
        )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_accumulation_invariance(name, reference, tmp_path):
    """(2, 4, 1) = (8, 1, 1) at every step, gradients and weights, in both modes (docs/methods.md#exact-modes)."""
    _assert_same_run(run_steps(CONFIGS[name], 2, 4, str(tmp_path)), reference[name])
    assert any(_departs(w, column) for _, _, w, column in _steps(reference[name])), "the weights stayed the static column"


def _departs(weights: torch.Tensor, column: np.ndarray) -> bool:
    """Whether the strategy's part of the weights (weights / column) differs between the finite-loss samples."""
    ratio = weights.double().numpy() / column
    ratio = ratio[column > 0][2:] if len(ratio) == 8 else ratio  # rows 0 and 1 of a step may be the empty rows
    return float(np.ptp(ratio / ratio.max())) > 1e-3


@pytest.mark.multiprocess
def test_two_ranks_equal_one_rank_on_the_global_batch(reference, tmp_path):
    """(4, 1, 2 ranks): the gradients equal the 1-rank ones, and rank r's weights are exactly its slice (rows 4r..4r+3
    of the step) of the 1-rank weights computed on the concatenated global batch, for every configuration."""
    prefix = str(tmp_path / "ranks")
    run_two_ranks(os.path.join(HERE, "scripts", "sample_worker.py"), prefix, "4", "1")
    ranks = [torch.load(f"{prefix}.rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name in CONFIGS:
        expected = reference[name]
        for r in (0, 1):
            assert len(ranks[r][name]["weights"]) == STEPS
            for step in range(STEPS):
                assert max_relative_difference(ranks[r][name]["gradients"][step], expected["gradients"][step]) <= TOLERANCE
                for key in ("losses", "weights"):
                    np.testing.assert_allclose(
                        ranks[r][name]["weights"][step][key].numpy(),
                        expected["weights"][step][key][4 * r : 4 * r + 4].numpy(),
                        rtol=1e-6,
                        atol=1e-7,
                        err_msg=f"{name} rank {r} step {step + 1} {key}",
                    )


# ---- the weights the trainer used vs an independent NumPy computation on the losses it saw ---------------------------

COLUMN = np.array([row["sample_weight"] for row in toy_rows(ROWS, empty_rows=EMPTY_ROWS)], dtype=np.float32)


def _steps(run):
    for step, record in enumerate(run["weights"]):
        yield step, record["losses"].double().numpy(), record["weights"], COLUMN[8 * step : 8 * step + 8]


def ref_rescale(losses_by_step, strategy: str, r: float) -> list[np.ndarray]:
    """Rescale mode of Sow et al. written out: h from the previous step's min/max (clamped), u = exp(f / r); uniform
    on the first step."""
    out, previous = [], None
    for x in losses_by_step:
        ok = np.isfinite(x)
        h = np.zeros_like(x)
        if previous is not None:
            lo, hi = previous
            h = np.clip((2 * x - (hi + lo)) / max(hi - lo, 1e-6), -1, 1)
        f = {"linupper": np.minimum(h + 1, 1.0), "quadratic": 1 - h**2, "extremes": np.abs(h)}[strategy]
        u = np.where(ok, np.exp(f / r), 0.0)
        out.append(u / u[ok].mean())
        previous = (x[ok].min(), x[ok].max())
    return out


def test_rescale_weights_equal_independent_computation(reference):
    for name, strategy, r in [("loss_rescale/token", "linupper", 0.3), ("loss_rescale_quadratic+static+domain/sample", "quadratic", 0.5)]:
        run = reference[name]
        expected = ref_rescale([x for _, x, _, _ in _steps(run)], strategy, r)
        for step, _, w, column in _steps(run):
            np.testing.assert_allclose(_normalized(w), _normalized(torch.tensor(expected[step] * column)), rtol=1e-5, err_msg=name)
    assert np.isnan(next(_steps(reference["loss_rescale/token"]))[1][:2]).all()  # the empty rows: NaN loss, weight 0


def test_score_weights_equal_independent_computation(reference):
    for _, losses, w, column in _steps(reference["loss_score/token"]):
        np.testing.assert_allclose(w.numpy(), ref_sow(losses, "extremes", 0.4) * column, rtol=1e-5, atol=1e-6)


def test_truncation_weights_equal_independent_computation(reference):
    for name in ("truncation_rescale/sample",):
        dropper = RefDropper(TRUNCATION["drop_fraction"], TRUNCATION["buffer_size"], TRUNCATION["min_samples"], 1)
        dropped = 0
        for _, losses, w, column in _steps(reference[name]):
            keep = np.array(dropper(losses.tolist()))
            dropped += int(((keep == 0) & np.isfinite(losses)).sum())
            np.testing.assert_allclose(_normalized(w), _normalized(torch.tensor(keep * column)), rtol=1e-5, err_msg=name)
        assert dropped > 0, name  # the cutoff did drop finite-loss samples


def test_sft_trainer_rescale_is_invariant_to_gradient_accumulation(tmp_path):
    """WeightedSFTTrainer (TRL's prompt-completion tokenization): loss weights (rescale mode) with DFT token weights
    give the same gradients at (8, 1) and (2, 4)."""
    config = dict(token_weighting="dft", sample_weighting="loss", sample_weighting_kwargs={"temperature": 0.3})
    a = run_sft_steps(config, 8, 1, str(tmp_path / "a"))
    b = run_sft_steps(config, 2, 4, str(tmp_path / "b"))
    assert len(a["gradients"]) == 2
    _assert_same_run(b, a, tolerance=1e-5, weight_rtol=1e-4)  # float32 here (see TOLERANCE)
    assert len(np.unique(np.round(_normalized(a["weights"][1]["weights"]), 4))) > 1  # step 2 is really weighted


# ---- STORM: the meta gradient of the trainer equals the second-order look-ahead ------------------------------------


def _per_sample(model, params, batch):
    """Token-loss sums and valid-token counts per row, plain PyTorch (functional call at ``params``)."""
    logits = torch.func.functional_call(model, params, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
    ).view(labels.shape)
    return (nll * mask).sum(1), mask.sum(1).double()


@pytest.mark.parametrize("mode,normalization", [("rescale", "token"), ("score", "sample")])
def test_storm_meta_gradient_is_the_second_order_lookahead(tmp_path, mode, normalization):
    """Step 1 trains on rows 0-3 (no meta step: no meta batch yet); step 2 on rows 4-7 runs the meta step with V =
    rows 0-3. Its gradient w.r.t. the rescaler must equal ∇_ω L_meta(θ − η ∇_θ L_train(θ, ω)) computed here with a
    second-order graph through the tiny Llama, L_train being the trainer's real step loss (static column included)."""
    lr = 0.5
    model = tiny_model()
    args = WeightedTrainingArguments(
        **training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=lr),
        sample_weighting="storm",
        sample_weighting_kwargs={"hidden": 6, "meta_lr": 0.01, "mode": mode, "kl_weight": 0.0},  # KL: unit-tested
        loss_normalization=normalization,
    )
    trainer = WeightedTrainer(model=model, args=args, train_dataset=toy_dataset(8), data_collator=pad_collate)
    storm = trainer.sample_weighting
    with torch.no_grad():  # leave the exact-1 start so that the scales depend on the features
        storm.rescaler.out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    captured = {"features": []}
    step_features, meta_update = storm.step_features, storm.meta_update

    def record_features(ctx, m):
        out = step_features(ctx, m)
        captured["features"].append(out.detach().clone())
        return out

    def record_update(objective):
        params = list(storm.rescaler.parameters())
        captured["grad"] = [g.detach().clone() for g in torch.autograd.grad(objective, params, retain_graph=True)]
        captured["rescaler"] = copy.deepcopy(storm.rescaler)
        captured["theta"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured["g_train"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return meta_update(objective)

    storm.step_features, storm.meta_update = record_features, record_update
    trainer.train()
    assert storm.meta_steps == 1 and "grad" in captured

    rows = toy_rows(8)
    v_batch, b_batch = pad_collate(rows[:4]), pad_collate(rows[4:])
    column = torch.tensor([r["sample_weight"] for r in rows[4:]], dtype=torch.float32).double()
    net = captured["rescaler"].double()
    s_v, s_b = net(captured["features"][0].double()), net(captured["features"][1].double())
    theta = {n: t.double().requires_grad_(True) for n, t in captured["theta"].items()}
    model.double()
    def math_sdpa():  # the double backward needs the math attention kernel
        return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)

    with math_sdpa():
        sums, counts = _per_sample(model, theta, b_batch)
        sums = sums.double()
        if normalization == "token":
            train_loss = (column * s_b * sums).sum() / (column * s_b * counts).sum()
        else:
            train_loss = (column * s_b * sums / counts).sum() / (column * s_b).sum()
        grads = torch.autograd.grad(train_loss, list(theta.values()), create_graph=True)
    got_g = {n: g.double() for n, g in captured["g_train"].items()}
    assert max_relative_difference({n: g.detach() for n, g in zip(theta, grads)}, got_g) < 1e-4  # the loss is the one
    lookahead = {n: t - lr * g for (n, t), g in zip(theta.items(), grads)}
    with math_sdpa():
        v_sums, v_counts = _per_sample(model, lookahead, v_batch)
        meta_loss = (s_v * v_sums.double() / v_counts).sum() / s_v.sum()
        exact = torch.autograd.grad(meta_loss, list(net.parameters()))
    for name, got, want in zip(("hidden.weight", "hidden.bias", "out.weight", "out.bias"), captured["grad"], exact):
        # measured ~1e-3 of the largest entry (the central difference in float32); leaving out the static column: 0.25
        assert (got.double() - want).abs().max() <= 5e-3 * want.abs().max(), name
    assert any(g.abs().max() > 0 for g in exact)


# ---- configuration ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["loss", "truncation", "storm"])
def test_bad_mode_fails_at_config_time(tmp_path, name):
    with pytest.raises(ValueError, match=rf"sample_weighting='{name}': `mode` must be one of \['auto', 'rescale', 'score'\]"):
        WeightedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", sample_weighting=name,
                                  sample_weighting_kwargs={"mode": "fast"})


@register_sample_weighting("test_score_only")
class ScoreOnly(SampleWeighting):
    needs_losses = True
    mode = "rescale"

    def weights(self, ctx):
        return torch.ones_like(ctx.losses)


def test_rescale_needs_the_protocol(tmp_path):
    args = WeightedTrainingArguments(**training_args(str(tmp_path)), sample_weighting="test_score_only")
    with pytest.raises(ValueError, match=r"does not implement the rescale protocol.*mode'\] = 'score'"):
        WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(8), data_collator=pad_collate)


def test_trainer_tells_truncation_the_run_length(tmp_path):
    """The glue passes max_steps × global batch (per-device batch × GA × ranks) before the first step, so the default
    hot start scales with the run (3 steps × 2 × 4 = 24 samples → window 3) and truncation acts within it."""
    base = training_args(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=3, learning_rate=0.1
    )
    trainer = WeightedTrainer(
        model=tiny_model(),
        args=WeightedTrainingArguments(**base, sample_weighting="truncation"),
        train_dataset=toy_dataset(ROWS),
        data_collator=pad_collate,
    )
    trainer.train()
    strategy = trainer.sample_weighting
    assert strategy.run_samples == 24 and (strategy.min_samples, strategy.buffer_size) == (3, 3)
    assert strategy.has_cutoff and strategy.seen == 24
