"""Resume and streaming for domain mixtures: streaming resample mode through WeightedTrainer (weights reach the stream
at step boundaries; 2N steps straight equal N + checkpoint + resume + N), a `datasets.IterableDataset` with declared
domains, and exact resume of the held-out (Aioli) and gradient (DGA) protocols."""

from __future__ import annotations

import datasets
import pytest
import torch
from helpers import assert_same_step_logs, logged_by_step, toy_dataset, toy_rows
from helpers_mixture import NAMES, _by_step, _stream, _stream_trainer, _trainer


def alternate(history):
    """A policy that swings the mixture every step, so rows drawn ahead with a stale α differ from fresh draws."""
    return [20, 1, 1] if history[-1]["step"] % 2 else [1, 1, 20]


@pytest.mark.parametrize("mixture,kwargs", [("policy", {"policy": alternate})])  # ODM's small moves rarely flip a draw
def test_streaming_resample_resumes_exactly(tmp_path, mixture, kwargs):
    """A controller over a MixtureIterableDataset (small domains, so streams restart): 6 steps straight equal 3 +
    checkpoint + resume + 3 — the same rows in the same order and the same mixture at every step — although the
    loader had drawn rows ahead of the checkpoint with the mixture of their time (replayed after resume)."""
    straight = _stream_trainer(tmp_path / "straight", 6, _stream(), mixture, kwargs)
    straight.train()
    first = _stream_trainer(tmp_path / "resumed", 3, _stream(), mixture, kwargs)
    first.train()
    assert first._mixture_stream.probabilities().tolist() == first.mixture.probabilities().tolist()
    resumed = _stream_trainer(tmp_path / "resumed", 6, _stream(), mixture, kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = _by_step(straight), _by_step(resumed)
    assert sorted(got) == [3, 4, 5]
    for step in (3, 4, 5):
        assert got[step] == expected[step], step
    probs = lambda t: {h["step"]: [h[f"mixture/{n}"] for n in NAMES] for h in t.state.log_history if "loss" in h}  # noqa: E731
    assert len({tuple(v) for v in probs(straight).values()}) >= 2  # the controller moved the mixture during the run
    for step in (4, 5, 6):
        assert probs(resumed)[step] == pytest.approx(probs(straight)[step], rel=1e-9), step
    assert torch.equal(resumed.mixture.probabilities(), straight.mixture.probabilities())


def test_streaming_weights_reach_the_stream_at_step_boundaries(tmp_path):
    """The stream's α equals the controller's at every step start; draws follow α (a heavy static mixture)."""
    from transformers import TrainerCallback

    class Check(TrainerCallback):
        def __init__(self):
            self.ok = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.ok.append(torch.equal(trainer._mixture_stream.probabilities(), trainer.mixture.probabilities()))

    trainer = _stream_trainer(tmp_path, 10, _stream(), "schedule",
                              {"stages": [{"until": 0.5, "weights": [1, 1, 1]}, {"until": 1.0, "weights": [8, 1, 1]}]})
    check = Check()
    trainer.add_callback(check)
    trainer.train()
    assert all(check.ok) and len(check.ok) == 10
    domain_of = {tuple(r["input_ids"]): r["domain"] for r in toy_rows(30)}
    late = [domain_of[tuple(x for x in row if x != 0)] for step, ids in trainer.seen if step >= 7 for row in ids.tolist()]
    assert late.count("code") >= 0.5 * len(late)  # 0.8 expected; the schedule's second stage reached the stream


def test_hf_iterable_dataset_with_a_domain_column(tmp_path):
    """A `datasets.IterableDataset` with the domain column trains in resample mode when the domains are declared; a
    missing declaration is a clear error."""
    hf = datasets.Dataset.from_list(toy_rows(30)).select_columns(["input_ids", "labels", "domain"]).to_iterable_dataset()
    trainer = _stream_trainer(tmp_path, 4, hf, "static", {"weights": {"code": 1, "math": 0, "prose": 0}, "domains": NAMES})
    trainer.train()
    domain_of = {tuple(r["input_ids"]): r["domain"] for r in toy_rows(30)}
    drawn = {domain_of[tuple(x for x in row if x != 0)] for _, ids in trainer.seen for row in ids.tolist()}
    assert drawn == {"code"}
    with pytest.raises(ValueError, match=r"list the domains in mixture_kwargs\['domains'\]"):
        _stream_trainer(tmp_path, 4, hf, "static", {"weights": {"code": 1}})


# ---- resume of the held-out and gradient protocols (map-style) ------------------------------------------------------


@pytest.mark.parametrize(
    "mixture,kwargs",
    [
        ("dga", {"target": ["math", "prose"], "target_batch_size": 2, "update_every": 2, "eta": 2.0}),
        ("aioli", {"lp_rounds": 1, "lp_steps": 1, "update_every": 4}),
    ],
)
def test_resume_of_eval_and_gradient_protocols(tmp_path, mixture, kwargs):
    """6 steps straight equal 3 + checkpoint + resume + 3 for DGA (target batches continue their cycle) and Aioli
    (its probe phase and pending evaluations continue): the same losses, per-domain losses and mixtures."""

    def make(out, steps):
        return _trainer(out, toy_dataset(40), eval_dataset=toy_dataset(12, seed=1), max_steps=steps,
                        per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                        optim="adamw_torch", save_strategy="steps", save_steps=3, mixture=mixture,
                        mixture_mode="resample", mixture_kwargs=kwargs)

    straight = make(tmp_path / "straight", 6)
    straight.train()
    make(tmp_path / "resumed", 3).train()
    resumed = make(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    keys = ["loss"] + [f"mixture/{n}" for n in NAMES] + [f"domain_loss/{n}" for n in NAMES]
    assert_same_step_logs(logged_by_step(straight, keys), logged_by_step(resumed, keys), steps=(4, 5, 6))
    assert torch.equal(resumed.mixture.probabilities(), straight.mixture.probabilities())


# ---- the resample sampler and the user's arguments ------------------------------------------------------------------


def test_resample_leaves_the_users_ignore_data_skip_alone(tmp_path):
    """The sampler restores its own position, so Trainer must not skip batches while training (ignore_data_skip is
    True then); the user's arguments object has its own value back before and after."""
    from transformers import TrainerCallback

    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append(args.ignore_data_skip)

    trainer = _trainer(tmp_path, toy_dataset(16), callbacks=[Watch()], max_steps=2, mixture="static",
                       mixture_mode="resample", mixture_kwargs={"weights": {"code": 2, "prose": 1, "math": 1}})
    args = trainer.args
    assert args.ignore_data_skip is False  # building the trainer changed nothing
    trainer.train()
    assert seen == [True, True] and args.ignore_data_skip is False


def test_resample_resume_under_another_global_batch_names_each_factor(tmp_path):
    """A resample mixture resumes only with the global batch it was saved with; the refusal gives the formula and the
    old and new value of each factor."""
    def make(steps, accumulation):
        return _trainer(tmp_path, toy_dataset(32), max_steps=steps, per_device_train_batch_size=2,
                        gradient_accumulation_steps=accumulation, save_strategy="steps", save_steps=2, mixture="static",
                        mixture_mode="resample", mixture_kwargs={"weights": {"code": 2, "prose": 1, "math": 1}})

    make(2, accumulation=2).train()
    with pytest.raises(ValueError, match=(
        r"The global batch is per-device batch × gradient accumulation × processes: saved 2 × 2 × 1 = 4, now "
        r"2 × 1 × 1 = 2\. Resume with the same product")):
        make(4, accumulation=1).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_global_batch_refusal_with_another_process_count():
    """The same message when the processes changed (a stand-in trainer: saved on 2 processes, resumed on 1)."""
    from types import SimpleNamespace

    from hfweight.glue.drivers.sampler import _SamplerAtStep

    def factors(processes):
        return {"per-device batch": 4, "gradient accumulation": 1, "processes": processes}

    sampler = SimpleNamespace(batch_size=4, state_dict=lambda batches_consumed: {"batch_size": 8})
    saved = _SamplerAtStep(sampler, SimpleNamespace(_global_batch=lambda: factors(2), state=SimpleNamespace(global_step=1)))
    state = saved.state_dict()
    resumed = _SamplerAtStep(sampler, SimpleNamespace(_global_batch=lambda: factors(1)))
    with pytest.raises(ValueError, match=r"saved 4 × 1 × 2 = 8, now 4 × 1 × 1 = 4\."):
        resumed.load_state_dict(state)
