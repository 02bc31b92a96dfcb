"""Strategy state is saved in every checkpoint and restored on resume, so a resumed run continues exactly."""

import os
import re
import shutil

import pytest
import torch
from helpers import assert_same_step_logs, logged_by_step, pad_collate, tiny_model, toy_dataset, training_args

from hfweight import WeightedTrainer, WeightedTrainingArguments, register_sample_weighting
from hfweight.state import load_state, resolve_resume_checkpoint, save_state
from hfweight.strategies.base import SampleWeighting


@register_sample_weighting("test_counting")
class CountingWeights(SampleWeighting):
    """Stateful on purpose: weights drift with the number of batches seen, so a lost counter changes the losses."""

    def __init__(self):
        self.calls = 0

    def weights(self, ctx):
        self.calls += 1
        return ctx.column * (1.0 + 0.5 * (self.calls % 3))

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def _trainer(out, max_steps, weighting="test_counting", weighting_kwargs=None, **extra):
    args = WeightedTrainingArguments(
        **training_args(
            str(out),
            max_steps=max_steps,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            optim="adamw_torch",
            train_sampling_strategy="random",
            save_strategy="steps",
            save_steps=3,
            **extra,
        ),
        sample_weighting=weighting,
        sample_weighting_kwargs=weighting_kwargs,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)


def _losses(trainer):
    return {h["step"]: (h["loss"], h["weights/max"]) for h in trainer.state.log_history if "loss" in h}


def test_resume_continues_exactly(tmp_path):
    straight = _trainer(tmp_path / "straight", 6)
    straight.train()
    first = _trainer(tmp_path / "resumed", 3)
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    assert (checkpoint / "hfweight_state.pt").exists()
    assert torch.load(checkpoint / "hfweight_state.pt", weights_only=False)["objects"]["sample_weighting"] == {"calls": 6}
    resumed = _trainer(tmp_path / "resumed", 6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.sample_weighting.calls == straight.sample_weighting.calls == 12
    expected, got = _losses(straight), _losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def test_checkpoint_without_state_is_refused(tmp_path):
    """A checkpoint that lost its state file never restarts the strategy silently: the error names the file."""
    first = _trainer(tmp_path / "a", 3)
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    os.remove(checkpoint / "hfweight_state.pt")
    resumed = _trainer(tmp_path / "a", 4)
    with pytest.raises(ValueError, match=re.escape(f"{checkpoint / 'hfweight_state.pt'} is missing")):
        resumed.train(resume_from_checkpoint=str(checkpoint))


def test_resume_truncation_buffer_exactly(tmp_path):
    """Loss truncation's ring buffer and cutoff survive a checkpoint: the resumed run drops the same samples."""
    kwargs = {"drop_fraction": 0.3, "buffer_size": 16, "min_samples": 4, "recompute_every": 2}
    straight = _trainer(tmp_path / "straight", 6, "truncation", kwargs)
    straight.train()
    _trainer(tmp_path / "resumed", 3, "truncation", kwargs).train()
    resumed = _trainer(tmp_path / "resumed", 6, "truncation", kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    expected, got = _losses(straight), _losses(resumed)
    assert any(h.get("weights/min") == 0.0 for h in straight.state.log_history)  # truncation did drop samples
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def _mixture_trainer(out, max_steps, mixture, kwargs, mode="resample"):
    args = WeightedTrainingArguments(
        **training_args(
            str(out), max_steps=max_steps, gradient_accumulation_steps=2, per_device_train_batch_size=2,
            learning_rate=1e-2, optim="adamw_torch", train_sampling_strategy="random", save_strategy="steps", save_steps=3,
        ),
        mixture=mixture,
        mixture_mode=mode,
        mixture_kwargs=kwargs,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)


@pytest.mark.parametrize(
    "mixture,kwargs,mode",
    [
        ("static", {"weights": {"code": 0.7, "prose": 0.2, "math": 0.1}}, "resample"),
        ("odm", {"warmup_steps": 1}, "resample"),
        ("odm", {"warmup_steps": 1}, "upweight"),
    ],
)
def test_resume_mixture_and_sampler_exactly(tmp_path, mixture, kwargs, mode):
    """Resample mode: the same rows in the same order after resume (the sampler restores its position itself);
    the controller's state (ODM's EXP3 estimates) continues exactly."""
    straight = _mixture_trainer(tmp_path / "straight", 6, mixture, kwargs, mode)
    straight.train()
    _mixture_trainer(tmp_path / "resumed", 3, mixture, kwargs, mode).train()
    resumed = _mixture_trainer(tmp_path / "resumed", 6, mixture, kwargs, mode)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))

    keys = ("loss", "mixture/code", "domain_loss/code", "domain_loss/prose", "domain_loss/math")
    assert_same_step_logs(logged_by_step(straight, keys), logged_by_step(resumed, keys), steps=(4, 5, 6))


def test_step_log_comparison_keeps_absent_domains_apart():
    """The resume comparison: a domain absent from the same step of both runs matches; absent from one only, or a
    different value, fails."""
    straight = {4: {"loss": 4.0, "domain_loss/code": 3.5}, 5: {"loss": 3.9, "domain_loss/code": 3.4, "domain_loss/math": 4.2}}
    assert_same_step_logs(straight, {4: dict(straight[4]), 5: dict(straight[5])}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 4: logged"):
        assert_same_step_logs(straight, {4: {**straight[4], "domain_loss/math": 4.1}, 5: straight[5]}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 5: logged"):
        assert_same_step_logs(straight, {4: straight[4], 5: {"loss": 3.9, "domain_loss/code": 3.4}}, steps=(4, 5))
    with pytest.raises(AssertionError, match="step 5, domain_loss/math"):
        assert_same_step_logs(straight, {4: straight[4], 5: {**straight[5], "domain_loss/math": 4.3}}, steps=(4, 5))


def test_resample_follows_the_mixture(tmp_path):
    """With α = (code 0.9, …) the sampler draws code rows about 90% of the time."""
    trainer = _mixture_trainer(tmp_path, 1, "static", {"weights": {"code": 0.9, "prose": 0.05, "math": 0.05}})
    sampler = trainer._get_train_sampler()
    domains = trainer.train_dataset["domain"]
    drawn = [domains[i] for _ in range(10) for i in iter(sampler)]  # 10 epochs of 40 draws
    assert 0.84 < drawn.count("code") / 400 < 0.96


# ---- a checkpoint that does not fit the run: an error naming the file and the difference ----------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """checkpoint-3 of a `test_counting` run with resample-mode `static` mixture (domains code, prose, math)."""
    out = tmp_path_factory.mktemp("written")
    _written_by(out, 3).train()
    return out / "checkpoint-3"


def _written_by(out, max_steps, sample_weighting="test_counting", mixture_mode="resample", dataset=None):
    args = WeightedTrainingArguments(
        **training_args(str(out), max_steps=max_steps, per_device_train_batch_size=2, optim="adamw_torch",
                        learning_rate=1e-2, train_sampling_strategy="random", save_strategy="steps", save_steps=3),
        sample_weighting=sample_weighting,
        mixture="static",
        mixture_mode=mixture_mode,
        mixture_kwargs={"weights": {"code": 0.5, "prose": 0.3, "math": 0.2}} if dataset is None else None,
    )
    return WeightedTrainer(model=tiny_model(), args=args, train_dataset=dataset or toy_dataset(40), data_collator=pad_collate)


def _copy(checkpoint_dir, tmp_path):
    target = tmp_path / "checkpoint-3"
    shutil.copytree(checkpoint_dir, target)
    return target


def _renamed_domain(dataset, old, new):
    return dataset.map(lambda row: {"domain": new if row["domain"] == old else row["domain"]})


@pytest.mark.parametrize(
    "change,message",
    [
        ({"sample_weighting": "loss"}, r"sample_weighting: saved COUNTING, this run hfweight\.strategies\.sample\.LossReweighting"),
        ({"sample_weighting": None}, r"sample_weighting: saved COUNTING, this run absent"),
        ({"mixture_mode": "upweight"}, r"mixture_mode: saved 'resample', this run 'upweight'"),
        ({"dataset": "renamed"}, r"domains: saved \['code', 'math', 'prose'\], this run \['code', 'physics', 'prose'\]"),
    ],
    ids=["other_strategy", "strategy_dropped", "other_mixture_mode", "other_domains"],
)
def test_checkpoint_from_another_configuration_is_refused(checkpoint_dir, tmp_path, change, message):
    change = dict(change)
    if change.pop("dataset", None):
        change["dataset"] = _renamed_domain(toy_dataset(40), "math", "physics")
    resumed = _written_by(tmp_path, 4, **change)
    state = re.escape(str(checkpoint_dir / "hfweight_state.pt"))
    message = message.replace("COUNTING", re.escape(f"{CountingWeights.__module__}.CountingWeights"))
    with pytest.raises(ValueError, match=f"{state} was written by another weighting configuration: .*{message}"):
        resumed.train(resume_from_checkpoint=str(checkpoint_dir))
    assert resumed.state.global_step == 3  # the checkpoint's step: refused before training on


def test_truncated_state_is_refused(checkpoint_dir, tmp_path):
    checkpoint = _copy(checkpoint_dir, tmp_path)
    path = checkpoint / "hfweight_state.pt"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=re.escape(f"{path} cannot be read") + ".*truncated or corrupt"):
        _written_by(tmp_path / "run", 4).train(resume_from_checkpoint=str(checkpoint))


def test_weighting_off_cannot_resume_a_weighted_checkpoint(checkpoint_dir, tmp_path):
    args = WeightedTrainingArguments(**training_args(str(tmp_path), max_steps=4, save_strategy="steps", save_steps=3))
    trainer = WeightedTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(40), data_collator=pad_collate)
    with pytest.raises(ValueError, match="holds weighting state but this run has weighting off"):
        trainer.train(resume_from_checkpoint=str(checkpoint_dir))


class _PerRank:
    per_rank_state = True

    def state_dict(self):
        return {"rows": [1, 2]}

    def load_state_dict(self, state):
        self.rows = state["rows"]


def test_world_size_checks(tmp_path):
    """Per-rank state resumes only with the world size that wrote it; a rank's missing file is reported; state that
    is the same on every rank loads from rank 0's file under another world size."""
    written = {"per_rank": _PerRank(), "shared": CountingWeights()}
    for rank in range(2):
        save_state(str(tmp_path), written, {"domains": ["a"]}, rank, world_size=2)
    with pytest.raises(ValueError, match=r"written by 2 processes and this run has 1; the state of \['per_rank'\] is per rank"):
        load_state(str(tmp_path), {"per_rank": _PerRank(), "shared": CountingWeights()}, {"domains": ["a"]}, 0, 1)
    os.remove(tmp_path / "hfweight_state_rank1.pt")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'hfweight_state_rank1.pt'} is missing")):
        load_state(str(tmp_path), {"per_rank": _PerRank(), "shared": CountingWeights()}, {"domains": ["a"]}, 1, 2)
    shared = CountingWeights()
    shared_only = tmp_path / "shared"
    saved = CountingWeights()
    saved.calls = 5
    save_state(str(shared_only), {"shared": saved}, {}, 0, world_size=2)
    load_state(str(shared_only), {"shared": shared}, {}, 3, 4)  # rank 3 of 4 reads rank 0's file
    assert shared.calls == 5


# ---- which checkpoint a run resumes from -------------------------------------------------------------------------


def _fake_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_resolve_resume_checkpoint(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    assert resolve_resume_checkpoint(False, str(tmp_path)) is None
    assert resolve_resume_checkpoint("false", str(tmp_path)) is None
    with pytest.raises(ValueError, match="holds no complete checkpoint-<step> directory"):  # the parent's type too
        resolve_resume_checkpoint("true", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-5"), str(tmp_path))
    _fake_checkpoint(tmp_path, 9)
    ten = _fake_checkpoint(tmp_path, 10)  # numeric order, not lexical
    assert resolve_resume_checkpoint("True", str(tmp_path)) == str(ten)
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(ten)
    assert resolve_resume_checkpoint(str(ten), str(tmp_path)) == str(ten)
    cut = _fake_checkpoint(tmp_path, 12, complete=False)
    with pytest.warns(UserWarning, match=re.escape(f"Skipping the incomplete checkpoint {cut}: no trainer_state.json")):
        assert resolve_resume_checkpoint("true", str(tmp_path)) == str(ten)
    with pytest.raises(ValueError, match="is not a complete checkpoint: no trainer_state.json"):
        resolve_resume_checkpoint(str(cut), str(tmp_path))
    # A weighted checkpoint written by 2 processes whose rank 1 never wrote its file is incomplete too.
    save_state(str(ten), {"shared": CountingWeights()}, {}, 0, world_size=2)
    with pytest.warns(UserWarning, match=r"\['hfweight_state_rank1.pt'\] missing"):
        assert resolve_resume_checkpoint("true", str(tmp_path)).endswith("checkpoint-9")


def test_train_true_skips_an_incomplete_checkpoint(tmp_path):
    """``trainer.train(resume_from_checkpoint=True)`` resumes from the latest *complete* checkpoint; the parent's
    ``get_last_checkpoint`` would take the half-written one."""
    _trainer(tmp_path, 3).train()
    cut = tmp_path / "checkpoint-6"
    shutil.copytree(tmp_path / "checkpoint-3", cut)
    os.remove(cut / "trainer_state.json")
    resumed = _trainer(tmp_path, 4)
    with pytest.warns(UserWarning, match="Skipping the incomplete checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and resumed.sample_weighting.calls == 8


def test_rl_checkpoint_with_other_reward_functions_is_refused(tmp_path):
    """GRPO/RLOO state records the reward functions it was weighting; resuming with others is refused by name."""
    from helpers_rl import REWARDS, make_trainer

    from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer

    kwargs = dict(reward_weighting="popart", max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path, **kwargs).train()
    other = make_trainer(WeightedGRPOTrainer, WeightedGRPOConfig, tmp_path / "b", rewards=REWARDS[::-1], **{**kwargs, "max_steps": 2})
    names = [f.__name__ for f in REWARDS]
    with pytest.raises(ValueError, match=re.escape(f"reward_functions: saved {names!r}, this run {names[::-1]!r}")):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_parts_that_moved_module_still_resume():
    """A refactor that moves a stateful class to another module (hfweight.mixin → hfweight.glue.drivers, a strategy
    module split into a package) keeps old checkpoints loadable; a different class under the same part name is still
    refused. Fingerprints as an earlier version wrote them, checked against this version's parts."""
    from hfweight.rl.prompts import PromptMixture
    from hfweight.state import fingerprint, fingerprint_differences

    class _SamplerAtStep:  # the name hfweight.mixin used for the domain sampler's part
        pass

    class ODMMixture:
        pass

    current = fingerprint({"domain_sampler": _SamplerAtStep(), "mixture": ODMMixture(),
                           "prompt_sampler": PromptMixture.__new__(PromptMixture)}, domains=["a", "b"])
    saved = {"parts": {"domain_sampler": "hfweight.mixin._SamplerAtStep",
                       "mixture": "hfweight.strategies.mixture.ODMMixture",
                       "prompt_sampler": "hfweight.rl._PromptSamplerAtStep"}, "domains": ["a", "b"]}
    assert fingerprint_differences(saved, current) == []
    other = dict(saved, parts=dict(saved["parts"], mixture="hfweight.strategies.mixture.AioliMixture"))
    differences = fingerprint_differences(other, current)
    assert len(differences) == 1 and differences[0].startswith("mixture: saved hfweight.strategies.mixture.AioliMixture")


# ---- a drop-in keeps the parent's errors -------------------------------------------------------------------------


def _resume_error(trainer_cls, args_cls, out, resume_from_checkpoint, **weighting) -> Exception:
    """The exception ``train(resume_from_checkpoint=...)`` raises before any step, for a trainer of ``trainer_cls``."""
    args = args_cls(**training_args(str(out), max_steps=1), **weighting)
    trainer = trainer_cls(model=tiny_model(), args=args, train_dataset=toy_dataset(4), data_collator=pad_collate)
    with pytest.raises(Exception) as caught:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return caught.value


@pytest.mark.parametrize("weighting", [{}, {"sample_weighting": "static"}], ids=["off", "on"])
def test_resume_without_checkpoint_raises_the_parents_error(tmp_path, weighting):
    """transformers' own trainer tests (``test_can_resume_training``, Weighted classes swapped in) expect the parent's
    exception type and message: ours is a subclass and starts with the parent's message, detail after."""
    from transformers import Trainer, TrainingArguments

    (tmp_path / "out").mkdir()
    parent = _resume_error(Trainer, TrainingArguments, tmp_path / "out", True)
    ours = _resume_error(WeightedTrainer, WeightedTrainingArguments, tmp_path / "out", True, **weighting)
    assert str(parent).startswith("No valid checkpoint found in output directory")  # what the upstream test matches
    assert isinstance(ours, type(parent)) and str(ours).startswith(str(parent))
    assert "holds no complete checkpoint-<step> directory" in str(ours)  # our detail follows

    missing = str(tmp_path / "out" / "checkpoint-3")
    parent_missing = _resume_error(Trainer, TrainingArguments, tmp_path / "out", missing)
    with pytest.raises(Exception) as caught:
        resolve_resume_checkpoint(missing, str(tmp_path / "out"))  # what every entry point calls first
    resolve_error = caught.value
    assert isinstance(resolve_error, type(parent_missing)) and str(resolve_error).startswith(str(parent_missing))
