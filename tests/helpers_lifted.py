"""Strategies that once refused sharded engines, run for one SGD step under an engine (issue 12 item 4): called on 2
ranks by ``engines.run_engine``; the test compares each engine's parameter update with DDP's."""

from __future__ import annotations

import tempfile

from engine_cases import full_parameters
from helpers import pad_collate, tiny_model, toy_dataset, training_args
from helpers_rl_engines import plain

from hfweight import WeightedTrainer, WeightedTrainingArguments

CASES = {
    # ASFT: DFT weights plus λ·KL(π_ref ‖ π_θ) over the full vocabulary, the reference a frozen copy of the model.
    "asft": dict(token_weighting="asft", token_weighting_kwargs={"kl_weight": 0.5}),
    # STORM: the second step runs the meta step (look-ahead, meta batch, central differences, rescaler update).
    "storm": dict(sample_weighting="storm", sample_weighting_kwargs={"hidden": 6, "meta_lr": 0.05}, max_steps=2),
}
REFUSED = {"zero2": ("storm",), "zero3": ("storm",)}  # DeepSpeed keeps the gradients STORM moves θ along


def _trainer(engine: str, out: str, case: dict) -> WeightedTrainer:
    import engines

    weighting = dict(case)
    steps = weighting.pop("max_steps", 1)
    args = WeightedTrainingArguments(
        **training_args(out, max_steps=steps, per_device_train_batch_size=4, **engines.training_overrides(engine)),
        **weighting,
    )
    return WeightedTrainer(model=tiny_model(0), args=args, train_dataset=toy_dataset(16), data_collator=pad_collate)


def one_step(engine: str, *names: str) -> dict:
    """Per case: the parameter update (gathered whole), the logged losses, the strategy's state; and per refused
    case the error message."""
    import engines
    initial = dict(tiny_model(0).named_parameters())
    results = {"refused": {}}
    for name in REFUSED.get(engine, ()):
        with tempfile.TemporaryDirectory() as out:
            try:
                _trainer(engine, out, CASES[name])
                results["refused"][name] = None
            except ValueError as err:
                results["refused"][name] = str(err)
    for name in names or [n for n in CASES if n not in REFUSED.get(engine, ())]:
        with tempfile.TemporaryDirectory() as out:
            trainer = _trainer(engine, out, CASES[name])
            trainer.train()
            facts = engines.assert_engine(trainer, engine)
            after = full_parameters(trainer, engine)
        strategy = trainer.sample_weighting
        results[name] = {"facts": facts, "update": {k: after[k] - initial[k].detach() for k in after},
                         "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                         "state": plain(strategy.state_dict()) if strategy is not None else None}
    return results
