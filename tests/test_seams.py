"""The seams: every private transformers/TRL name hfweight overrides, calls or reads still exists in the installed
upstream with the shape hfweight expects.

Both upstreams rename and reshape private methods between releases without notice; this test is where such a change
shows first, naming the seam, what hfweight expects, what was found and the installed versions. All expectations live
in the one table below (:data:`SEAMS`). How each kind is checked:

- ``override``: hfweight's method replaces the upstream one and upstream calls it, so the parameter lists must be
  the same (names, order, which have defaults) both upstream and in hfweight's override (the table cannot drift
  from the code). Three public methods are listed too: Trainer's loop calls them with arguments it has changed in
  past releases.
- ``call``: hfweight calls it with the listed parameters: they must come first, in order, and any further upstream
  parameter must have a default.
- ``mirror``: hfweight reproduces its logic (cited in a docstring); it must still exist with the listed parameters,
  or the copy needs re-reading.
- ``attribute``: set in upstream ``__init__``; checked on a real, cheaply constructed trainer.
- ``behaviour``: a called function whose output hfweight reads; checked by running it on the tiny model.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import pad_collate, sft_rows, tiny_model, tiny_tokenizer, toy_dataset
from helpers_rl import REWARDS, prompt_dataset, rl_args

import hfweight

ALL = ("transformers.Trainer", "trl.SFTTrainer", "trl.GRPOTrainer", "trl.RLOOTrainer")
LM = ("transformers.Trainer", "trl.SFTTrainer")
RL = ("trl.GRPOTrainer", "trl.RLOOTrainer")

# Which hfweight trainer subclasses which upstream trainer (where an override's own signature is read).
WEIGHTED = {
    "transformers.Trainer": hfweight.WeightedTrainer,
    "trl.SFTTrainer": hfweight.WeightedSFTTrainer,
    "trl.GRPOTrainer": hfweight.WeightedGRPOTrainer,
    "trl.RLOOTrainer": hfweight.WeightedRLOOTrainer,
}


@dataclass(frozen=True)
class Seam:
    owners: tuple[str, ...]  # upstream classes (or modules, for functions) that provide the name
    name: str  # attribute path below each owner
    use: str  # override | call | mirror | attribute | behaviour
    params: tuple[str, ...] = ()  # after self/cls; "x=" means x has a default
    why: str = ""  # where hfweight relies on it


# fmt: off
SEAMS = [
    # -- methods hfweight overrides ----------------------------------------------------------------------------------
    Seam(LM, "_get_train_sampler", "override", ("train_dataset=",),
         "WeightingMixin: the domain sampler of resample mixtures"),
    Seam(RL, "_get_train_sampler", "override", ("dataset=",), "RewardWeightingMixin: the prompt domain sampler"),
    Seam(LM, "_set_signature_columns_if_needed", "override", (), "WeightingMixin: keeps the weight columns"),
    Seam(ALL, "_save_optimizer_and_scheduler", "override", ("output_dir",),
         "WeightingMixin: weighting state into a checkpoint"),
    Seam(ALL, "_load_optimizer_and_scheduler", "override", ("checkpoint",),
         "WeightingMixin/RewardWeightingMixin: weighting state on resume"),
    Seam(("trl.SFTTrainer",), "_prepare_dataset", "override",
         ("dataset", "processing_class", "args", "packing", "formatting_func", "dataset_name"),
         "WeightedSFTTrainer: weight columns through TRL's tokenization and packing"),
    Seam(RL, "_calculate_rewards", "override", ("inputs", "prompts", "completions", "completion_ids_list"),
         "RewardWeightingMixin: reward weights from the gathered per-function rewards"),
    Seam(RL, "_generate_and_score_completions", "override", ("inputs",),
         "RewardWeightingMixin: prompt batches consumed, Gram updates"),
    # public, but Trainer's loop calls them with arguments it has changed before (num_items_in_batch, device)
    Seam(("transformers.Trainer",), "get_batch_samples", "override", ("epoch_iterator", "num_batches", "device"),
         "WeightingMixin/RewardWeightingMixin: the step plan from the prefetched micro-batches"),
    Seam(("transformers.Trainer",), "training_step", "override", ("model", "inputs", "num_items_in_batch="),
         "WeightingMixin: scoring passes and gradient rescaling around the parent's step"),
    Seam(("transformers.Trainer",), "compute_loss", "override",
         ("model", "inputs", "return_outputs=", "num_items_in_batch="), "WeightingMixin: the weighted loss"),
    # -- methods hfweight calls ---------------------------------------------------------------------------------------
    Seam(RL, "_compute_loss", "call", ("model", "inputs"),
         "rl.gram.RewardGram: one policy loss per reward"),
    Seam(RL, "_get_learning_rate", "call", (),
         "rl.gram.RewardGram.update: the step size of the Gram update"),
    Seam(RL, "_load_rng_state", "call", ("checkpoint",),
         "rl.prompts.PromptMixture.after_fetch: RNG after the resumed first fetch"),
    Seam(ALL, "_remove_unused_columns", "call", ("dataset", "description="), "WeightingMixin: the DGA target set"),
    Seam(("trl.trainer.utils",), "add_fused_lm_head", "call", ("model",), "loss.enable_fused_log_probs"),
    Seam(("trl.trainer.utils",), "split_tensor_dict", "call", ("tensor_dict", "num_chunks"),
         "rl.gram.RewardGram.gradient_shares"),
    Seam(("trl.models.utils",), "prepare_deepspeed", "call", ("model", "accelerator"),
         "WeightingMixin: a ZeRO reference model"),
    Seam(("trl.models.utils",), "prepare_fsdp", "call", ("model", "accelerator"),
         "WeightingMixin: an FSDP reference model"),
    Seam(("trl.data_utils",), "pack_dataset", "call", ("dataset", "seq_length", "strategy="),
         "WeightedSFTTrainer._prepare_dataset"),
    Seam(("trl.kernels.chunked_divergence",), "ChunkedDivergenceFunction.forward", "call",
         ("ctx", "student_hidden", "student_weight", "student_bias",
          "teacher_hidden", "teacher_weight", "teacher_bias", "beta", "temperature="),
         "loss.chunked_forward_kl (positional, through .apply)"),
    # -- logic hfweight mirrors ---------------------------------------------------------------------------------------
    Seam(ALL, "_get_num_items_in_batch", "mirror", ("batch_samples", "device"),
         "WeightingMixin._replica_factor: tp × cp × sp ranks share a batch"),
    # -- attributes set in upstream __init__ --------------------------------------------------------------------------
    Seam(LM, "_signature_columns", "attribute", (), "WeightingMixin._set_signature_columns_if_needed appends to it"),
    Seam(RL, "_metrics", "attribute", (), "rl.gram.RewardGram.update truncates its per-mode lists"),
    Seam(LM, "loss_is_scaled_for_ga", "attribute", (),
         "WeightingMixin: the step-normalized loss must not be divided by GA again (transformers >= 5.19)"),
    # -- outputs hfweight reads ---------------------------------------------------------------------------------------
    Seam(("trl.trainer.utils",), "add_fused_lm_head", "behaviour", (),
         "loss.token_log_probs reads .log_probs and .label_mask"),
]
# fmt: on


def _cases():
    for seam in SEAMS:
        for owner in seam.owners:
            yield pytest.param(seam, owner, id=f"{owner.split('.', 1)[1]}.{seam.name}:{seam.use}")


def _resolve(path: str):
    """``trl.GRPOTrainer`` → the class; ``trl.trainer.utils`` → the module."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        module, attr = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), attr)


def _versions() -> str:
    import transformers
    import trl

    return f"transformers {transformers.__version__}, trl {trl.__version__}"


def _render(params) -> str:
    return "(" + ", ".join(params) + ")"


def _params(func: Callable) -> tuple[str, ...]:
    """The parameters of ``func`` after ``self``/``cls`` in the table's notation (``x=`` for a default)."""
    out = []
    for i, p in enumerate(inspect.signature(func).parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append(prefix + p.name + ("=" if p.default is not p.empty else ""))
    return tuple(out)


def _fits_call(expected: tuple[str, ...], found: tuple[str, ...]) -> bool:
    """hfweight's arguments come first, in order; whatever upstream added after them is optional."""
    if found[: len(expected)] != expected:
        return False
    return all(p.endswith("=") or p.startswith("*") for p in found[len(expected) :])


def _lookup(owner: str, name: str):
    target = _resolve(owner)
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def _hfweight_override(owner: str, name: str):
    """hfweight's own definition of ``name`` on the Weighted trainer built on ``owner``."""
    for cls in WEIGHTED[owner].__mro__:
        if cls.__module__.startswith("hfweight") and name in vars(cls):
            return vars(cls)[name]
    return None


@pytest.fixture(scope="module")
def constructed(tmp_path_factory):
    """``constructed(owner)``: a real upstream trainer on the tiny model (under a second; built once per owner)."""
    return functools.cache(lambda owner: _construct(owner, str(tmp_path_factory.mktemp("seams"))))


def _construct(owner: str, out: str):
    import datasets
    from transformers import Trainer, TrainingArguments
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer

    common = dict(output_dir=out, report_to="none", use_cpu=True, max_steps=1, disable_tqdm=True)
    if owner == "transformers.Trainer":
        return Trainer(
            model=tiny_model(),
            args=TrainingArguments(**common),
            train_dataset=toy_dataset(4),
            data_collator=pad_collate,
        )
    if owner == "trl.SFTTrainer":
        data = datasets.Dataset.from_list(
            [{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows(4)]
        )
        return SFTTrainer(
            model=tiny_model(),
            args=SFTConfig(**common, max_length=24),
            train_dataset=data,
            processing_class=tiny_tokenizer(),
        )
    trainer_cls, config_cls = {
        "trl.GRPOTrainer": (GRPOTrainer, GRPOConfig),
        "trl.RLOOTrainer": (RLOOTrainer, RLOOConfig),
    }[owner]
    return trainer_cls(
        model=tiny_model(),
        reward_funcs=list(REWARDS),
        args=config_cls(**rl_args(out)),
        train_dataset=prompt_dataset(8),
        processing_class=tiny_tokenizer(),
    )


def _check_attribute(trainer, name: str) -> str | None:
    """What is wrong with the attribute on a constructed trainer, or None."""
    if not hasattr(trainer, name):
        return "no such attribute after __init__"
    if name == "_signature_columns":
        trainer._set_signature_columns_if_needed()  # what the mixin's override calls before appending
        columns = trainer._signature_columns
        return (
            None
            if isinstance(columns, list)
            else f"a {type(columns).__name__} after _set_signature_columns_if_needed, not a list"
        )
    if name == "_metrics":
        metrics = trainer._metrics
        if not isinstance(metrics, dict) or not {"train", "eval"} <= set(metrics):
            keys = sorted(metrics) if isinstance(metrics, dict) else "?"
            return f"{type(metrics).__name__} with keys {keys}, not a dict of train/eval"
        per_mode = metrics["train"]
        per_mode["hfw_probe"].append(1.0)  # hfweight reads lengths and truncates lists in place
        del per_mode["hfw_probe"]
        return None
    if name == "loss_is_scaled_for_ga":
        # Public since transformers 5.19, but only a promise if training_step still reads it before dividing by GA.
        from transformers import Trainer

        source = inspect.getsource(Trainer.training_step)  # SFTTrainer's own training_step ends in Trainer's
        return None if name in source else "training_step no longer reads it (would divide the loss by GA again)"
    raise AssertionError(f"no attribute check written for {name}")


def _check_fused_head_behaviour() -> str | None:
    """``model(..., labels=, fused_lm_head=True)`` returns ``log_probs`` and ``label_mask`` of shape ``(B, T-1)``,
    equal to log-softmax of the plain logits at the shifted labels (zero where ignored)."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        add_fused_lm_head(model)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    target = labels[:, 1:]
    mask = target != -100
    expected = reference.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask
    for field in ("log_probs", "label_mask"):
        if getattr(out, field, None) is None:
            return f"the output has no {field} (fields: {list(out.keys())})"
    if tuple(out.log_probs.shape) != tuple(target.shape) or not torch.equal(out.label_mask.bool(), mask):
        shape = tuple(target.shape)
        return f"log_probs {tuple(out.log_probs.shape)} / label_mask not the (B, T-1) shifted-label mask {shape}"
    if not torch.allclose(out.log_probs.double(), expected, atol=1e-5):
        gap = (out.log_probs.double() - expected).abs().max()
        return f"log_probs differ from log-softmax at the shifted labels by {gap:.2e}"
    return None


@pytest.mark.parametrize("seam,owner", list(_cases()))
def test_seam(seam: Seam, owner: str, constructed):
    where = f"{owner}.{seam.name}"
    context = f"hfweight relies on it in {seam.why}; installed: {_versions()}"
    if seam.use == "attribute":
        problem = _check_attribute(constructed(owner), seam.name)
        assert problem is None, f"seam {where} ({seam.use}): {problem}. {context}"
        return
    if seam.use == "behaviour":
        problem = _check_fused_head_behaviour()
        assert problem is None, f"seam {where} ({seam.use}): {problem}. {context}"
        return
    upstream = _lookup(owner, seam.name)
    assert upstream is not None, f"seam {where} ({seam.use}): not found upstream. {context}"
    found = _params(upstream)
    expected = seam.params
    fits = _fits_call(expected, found) if seam.use == "call" else found == expected
    assert fits, (
        f"seam {where} ({seam.use}): hfweight expects {_render(expected)}, upstream has {_render(found)}. {context}"
    )
    if seam.use == "override":
        ours = _hfweight_override(owner, seam.name)
        assert ours is not None, (
            f"seam {where}: the table says hfweight overrides it, but no hfweight class on {owner} does"
        )
        assert _params(ours) == expected, (
            f"seam {where}: hfweight's override takes {_render(_params(ours))}, the table says {_render(expected)}"
        )


def test_the_table_lists_every_override_of_an_upstream_private_method():
    """Every underscore method an hfweight trainer defines that also exists on its upstream parent is in SEAMS."""
    listed = {(owner, s.name) for s in SEAMS if s.use == "override" for owner in s.owners}
    missing = []
    for owner, weighted in WEIGHTED.items():
        parent = _resolve(owner)
        for cls in weighted.__mro__:
            if not cls.__module__.startswith("hfweight"):
                continue
            for name in vars(cls):
                if (
                    name.startswith("_")
                    and not name.startswith("__")
                    and hasattr(parent, name)
                    and (owner, name) not in listed
                ):
                    missing.append(f"{owner}.{name} (overridden in {cls.__qualname__})")
    assert not missing, f"overrides of upstream private methods missing from SEAMS: {sorted(set(missing))}"
