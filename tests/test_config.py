"""Config validation happens when the arguments are built, with messages that say what to change."""

import pytest
from helpers import training_args

from hfweight import WeightedTrainingArguments, register_sample_weighting
from hfweight.config import json_safe
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


# ---- every weighting field switches off from the command line and YAML ---------------------------------------------

OFF_FIELDS = ("token_weighting", "sample_weighting", "mixture", "reference_model")


@pytest.mark.parametrize("spelling", ["none", "None", "null"])
def test_none_on_the_command_line_switches_weighting_off(tmp_path, spelling):
    """``--mixture none`` (what the demo's baseline commands print) is the default, off: for every name field, through
    the parser the entry points use (TrlParser over HfArgumentParser), on the command line and in a YAML config."""
    from trl import TrlParser

    from hfweight import WeightedGRPOConfig, WeightedSFTConfig

    flags = [f"--{name}={spelling}" for name in OFF_FIELDS] + [f"--{name}_kwargs={spelling}" for name in OFF_FIELDS[:3]]
    base = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--report_to", "none"]
    for config_cls in (WeightedTrainingArguments, WeightedSFTConfig):
        (args,) = TrlParser([config_cls]).parse_args_and_config(base + flags)
        assert [getattr(args, name) for name in OFF_FIELDS] == [None] * 4 and not args.weighting_enabled
        assert args.mixture_kwargs == {} and args.weighting_summary() == {}
    (rl,) = TrlParser([WeightedGRPOConfig]).parse_args_and_config(
        base + [f"--mixture={spelling}", f"--reward_weighting={spelling}", f"--reward_gradient_parameters={spelling}"]
    )
    assert (rl.mixture, rl.reward_weighting, rl.reward_gradient_parameters) == (None, None, None)
    assert not rl.rl_weighting_enabled

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\nreport_to: none\nmixture: {spelling}\n"
                      f"sample_weighting: '{spelling}'\n")
    (args,) = TrlParser([WeightedTrainingArguments]).parse_args_and_config(["--config", str(recipe)])
    assert args.mixture is None and args.sample_weighting is None


# ---- every config serializes, whatever a kwarg holds -----------------------------------------------------------


def test_to_json_string_with_a_callable_in_kwargs(tmp_path):
    """``mixture_kwargs={"policy": fn}`` (documented) must not break ``to_json_string`` (TensorBoard calls it at
    train start): non-JSON values are shown as readable strings, and the live arguments keep the callable."""
    import json

    from hfweight import WeightedGRPOConfig, WeightedSFTConfig
    from hfweight.policies import upweight_high_loss

    def local_policy(history):  # a closure: neither picklable by reference nor JSON
        return upweight_high_loss(history)

    for config_cls, extra in ((WeightedTrainingArguments, {}), (WeightedSFTConfig, {}),
                              (WeightedGRPOConfig, {"num_generations": 2})):
        args = config_cls(**training_args(str(tmp_path)), **extra, mixture="policy",
                          mixture_kwargs={"policy": local_policy, "update_every": 2})
        record = json.loads(args.to_json_string())
        assert record["mixture_kwargs"] == {
            "policy": f"{__name__}:test_to_json_string_with_a_callable_in_kwargs.<locals>.local_policy",
            "update_every": 2,
        }
        assert args.mixture_kwargs["policy"] is local_policy  # unchanged on the arguments themselves
        json.dumps(args.to_sanitized_dict())  # the hparams TensorBoard writes
    nested = {"f": upweight_high_loss, "rows": (1, {"obj": object}), 3: slice(1, 2)}
    assert json_safe(nested) == {"f": "hfweight.policies:upweight_high_loss", "rows": [1, {"obj": "builtins:object"}],
                                 "3": "slice(1, 2, None)"}
