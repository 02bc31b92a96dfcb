"""WeightedGRPOTrainer / WeightedRLOOTrainer: parity with TRL, the reward hook, validation, the gradient Gram,
prompt-domain mixtures, resume, edge cases and configuration errors (docs/methods.md#rewards)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from helpers import GradientCapture, assert_same_state, tiny_model, tiny_tokenizer
from helpers_rl import (
    REWARDS,
    constant_reward,
    gappy,
    hit_reward,
    make_trainer,
    prompt_dataset,
    recording,
    rl_args,
)
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer
from hfweight.rl import DomainRepeatSampler, domain_reward_signal, group_advantages

PAIRS = {
    "grpo": (GRPOTrainer, GRPOConfig, WeightedGRPOTrainer, WeightedGRPOConfig),
    "rloo": (RLOOTrainer, RLOOConfig, WeightedRLOOTrainer, WeightedRLOOConfig),
}
VOLATILE = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")


def _logs(trainer):
    return [{k: v for k, v in h.items() if not k.endswith(VOLATILE)} for h in trainer.state.log_history]


def _params(trainer):
    return {k: p.detach().clone() for k, p in trainer.model.named_parameters()}


def _weight_logs(trainer, prefix="reward_weight/"):
    return [{k: v for k, v in h.items() if k.startswith(prefix)} for h in trainer.state.log_history if "loss" in h]


# ---- drop-in parity -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", sorted(PAIRS))
def test_weighting_off_is_the_parent(algo, tmp_path):
    parent, parent_config, weighted, weighted_config = PAIRS[algo]
    a = make_trainer(parent, parent_config, tmp_path / "a", max_steps=3)
    a.train()
    b = make_trainer(weighted, weighted_config, tmp_path / "b", max_steps=3)
    b.train()
    assert len([h for h in _logs(a) if "loss" in h]) == 3
    assert _logs(a) == _logs(b)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("algo", sorted(PAIRS))
def test_static_weighting_equals_the_parents_reward_weights(algo, tmp_path):
    """The hook itself: weights set through hfweight land exactly where TRL's `reward_weights` do."""
    parent, parent_config, weighted, weighted_config = PAIRS[algo]
    a = make_trainer(parent, parent_config, tmp_path / "a", reward_weights=[2.0, 0.5, 1.5])
    a.train()
    b = make_trainer(
        weighted, weighted_config, tmp_path / "b", reward_weighting="static",
        reward_weighting_kwargs={"weights": {"hit_reward": 2.0, "short_reward": 0.5, "low_reward": 1.5}},
    )
    b.train()
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(a) == losses(b)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert _weight_logs(b)[-1] == {"reward_weight/hit_reward": 2.0, "reward_weight/short_reward": 0.5,
                                   "reward_weight/low_reward": 1.5}


# ---- the advantages TRL forms, reproduced ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo,options",
    [
        ("grpo", {}),
        ("grpo", {"multi_objective_aggregation": "normalize_then_sum"}),
        ("grpo", {"scale_rewards": "batch"}),
        ("rloo", {}),
        ("rloo", {"normalize_advantages": True}),
    ],
)
def test_group_advantages_reproduce_trl(algo, options, tmp_path):
    parent, parent_config, _, _ = PAIRS[algo]
    rewards = [gappy(r) for r in REWARDS]
    trainer = make_trainer(
        recording(parent), parent_config, tmp_path, rewards=rewards, max_steps=2,
        per_device_train_batch_size=8, reward_weights=[1.5, 0.25, 2.0], **options,
    )
    trainer.train()
    seen_nan_row = False
    for r, adv in zip(trainer.recorded["rewards"], trainer.recorded["advantages"]):
        seen_nan_row |= bool(torch.isnan(r).all(dim=1).any())
        kind = dict(algorithm=algo)
        if algo == "grpo":
            kind.update(aggregation=trainer.multi_objective_aggregation, scale_rewards=trainer.scale_rewards)
        else:
            kind.update(normalize_advantages=trainer.normalize_advantages)
        ours = group_advantages(r, torch.tensor([1.5, 0.25, 2.0]), trainer.num_generations, **kind)
        torch.testing.assert_close(ours, adv, rtol=1e-5, atol=1e-6)
    assert seen_nan_row, "the test data should contain an unscorable (all-NaN) row"


# ---- dynamic weights in the trainer ---------------------------------------------------------------------------------


def test_saw_weights_are_computed_on_the_batch_they_weight(tmp_path):
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, reward_weighting="saw",
        per_device_train_batch_size=8, max_steps=3,
    )
    trainer.train()
    for r, w, adv in zip(trainer.recorded["rewards"], trainer.recorded["weights"], trainer.recorded["advantages"]):
        a = r.double().numpy()
        a = a[~np.isnan(a).all(axis=1)]
        cv = np.nanstd(a, axis=0) / np.maximum(np.abs(np.nanmean(a, axis=0)), 1e-8)
        expected = 3 * cv / cv.sum() if cv.sum() > 0 else np.ones(3)
        np.testing.assert_allclose(w.double().numpy(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            group_advantages(r, w, 4, algorithm="grpo"), adv, rtol=1e-5, atol=1e-6
        )
    logged = _weight_logs(trainer)
    np.testing.assert_allclose([list(h.values()) for h in logged], [w.tolist() for w in trainer.recorded["weights"]])


def test_gradient_gram_is_trls_policy_gradient_per_reward(tmp_path):
    """g_k (the gradient hfweight backpropagates for reward k) equals the gradient TRL's own GRPO step takes with
    `reward_weights` = e_k on the same generation; the update is softmax(log p + lr/reg · Σ_j S_kj)."""
    reg = 1e-3
    ours = make_trainer(
        WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path / "w", reward_weighting="gradient",
        reward_weighting_kwargs={"reg": reg, "clip_norm": None}, reward_gradient_parameters=r"^lm_head\.",
        max_steps=1, max_grad_norm=0.0,
    )
    ours.train()
    got = ours._last_reward_gradients
    expected = []
    for k in range(3):
        model = tiny_model(0)
        capture = GradientCapture(model)
        weights = [0.0] * 3
        weights[k] = 1.0
        parent = GRPOTrainer(
            model=model, reward_funcs=list(REWARDS),
            args=GRPOConfig(**rl_args(str(tmp_path / f"p{k}"), max_steps=1, max_grad_norm=0.0, reward_weights=weights)),
            train_dataset=prompt_dataset(), processing_class=tiny_tokenizer(), callbacks=[capture],
        )
        parent.train()
        expected.append(capture.steps[0]["lm_head.weight"].flatten())
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    gram = (expected.double() @ expected.double().T).numpy()
    # The glue passes the scheduler's current rate (the authors' get_last_lr), here the initial learning rate.
    logits = np.log(np.ones(3) / 3) + (ours.args.learning_rate / reg) * gram.sum(1)
    p = np.exp(logits - logits.max())
    np.testing.assert_allclose(ours.reward_weighting.current_weights().double().numpy(), 3 * p / p.sum(), rtol=1e-5)


def test_gradient_clipping_uses_full_model_norms_through_the_trainer(tmp_path):
    """The default clipping path (clip_norm=1.0, clip_scope='model') through a trainer, with the Gram over a subset
    (lm_head): each reward's gradient is clipped by the norm of its gradient over *every* trainable parameter (the
    authors clip the full actor gradient, then keep target layers). The full gradients come from an independent run
    over all parameters without clipping (the test above ties those to TRL's own per-reward gradients)."""
    reg = 1e-3
    full = make_trainer(
        WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path / "full", reward_weighting="gradient",
        reward_weighting_kwargs={"reg": reg, "clip_norm": None}, max_steps=1, max_grad_norm=0.0,
    )
    full.train()
    names = [n for n, p in full.model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in full.model.named_parameters() if p.requires_grad]
    start = sum(sizes[: names.index("lm_head.weight")])
    g_full = full._last_reward_gradients.double()
    g_head = g_full[:, start : start + sizes[names.index("lm_head.weight")]]
    norms = g_full.norm(dim=1)
    assert bool((norms > 1.0).all()) and not torch.allclose(norms, g_head.norm(dim=1))  # clipping bites, and differs
    expected_weights = {}
    for scope, clip_by in (("model", norms), ("selected", g_head.norm(dim=1))):
        coef = (1.0 / (clip_by + 1e-6)).clamp(max=1.0)
        gram = (coef[:, None] * (g_head @ g_head.T) * coef[None, :]).numpy()
        logits = np.log(np.ones(3) / 3) + (full.args.learning_rate / reg) * gram.sum(1)
        p = np.exp(logits - logits.max())
        expected_weights[scope] = 3 * p / p.sum()
    for scope, kwargs in (("model", {"reg": reg}), ("selected", {"reg": reg, "clip_scope": "selected"})):
        subset = make_trainer(
            WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path / scope, reward_weighting="gradient",
            reward_weighting_kwargs=kwargs, reward_gradient_parameters=r"^lm_head\.", max_steps=1,
            max_grad_norm=0.0,
        )
        subset.train()
        torch.testing.assert_close(subset._last_reward_gradients.double(), g_head, rtol=1e-4, atol=1e-7)
        got = subset.reward_weighting.current_weights().double().numpy()
        np.testing.assert_allclose(got, expected_weights[scope], rtol=1e-5)
    assert not np.allclose(expected_weights["model"], expected_weights["selected"], rtol=1e-3)


def test_hypervolume_validates_before_training_and_every_n_steps(tmp_path):
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, reward_weighting="hypervolume",
        reward_validation_steps=2, max_steps=4, eval_dataset=prompt_dataset(8, seed=1), per_device_eval_batch_size=4,
    )
    seen = []
    observe = trainer.reward_weighting.observe_validation
    trainer.reward_weighting.observe_validation = lambda scores, step: (seen.append((step, scores.clone())),
                                                                         observe(scores, step))[1]
    trainer.train()
    assert [step for step, _ in seen] == [0, 2, 4]
    # Validations inside the step-end callback do not swallow the training logs of those steps.
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4]
    # Each validation: 8 prompts × 4 generations (8 eval batches of 4); the scores are the column means over the
    # rewards that were scored (NaN = a reward function returned None), computed here with NumPy's nanmean.
    rows = trainer.recorded["validation_rewards"]
    assert len(rows) == 24 and sum(len(r) for r in rows) == 3 * 32
    for i, (_, scores) in enumerate(seen):
        batch = torch.cat(rows[8 * i : 8 * i + 8])
        expected = np.nanmean(batch.double().numpy(), axis=0)
        np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-6)
    assert trainer.reward_weighting.reference is not None


def _nelder_mead_candidates(simplex, alpha=1.0, gamma=2.0, rho=0.5, sigma=0.5):
    """Textbook Nelder–Mead (minimization) as a generator: yields the next point to evaluate, receives its value.
    Order (stable), reflect; accept if f_best ≤ f_r < f_second-worst; expand if f_r < f_best (keep the better of the
    expansion and the reflection); otherwise contract inside, and shrink towards the best if that fails."""
    points = [np.asarray(v, dtype=float) for v in simplex]
    values = []
    for x in points:
        values.append((yield x))
    while True:
        order = sorted(range(len(points)), key=lambda i: values[i])
        points, values = [points[i] for i in order], [values[i] for i in order]
        centroid = np.mean(points[:-1], axis=0)
        reflected = centroid + alpha * (centroid - points[-1])
        f_r = yield reflected
        if values[0] <= f_r < values[-2]:
            points[-1], values[-1] = reflected, f_r
        elif f_r < values[0]:
            expanded = centroid + gamma * (reflected - centroid)
            f_e = yield expanded
            points[-1], values[-1] = (expanded, f_e) if f_e < f_r else (reflected, f_r)
        else:
            contracted = centroid + rho * (points[-1] - centroid)
            f_c = yield contracted
            if f_c < values[-1]:
                points[-1], values[-1] = contracted, f_c
            else:
                points = [points[0]] + [points[0] + sigma * (x - points[0]) for x in points[1:]]
                values = values[:1]
                for x in points[1:]:
                    values.append((yield x))


def test_nelder_mead_moves_the_thresholds_by_its_simplex_rule_through_grpo(tmp_path):
    """Constrained weights with the Nelder–Mead threshold search, through WeightedGRPOTrainer: every validation
    (patience 1) tells the candidate thresholds the negated task score (brevity), and the thresholds used from then on
    are the next point of a textbook Nelder–Mead run on those values, starting from the simplex τ, τ + 0.2·τ_i e_i.
    The training steps log and use the current candidate."""
    tau = {"hit_reward": 0.2, "low_reward": 0.5}
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, reward_weighting="constrained",
        reward_weighting_kwargs={"task": "short_reward", "thresholds": tau, "nelder_mead": True, "nm_patience": 1,
                                 "nm_step": 0.2, "nm_tol": 0.0},
        reward_validation_steps=1, max_steps=6, eval_dataset=prompt_dataset(4, seed=1), per_device_eval_batch_size=4,
    )
    weighter = trainer.reward_weighting
    seen = []  # (thresholds in force, validation scores) at each validation
    observe = weighter.observe_validation

    def spy(scores, step, *args, **kwargs):
        seen.append((step, [weighter.thresholds[n] for n in tau], scores.clone()))
        return observe(scores, step, *args, **kwargs)

    weighter.observe_validation = spy
    trainer.train()
    assert [step for step, _, _ in seen] == list(range(7))

    search = _nelder_mead_candidates([[0.2, 0.5], [0.2 * 1.2, 0.5], [0.2, 0.5 * 1.2]])
    candidate = next(search)
    after = []
    for _, in_force, scores in seen:
        np.testing.assert_allclose(in_force, candidate, rtol=1e-12)
        candidate = search.send(-float(scores[1]))  # the task, short_reward, is column 1; minimize −score
        after.append(candidate)
    assert len({tuple(np.round(c, 9)) for c in after}) >= 4  # the search went past its initial simplex
    assert any(not np.allclose(c, v) for c in after[2:] for v in [[0.2, 0.5], [0.24, 0.5], [0.2, 0.6]])
    # Training step s (1-based) runs after validation s − 1: it logs and uses that validation's next candidate.
    logged = [h for h in trainer.state.log_history if "loss" in h]
    for s, h in enumerate(logged, start=1):
        got = [h[f"threshold/{n}"] for n in tau]
        np.testing.assert_allclose(got, after[s - 1], rtol=1e-12, err_msg=f"step {s}")


# ---- prompt-domain mixtures -----------------------------------------------------------------------------------------


def test_domain_reward_signal_by_hand():
    nan = float("nan")
    combined = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, nan, nan, 0.0, 1.0, nan, 1.0])
    domains = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    sums, counts = domain_reward_signal(combined, domains, 4, 2, "learnability")
    # group 0 (domain 0): p = 3/4 → p(1−p) = 3/16; group 1 (domain 1): {0.5, 0.5} → 0; group 2 (domain 0): {0,1,1}
    # mean 2/3 → var 2/9
    torch.testing.assert_close(sums, torch.tensor([3 / 16 + 2 / 9, 0.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([2.0, 1.0], dtype=torch.float64))
    sums, _ = domain_reward_signal(combined, domains, 4, 2, "regret")
    torch.testing.assert_close(sums, torch.tensor([(1 - 0.75) + (1 - 2 / 3), 0.5], dtype=torch.float64))


def test_domain_repeat_sampler_keeps_trls_structure():
    class Fixed:
        def __init__(self, order):
            self.order = order

        def __iter__(self):
            return iter(self.order)

        def __len__(self):
            return len(self.order)

    sampler = DomainRepeatSampler(Fixed([5, 2, 7, 1, 9]), mini_repeat_count=2, batch_size=2, repeat_count=3)
    assert list(sampler) == [5, 5, 2, 2] * 3 + [7, 7, 1, 1] * 3  # the incomplete chunk [9] is dropped, as in TRL
    assert len(sampler) == 24


def test_prompt_mixture_draws_only_weighted_domains_and_observes_rewards(tmp_path):
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, mixture="static",
        mixture_kwargs={"weights": {"a": 1.0, "b": 0.0, "c": 0.0}}, max_steps=3, per_device_train_batch_size=8,
    )
    trainer.train()
    domains = [d for batch in trainer.recorded["domains"] for d in batch]
    assert len(domains) == 24 and set(domains) == {"a"}
    for batch in trainer.recorded["domains"]:  # complete groups of num_generations identical prompts
        assert all(len(set(batch[i : i + 4])) == 1 for i in range(0, len(batch), 4))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["mixture/a"] == 1.0 and "domain_signal/a" in h for h in logs)


def test_prompt_mixture_odm_learns_from_the_reward_signal(tmp_path):
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, mixture="odm",
        mixture_kwargs={"warmup_steps": 0}, mixture_reward_signal="regret", max_steps=3, per_device_train_batch_size=8,
    )
    calls = []
    observe = trainer.mixture.observe
    trainer.mixture.observe = lambda stats: (calls.append(stats), observe(stats))[1]
    trainer.train()
    assert len(calls) == 3
    for stats, r, w, doms in zip(calls, trainer.recorded["rewards"], trainer.recorded["weights"],
                                 trainer.recorded["domains"]):
        combined = (r * w).nansum(dim=1)
        for d, name in enumerate(trainer.domain_names):
            rows = [i for i, x in enumerate(doms) if x == name]
            if not rows:
                assert stats.sample_count[d] == 0
                continue
            groups = combined[rows].view(-1, 4)
            assert stats.loss_sum[d].item() == pytest.approx(float((1 - groups.mean(dim=1)).sum()), rel=1e-6)
    p = trainer.mixture.probabilities()
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6


@pytest.mark.parametrize("mixture", ["doremi", "aioli"])
def test_prompt_mixtures_that_need_losses_are_refused(mixture, tmp_path):
    kwargs = {"doremi": {}, "aioli": {}}[mixture]
    with pytest.raises(ValueError, match="learns from"):
        make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path, mixture=mixture, mixture_kwargs=kwargs)


# ---- state: checkpoints, artifacts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", sorted(PAIRS))
def test_resume_restores_the_weighter_exactly(algo, tmp_path):
    _, _, weighted, config = PAIRS[algo]
    kwargs = dict(
        reward_weighting="constrained", reward_weighting_kwargs={"thresholds": [0.9, 0.5], "dual_lr": 0.5},
        mixture="odm", mixture_kwargs={"warmup_steps": 0}, max_steps=4, save_strategy="steps", save_steps=2,
    )
    straight = make_trainer(weighted, config, tmp_path / "a", **kwargs)
    straight.train()
    resumed = make_trainer(weighted, config, tmp_path / "b", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    # The resumed run's history holds steps 1–2 from the checkpoint and its own steps 3–4.
    for prefix in ("reward_weight/", "lagrange/", "violation/", "mixture/", "domain_signal/"):
        assert _weight_logs(straight, prefix) == _weight_logs(resumed, prefix), prefix
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert losses(straight) == losses(resumed)
    assert straight.reward_weighting.state_dict() == resumed.reward_weighting.state_dict()
    assert_same_state(straight.mixture.state_dict(), resumed.mixture.state_dict(), "mixture")  # incl. its watch


def test_artifacts_and_model_card_record_the_final_reward_weights(tmp_path):
    trainer = make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path, reward_weighting="popart", max_steps=2)
    trainer.train()
    with open(tmp_path / "weighting_summary.json") as f:
        summary = json.load(f)
    final = trainer.reward_weighting.current_weights().tolist()
    assert summary["final_reward_weights"] == pytest.approx(dict(zip(trainer.reward_func_names, final)))
    assert summary["config"]["reward_weighting"] == "popart"
    assert os.path.exists(tmp_path / "weighting.png")
    from hfweight.plots import collect_series

    plotted = collect_series(trainer.state.log_history)
    assert {f"reward_weight/{n}" for n in trainer.reward_func_names} <= set(plotted)
    assert plotted["reward_weight/hit_reward"][1] == [h["reward_weight/hit_reward"] for h in _weight_logs(trainer)]
    trainer.create_model_card()
    card = open(tmp_path / "README.md").read()
    assert "popart" in card and "hit_reward" in card and "weighting.png" in card


# ---- edge cases and errors -----------------------------------------------------------------------------------------


def test_constant_objective_gets_zero_weight_and_nan_rows_are_harmless(tmp_path):
    rewards = [gappy(hit_reward), gappy(constant_reward), gappy(REWARDS[2])]
    trainer = make_trainer(
        recording(WeightedRLOOTrainer), WeightedRLOOConfig, tmp_path, rewards=rewards, reward_weighting="saw",
        per_device_train_batch_size=8, max_steps=2,
    )
    trainer.train()
    for w in trainer.recorded["weights"]:
        assert torch.isfinite(w).all() and w[1] == 0.0
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_rloo_keeps_the_total_of_the_weights_fixed(tmp_path):
    """RLOO is sensitive to the weights' absolute scale: popart defaults to fixed_sum there, and every dynamic weighter
    keeps Σ|w| at the initial total — checked with non-unit initial weights [1, 2, 0.5] (total 3.5; with all-ones
    initial weights the claim holds trivially for SAW's K·s/Σs), and K − 1 = 2 for constrained."""
    assert WeightedRLOOConfig(**rl_args(str(tmp_path), reward_weighting="popart")).reward_weighting_kwargs == {
        "fixed_sum": True
    }
    assert WeightedGRPOConfig(**rl_args(str(tmp_path), reward_weighting="popart")).reward_weighting_kwargs == {}
    initial = [1.0, 2.0, 0.5]
    cases = (
        ("popart", 3.5, {}),
        ("saw", 3.5, {}),
        ("saw", 3.5, {"saturation_gamma": 2.0}),
        ("saw", 3.5, {"statistic": "none", "saturation_gamma": 2.0}),
        ("gradient", 3.5, {"reg": 1e-4}),
        ("hypervolume", 3.5, {}),
        ("constrained", 2.0, {"thresholds": [0.9, 0.5]}),
    )
    for i, (name, total, kwargs) in enumerate(cases):
        trainer = make_trainer(
            recording(WeightedRLOOTrainer), WeightedRLOOConfig, tmp_path / f"{name}{i}", reward_weighting=name,
            reward_weighting_kwargs=kwargs, per_device_train_batch_size=8, max_steps=2,
            reward_weights=None if name == "constrained" else initial, reward_validation_steps=1,
            eval_dataset=prompt_dataset(4, seed=1) if name == "hypervolume" else None,
        )
        trainer.train()
        changed = False
        for w in trainer.recorded["weights"]:
            assert float(w.abs().sum()) == pytest.approx(total, rel=1e-5), (name, kwargs, w)
            changed |= not torch.allclose(w, torch.tensor(initial))
        assert changed or name == "hypervolume", (name, kwargs)  # the weighter did reweight (not a trivial pass)


def test_saw_weights_by_hand_with_non_unit_initial_weights():
    """SAW's weights against a hand computation: w ∝ w0 · CV (· (1 − sat)^γ), rescaled to Σ w0."""
    from hfweight.strategies.rewards import SAWWeighting

    rewards = torch.tensor([[0.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 4.0], [1.0, 2.0, 4.0]])
    w0 = torch.tensor([1.0, 2.0, 0.5])
    mean = rewards.double().mean(0)
    cv = rewards.double().std(0, unbiased=False) / mean
    saturation = (rewards == rewards.max(0).values).double().mean(0)  # [0.75, 0.25, 0.5]
    for gamma, factor in ((None, torch.ones(3, dtype=torch.float64)), (2.0, (1 - saturation) ** 2)):
        saw = SAWWeighting(saturation_gamma=gamma)
        saw.bind(["a", "b", "c"], w0)
        raw = w0.double() * cv * factor
        expected = raw * 3.5 / raw.sum()
        torch.testing.assert_close(saw.weights(rewards, 0).double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,kwargs", [("popart", {"fixed_sum": True}), ("saw", {}), ("constrained", {}),
                                         ("gradient", {})])
def test_one_objective_keeps_its_weight(name, kwargs, tmp_path):
    trainer = make_trainer(
        recording(WeightedGRPOTrainer), WeightedGRPOConfig, tmp_path, rewards=[hit_reward], reward_weighting=name,
        reward_weighting_kwargs=kwargs, max_steps=2,
    )
    trainer.train()
    assert all(torch.equal(w, torch.ones(1)) for w in trainer.recorded["weights"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reward_weighting": "static", "reward_weighting_kwargs": {"weights": [1.0, 2.0]}}, "K = 3"),
        ({"reward_weighting": "constrained", "reward_weighting_kwargs": {"thresholds": [0.5]}}, "thresholds"),
        ({"reward_weighting": "hypervolume"}, "eval_dataset"),
        ({"reward_weighting": "gradient", "reward_gradient_parameters": "nothing_matches"}, "matches no trainable"),
    ],
)
def test_bad_reward_configuration_at_trainer_init(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"reward_weighting": "nope"}, "reward_weighting='nope'"),
        ({"token_weighting": "dft"}, "token_weighting"),
        ({"sample_weighting": "loss"}, "sample_weighting"),
        ({"mixture": "odm", "mixture_mode": "upweight"}, "resample"),
        ({"reward_validation_steps": 0}, "reward_validation_steps"),
        ({"mixture_reward_signal": "loss"}, "mixture_reward_signal"),
        ({"reward_weighting": "popart", "reward_weighting_kwargs": {"beta": -1}}, "beta"),
    ],
)
@pytest.mark.parametrize("config", [WeightedGRPOConfig, WeightedRLOOConfig])
def test_bad_configuration_fails_at_config_time(config, overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        config(**rl_args(str(tmp_path), **overrides))


# ---- two ranks ------------------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("algo", sorted(PAIRS))
def test_two_ranks_use_identical_weights_and_probabilities(algo, tmp_path):
    from helpers import run_two_ranks

    prefix = str(tmp_path / "rl")
    # GRPO runs every weighter; RLOO the two paths that differ by algorithm (the hook and the Gram's advantages).
    names = [] if algo == "grpo" else ["saw_odm", "gradient"]
    run_two_ranks(os.path.join(os.path.dirname(__file__), "scripts", "rl_worker.py"), prefix, algo, *names)
    ranks = []
    for r in range(2):
        with open(f"{prefix}.rank{r}.json") as f:
            ranks.append(json.load(f))
    for name, zero in ranks[0].items():
        one = ranks[1][name]
        assert len(zero["weights"]) == 3, name
        assert zero["rewards"] == one["rewards"], name  # the gathered batch: identical inputs to the weighter
        assert zero["weights"] == one["weights"], name  # … and identical weights, bit for bit
        assert zero["logs"] == one["logs"], name
        assert zero["state"] == one["state"], name
        for step, (a, b) in enumerate(zip(zero["domains"], one["domains"])):
            assert len(a) == len(b) == 4, (name, step)  # each rank holds one complete group of 4 generations
    # The Gram is built from rank-averaged gradients (each rank holding a slice, one all-reduce): identical on both ranks.
    assert ranks[0]["gradient"]["gram"] == ranks[1]["gradient"]["gram"]
    # Dynamic weights actually moved.
    assert ranks[0]["saw_odm"]["weights"][0] != [1.0, 1.0, 1.0]


@pytest.mark.parametrize("data_seed,expected", [(7, 7), (None, 3)])
def test_prompt_mixture_seeds_from_data_seed_like_the_supervised_samplers(tmp_path, data_seed, expected):
    """The prompt sampler draws with ``data_seed`` when set, else ``seed`` (as Trainer's and hfweight's supervised
    samplers do), and leaves the user's ``ignore_data_skip`` as it was."""
    trainer = make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path, mixture="static", seed=3,
                           data_seed=data_seed)
    trainer.get_train_dataloader()
    assert trainer._prompts.sampler.seed == expected
    assert trainer.args.ignore_data_skip is False
