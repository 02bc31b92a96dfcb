"""Configuration: one dataclass mixin with every weighting field, shared by all four trainer configs.

``WeightingArguments`` is mixed into ``transformers.TrainingArguments`` here and into TRL's ``SFTConfig``,
``GRPOConfig`` and ``RLOOConfig`` elsewhere, so a field is declared, documented and validated exactly once.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from . import strategies  # noqa: F401  (registers the built-in strategies before validation)
from .registry import MIXTURES, REWARD_WEIGHTINGS, SAMPLE_WEIGHTINGS, TOKEN_WEIGHTINGS

LOSS_NORMALIZATIONS = ("token", "sample")
MIXTURE_MODES = ("resample", "upweight")

# Dataset columns the trainers understand (docs/methods.md#columns). The domain column's name is configurable.
SAMPLE_WEIGHT_COLUMN = "sample_weight"
TOKEN_WEIGHTS_COLUMN = "token_weights"
REF_LOGPS_COLUMN = "ref_logps"


# Each strategy field (its kwargs are the field ``<name>_kwargs``) and the registry that builds it from a name.
STRATEGY_REGISTRIES = {
    "token_weighting": TOKEN_WEIGHTINGS,
    "sample_weighting": SAMPLE_WEIGHTINGS,
    "mixture": MIXTURES,
    "reward_weighting": REWARD_WEIGHTINGS,
}
STRATEGY_FIELDS = tuple(STRATEGY_REGISTRIES)


# What a name field may say on the command line or in YAML to mean "off" (None), as `--mixture none` would be read.
OFF_SPELLINGS = ("none", "null")


def _off_to_none(value: Any) -> Any:
    """None for a string spelling "off" (``"none"``, ``"None"``, ``"null"``), else ``value`` unchanged."""
    return None if isinstance(value, str) and value.strip().lower() in OFF_SPELLINGS else value


def _documented(default: Any, help: str) -> Any:
    """A dataclass field with a default and the ``--help`` text ``HfArgumentParser`` shows for it."""
    return field(default=default, metadata={"help": help})


def qualified_name(obj: Any) -> str:
    """``"module:qualname"`` of a function or class (of an object's class otherwise): importable for module-level
    names (``mixture_kwargs['policy']`` accepts it), a readable record for lambdas and closures."""
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}:{target.__qualname__}"


def _picklable(value: Any) -> Any:
    """``value`` if pickle can store it, else its :func:`qualified_name`."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        pickle.dumps(value)
    except Exception:  # pickle raises PicklingError, AttributeError or TypeError depending on the object
        return qualified_name(value)
    return value


def json_safe(value: Any) -> Any:
    """``value`` with everything JSON cannot hold replaced by a readable string: a function or class by its
    :func:`qualified_name`, any other object by its ``repr``; dicts, lists and tuples are rebuilt (never mutated)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if callable(value) and hasattr(value, "__qualname__"):
        return qualified_name(value)
    return repr(value)


def _kwargs_dict(value: Any, name: str) -> dict:
    """Accept a dict, a JSON string (command line) or None, like ``TrainingArguments.lr_scheduler_kwargs``."""
    if _off_to_none(value) is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"`{name}` must be a dict or a JSON object string, got {value!r}: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a dict (or a JSON object string), got {type(value).__name__}.")
    return dict(value)


@dataclass
class WeightingArguments:
    """Weighting fields shared by ``WeightedTrainingArguments``, ``WeightedSFTConfig``, ``WeightedGRPOConfig`` and
    ``WeightedRLOOConfig``. With every switch at its default (``None``) the trainer behaves exactly like its parent.

    The four strategy fields are typed ``str | None`` for the command line and YAML; from Python they also accept a
    strategy object (an instance of a class from :mod:`hfweight.strategies.base`), used as is.
    """

    token_weighting: str | None = _documented(
        None,
        "Per-token loss weights: None, 'static' (the `token_weights` column), 'dft', 'asft', 'focal', "
        "'rho1', 'prior', a registered name, or a TokenWeighting object.",
    )
    token_weighting_kwargs: dict | str | None = _documented(
        None, "Keyword arguments of the token weighting (a dict, or JSON on the CLI)."
    )
    sample_weighting: str | None = _documented(
        None,
        "Per-sample loss weights: None, 'static' (the `sample_weight` column), 'loss' (Sow et al. 2025), "
        "'truncation', 'storm', a registered name, or a SampleWeighting object.",
    )
    sample_weighting_kwargs: dict | str | None = _documented(
        None,
        "Keyword arguments of the sample weighting (a dict, or JSON on the CLI). The loss-based ones take "
        "`mode`: 'auto' (default), 'rescale' (weights from each micro-batch's own forward, gradients rescaled by "
        "the global sum before clipping; no extra pass) or 'score' (a no-grad scoring forward of the step first).",
    )
    loss_normalization: str = _documented(
        "token",
        "'token': Σ v w ℓ / Σ v w over all label tokens of the optimizer step (equals the Trainer's loss "
        "when every weight is 1). 'sample': Σ v ℓ_i / Σ v with ℓ_i each sample's (weighted) token mean.",
    )
    mixture: str | None = _documented(
        None,
        "Domain mixture: None, 'static', 'temperature', 'schedule', 'doremi', 'odm', 'aioli', 'skillit', "
        "'dga', 'learning_progress', a registered name, or a MixtureController object.",
    )
    mixture_kwargs: dict | str | None = _documented(
        None, "Keyword arguments of the mixture, e.g. {'weights': {'code': 2, 'prose': 1}}."
    )
    mixture_mode: str = _documented(
        "resample",
        "How domain weights α apply: 'resample' (the sampler draws domain d with probability α_d) or "
        "'upweight' (natural sampling, each sample's loss multiplied by α_d / q_d, q the natural mixture).",
    )
    domain_column: str = _documented("domain", "Dataset column holding each row's domain (str or int).")
    reference_model: str | None = _documented(
        None,
        "Path or hub id of a frozen reference model for reference-based strategies; 'base' uses the PEFT "
        "base model with adapters disabled.",
    )
    reward_weighting: str | None = _documented(
        None,
        "GRPO/RLOO only. Multi-objective reward weights: None, 'static', 'popart', 'saw', 'hypervolume', "
        "'gradient', 'constrained', a registered name, or a RewardWeighting object.",
    )
    reward_weighting_kwargs: dict | str | None = _documented(
        None, "Keyword arguments of the reward weighting (a dict, or JSON on the CLI)."
    )
    allow_negative_weights: bool = _documented(
        False,
        "Opt in to negative `sample_weight`/`token_weights` values (unlikelihood-style training). "
        "Without it a negative weight is an error naming the row.",
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_weighting()

    # ---- validation -----------------------------------------------------------------------------------------------

    OPTIONAL_NAME_FIELDS = (*STRATEGY_FIELDS, "reference_model")
    """Fields whose None means off: the command line and YAML switch them off with ``none``/``None``/``null``."""

    def validate_weighting(self) -> None:
        """Check every weighting field now, so a bad config fails before any model or data is loaded."""
        for name in self.OPTIONAL_NAME_FIELDS:
            setattr(self, name, _off_to_none(getattr(self, name)))
        for name in STRATEGY_FIELDS:
            setattr(self, f"{name}_kwargs", _kwargs_dict(getattr(self, f"{name}_kwargs"), f"{name}_kwargs"))
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"`loss_normalization={self.loss_normalization!r}` is not one of {LOSS_NORMALIZATIONS}."
            )
        if self.mixture_mode not in MIXTURE_MODES:
            raise ValueError(f"`mixture_mode={self.mixture_mode!r}` is not one of {MIXTURE_MODES}.")
        if not isinstance(self.domain_column, str) or not self.domain_column:
            raise ValueError("`domain_column` must be a non-empty column name.")
        # Building each strategy once validates its name and its kwargs (e.g. a temperature ≤ 0) at config time.
        self.build_token_weighting()
        self.build_sample_weighting()
        self.build_mixture()
        self.build_reward_weighting()
        if self.supervised_loss:
            self.check_unused_reference("reference_model", self.reference_model)
            if self.loss_normalization != "token" and not self.weighting_enabled:
                raise ValueError(
                    f"`loss_normalization={self.loss_normalization!r}` has no effect without a weighting: with "
                    "token_weighting, sample_weighting and mixture all None the trainer is its parent, whose loss is "
                    "the token mean. Set a weighting (e.g. sample_weighting='static' with a `sample_weight` column) "
                    "or drop the field."
                )

    supervised_loss = True
    """Whether the trainer's loss is the weighted cross-entropy of :mod:`hfweight.loss` (False for GRPO/RLOO)."""

    def uses_reference_model(self) -> bool:
        """Whether a configured strategy reads a reference model (or its precomputed ``ref_logps``)."""
        built = (self.build_token_weighting(), self.build_mixture())
        return any(getattr(s, "needs_reference", False) or getattr(s, "needs_reference_model", False) for s in built)

    def check_unused_reference(self, what: str, reference) -> None:
        """A reference model no strategy reads would never be loaded (a wrong path would pass unnoticed): error."""
        if reference is None or self.uses_reference_model():
            return
        shown = reference if isinstance(reference, str) else type(reference).__name__
        raise ValueError(
            f"`{what}={shown!r}` is set but no configured strategy uses a reference model (token_weighting="
            f"{self.token_weighting!r}, mixture={self.mixture!r}), so it would never be loaded. Reference-based "
            "strategies: token_weighting 'prior', 'rho1', 'asft' and mixture 'doremi'. Remove it or choose one of those."
        )

    def build_strategy(self, name: str):
        """The strategy of field ``name`` (one of :data:`STRATEGY_FIELDS`) built by its registry from the field and
        its ``<name>_kwargs`` (an object given in place of a name is returned as is), or None when the field is off."""
        value = getattr(self, name)
        return None if value is None else STRATEGY_REGISTRIES[name].build(value, getattr(self, f"{name}_kwargs"))

    def build_token_weighting(self):
        return self.build_strategy("token_weighting")

    def build_sample_weighting(self):
        return self.build_strategy("sample_weighting")

    def build_mixture(self):
        return self.build_strategy("mixture")

    def build_reward_weighting(self):
        return self.build_strategy("reward_weighting")

    @property
    def weighting_enabled(self) -> bool:
        """True when any loss-side weighting switch is on (reward weighting is handled by the RL trainers)."""
        return any(x is not None for x in (self.token_weighting, self.sample_weighting, self.mixture))

    def weighting_summary(self) -> dict:
        """The weighting configuration as plain JSON-able values (for logs and the model card)."""
        summary = {}
        for name in STRATEGY_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            summary[name] = value if isinstance(value, str) else type(value).__name__
            if getattr(self, f"{name}_kwargs"):
                summary[f"{name}_kwargs"] = getattr(self, f"{name}_kwargs")
        if self.mixture is not None:
            summary["mixture_mode"] = self.mixture_mode
        if summary and self.supervised_loss:  # GRPO/RLOO reject the field: their loss is TRL's own
            summary["loss_normalization"] = self.loss_normalization
        if self.reference_model is not None:
            summary["reference_model"] = self.reference_model
        return summary

    # ---- pickling (Trainer saves `training_args.bin` with torch.save in every checkpoint) ----------------------------

    def __getstate__(self):
        """What ``pickle`` stores: every field as is, except values pickle cannot store by reference — a lambda or a
        closure in a ``*_kwargs`` dict (e.g. ``mixture_kwargs['policy']``), or a strategy object holding one — which
        are replaced by their qualified name (``"module:qualname"``). Without this the first checkpoint of such a run
        dies in ``torch.save(args)``. The live arguments keep the callable; so do ``copy.copy``/``copy.deepcopy``
        (:meth:`__copy__`, :meth:`__deepcopy__`). Resuming needs nothing from ``training_args.bin``: the trainer is
        built again from the user's code, with the callable."""
        state = dict(self.__dict__)
        for name in STRATEGY_FIELDS:
            state[name] = _picklable(state.get(name))
            kwargs = state.get(f"{name}_kwargs")
            if isinstance(kwargs, dict):
                state[f"{name}_kwargs"] = {key: _picklable(value) for key, value in kwargs.items()}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def to_dict(self):
        """The parent's dict with every weighting field JSON-able, so ``to_json_string`` (which TensorBoard and other
        loggers call at train start) works whatever a ``*_kwargs`` holds: a strategy object becomes its class name,
        a callable in a kwargs dict (``mixture_kwargs={"policy": fn}``) its ``module:qualname``, any other object its
        ``repr``. The live arguments are not changed."""
        d = super().to_dict()
        for name in STRATEGY_FIELDS:
            if d.get(name) is not None and not isinstance(d[name], str):
                d[name] = type(d[name]).__name__
            d[f"{name}_kwargs"] = json_safe(d.get(f"{name}_kwargs"))
        return d


@dataclass
class WeightedTrainingArguments(WeightingArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the weighting fields of :class:`WeightingArguments`."""

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weighting is not None:
            raise ValueError(
                "`reward_weighting` applies to GRPO/RLOO only; use WeightedGRPOConfig or WeightedRLOOConfig."
            )


def as_weighted_config(config_cls: type, args: Any, model: Any, parent_cls: type, default_suffix: str):
    """The ``config_cls`` (a Weighted* config) a drop-in trainer runs with, from any ``args`` its parent accepts.

    - ``None``: the parent builds its default config named ``"<model name>-<suffix>"``; so do we, as ``config_cls``
      with weighting off.
    - a ``config_cls``: used as is (another Weighted config is an error: its weighting fields would be dropped).
    - a plain ``parent_cls`` (``SFTConfig``, ``GRPOConfig``, ``RLOOConfig``): its already-initialized fields are taken
      over unchanged (re-running its ``__post_init__`` could fail on fields it derived) and every weighting field gets
      its default (off).
    - a plain ``TrainingArguments`` where the parent converts one (``SFTTrainer``): converted the parent's way,
      through ``to_dict()``.
    """
    if args is None:
        from trl.trainer.utils import get_config_model_id

        name = model if isinstance(model, str) else get_config_model_id(model.config)
        return config_cls(f"{name.split('/')[-1]}-{default_suffix}")
    trainer = config_cls.__name__.replace("Config", "Trainer").replace("TrainingArguments", "Trainer")
    if isinstance(args, config_cls):
        return args
    if isinstance(args, WeightingArguments):  # e.g. WeightedTrainingArguments given to WeightedSFTTrainer
        raise TypeError(
            f"{trainer} takes a {config_cls.__name__}, got a {type(args).__name__}: build a {config_cls.__name__} with "
            "the same fields."
        )
    if isinstance(args, parent_cls):
        converted = config_cls.__new__(config_cls)
        converted.__dict__.update(args.__dict__)
        for spec in fields(config_cls):
            if spec.name not in converted.__dict__:
                value = spec.default_factory() if spec.default_factory is not MISSING else spec.default
                setattr(converted, spec.name, value)
        converted.validate_weighting()
        return converted
    if isinstance(args, TrainingArguments) and parent_cls.__name__ == "SFTConfig":
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token  # to_dict hides the hub token (as in SFTTrainer)
        return config_cls(**dict_args)
    raise TypeError(
        f"{trainer} takes a {config_cls.__name__} (or a plain "
        f"{parent_cls.__name__}, converted with weighting off); got {type(args).__name__}."
    )

