"""GRPO/RLOO under a data-parallel engine (issue 12 items 2 and 4): run on 2 ranks by ``engines.run_engine``.

:func:`one_step_cases` trains every configuration of :data:`CASES` for one optimizer step on the tiny model and
returns, per case, what the test compares against the DDP launch: the parameter update (gathered whole from the
ZeRO-3 partitions / FSDP2 shards), the reward weights TRL applied, the weighter's state after the step, the
prompt-domain probabilities, and for ``gradient`` the Gram of the per-reward policy gradients built from per-shard
partial sums. Every case also records :func:`engines.engine_facts` so the test can prove the engine was active.
"""

from __future__ import annotations

import tempfile

import torch
from engine_cases import full_parameters
from helpers import tiny_model
from helpers_rl import make_trainer, recording

from hfweight import WeightedGRPOConfig, WeightedGRPOTrainer, WeightedRLOOConfig, WeightedRLOOTrainer

CASES = {
    "static": dict(reward_weighting="static", reward_weights=[1.0, 0.5, 2.0]),
    # Two generation batches each: the first batch's update (weights, Gram, domain probabilities) is what the
    # second step uses, so a wrong update shows in the parameters as well as in the state.
    "popart_mixture": dict(reward_weighting="popart", mixture="odm", mixture_kwargs={"warmup_steps": 0}, max_steps=2),
    "constrained": dict(reward_weighting="constrained", reward_weighting_kwargs={"thresholds": [0.9, 0.5]},
                        max_steps=2),
    "gradient": dict(reward_weighting="gradient", reward_weighting_kwargs={"reg": 10.0}, max_steps=2),
}
TRAINERS = {"grpo": (WeightedGRPOTrainer, WeightedGRPOConfig), "rloo": (WeightedRLOOTrainer, WeightedRLOOConfig)}
# SGD at a unit rate, no clipping, constant schedule: the parameter update is minus the step's gradient.
STEP = dict(optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)


def plain(value):
    """A state dict as nested lists/dicts of Python numbers (tensors as lists): comparable with ``==`` and
    ``pytest.approx`` (``engine_cases._plain`` keeps tensors)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def step_difference(got: dict, expected: dict) -> float:
    """‖Δθ − Δθ_DDP‖ / ‖Δθ_DDP‖ over the whole parameter update (all tensors as one vector): per tensor, a layer
    whose update is tiny (~1e-5) would turn fp32 reduction-order noise into a large ratio."""
    names = sorted(expected)
    return relative_difference(torch.cat([got[k].flatten() for k in names]),
                               torch.cat([expected[k].flatten() for k in names]))


def one_step_cases(engine: str, *algos: str) -> dict:
    """``{algo: {case: result}}`` for every case of :data:`CASES` under ``engine``, for each of ``algos``."""
    return {algo: _cases(engine, algo) for algo in algos or TRAINERS}


def _cases(engine: str, algo: str, *names: str) -> dict:
    import engines

    trainer_cls, config_cls = TRAINERS[algo]
    initial = dict(tiny_model(0).named_parameters())
    results = {}
    for name in names or list(CASES):
        kwargs = {**STEP, "max_steps": 1, **CASES[name], **engines.training_overrides(engine)}
        with tempfile.TemporaryDirectory() as out:
            trainer = make_trainer(recording(trainer_cls), config_cls, out, **kwargs)
            trainer.train()
            facts = engines.assert_engine(trainer, engine)
            after = full_parameters(trainer, engine)
        result = {
            "facts": facts,
            "update": {k: after[k] - initial[k].detach() for k in after},
            "weights": [w.tolist() for w in trainer.recorded["weights"]],
            "rewards": [r.tolist() for r in trainer.recorded["rewards"]],
        }
        if trainer.reward_weighting is not None:
            result["state"] = plain(trainer.reward_weighting.state_dict())
        if trainer.mixture is not None:
            result["probabilities"] = trainer.mixture.probabilities().tolist()
            result["domains"] = trainer.recorded["domains"]
        if getattr(trainer, "_last_reward_gram", None) is not None:
            result["gram"] = trainer._last_reward_gram.clone()
        results[name] = result
    return results
