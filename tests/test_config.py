"""Config validation happens when the arguments are built, with messages that say what to change."""

import pytest
from helpers import training_args

from hfweight import WeightedTrainingArguments, register_sample_weighting
from hfweight.strategies.base import SampleWeighting


def _args(tmp_path, **kw):
    return WeightedTrainingArguments(**training_args(str(tmp_path)), **kw)


def test_defaults_are_off(tmp_path):
    args = _args(tmp_path)
    assert not args.weighting_enabled and args.weighting_summary() == {}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(token_weighting="nope"), r"Unknown `token_weighting='nope'`. Available: \[.*'static'"),
        (dict(sample_weighting="nope"), r"Unknown `sample_weighting='nope'`"),
        (dict(mixture="nope"), r"Unknown `mixture='nope'`"),
        (dict(loss_normalization="batch"), r"`loss_normalization='batch'` is not one of \('token', 'sample'\)"),
        (dict(mixture_mode="mix"), r"`mixture_mode='mix'` is not one of"),
        (dict(token_weighting_kwargs="{not json"), r"`token_weighting_kwargs` must be a dict or a JSON object string"),
        (dict(sample_weighting="static", sample_weighting_kwargs={"bogus": 1}), r"Bad `sample_weighting_kwargs`"),
        (dict(reward_weighting="static"), r"not available yet|GRPO/RLOO only"),
        (dict(mixture="static", mixture_kwargs={"weights": {"code": float("nan")}}), r"weights must be finite"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


def test_planned_strategies_say_not_available_yet():
    from hfweight.registry import Registry

    registry = Registry("token_weighting", planned=("future",))
    with pytest.raises(ValueError, match=r"`token_weighting='future'` is not available yet"):
        registry.build("future")
    registry.register("future")(lambda: "built")
    assert registry.build("future") == "built"


def test_json_kwargs_from_the_command_line(tmp_path):
    args = _args(tmp_path, mixture="static", mixture_mode="upweight", mixture_kwargs='{"weights": {"code": 2}}')
    assert args.mixture_kwargs == {"weights": {"code": 2}}
    assert args.weighting_summary()["mixture_kwargs"] == {"weights": {"code": 2}}


def test_user_registered_strategy_and_strategy_objects(tmp_path):
    @register_sample_weighting("halve")
    class Halve(SampleWeighting):
        def __init__(self, factor=0.5):
            self.factor = factor

        def weights(self, ctx):
            return ctx.column * self.factor

    args = _args(tmp_path, sample_weighting="halve", sample_weighting_kwargs={"factor": 0.25})
    assert args.build_sample_weighting().factor == 0.25
    obj = Halve(0.1)
    args = _args(tmp_path, sample_weighting=obj)
    assert args.build_sample_weighting() is obj
    assert args.to_dict()["sample_weighting"] == "Halve"
    with pytest.raises(ValueError, match="strategy object"):
        _args(tmp_path, sample_weighting=obj, sample_weighting_kwargs={"factor": 1})
