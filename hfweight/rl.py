"""``WeightedGRPOTrainer`` / ``WeightedRLOOTrainer``: TRL's online RL trainers with multi-objective reward weighting
and prompt-domain mixtures (docs/methods.md#rewards).

TRL computes the rewards of a generation batch in ``_calculate_rewards`` (gathered over all ranks, shape
``(N, K)``: N completions of the whole generation batch, K reward functions, NaN where a function returned None) and
reads ``self.reward_weights`` right after, to combine them. That is the one hook this module uses:

1. **Every training generation batch**: the reward weighter sees the batch's ``(N, K)`` rewards and returns the
   weights TRL then applies to *this* batch (``static``, ``popart``, ``saw``, ``constrained`` use the batch itself;
   ``hypervolume`` and ``gradient`` return the weights their last update produced). Evaluation batches use the
   current weights without touching the weighter's state.
2. **Validation** (``hypervolume``; ``constrained`` with Nelder–Mead): once before training and then every
   ``reward_validation_steps`` optimizer steps, the trainer runs ``evaluate()`` on ``eval_dataset`` — TRL generates
   and scores the held-out prompts — and the NaN-robust per-reward mean of those rewards over all ranks is handed to
   the weighter. New weights apply from the next generation batch (as in the authors' code).
3. **Gradient Gram** (``gradient``): after a training generation batch is scored, one backward per reward function
   of TRL's own policy loss with the advantages of that reward alone (computed exactly as TRL computes the combined
   ones, :func:`group_advantages`), gradients averaged over ranks, Gram ``S = GGᵀ``, exponentiated-gradient update.
   Cost: K extra backward passes over the generation batch. The update applies from the next generation batch (TRL
   has already formed this batch's advantages).
4. **Prompt-domain mixtures** (``mixture=...`` with a ``domain`` column on the prompts): the prompt sampler draws
   domains with the controller's probabilities (TRL's repeat structure kept, see :class:`DomainRepeatSampler`), and the
   controller learns from a per-domain reward signal (``mixture_reward_signal``): ``"learnability"`` — the variance of
   the combined reward within each prompt's group, ``p(1 − p)`` for a 0/1 reward, i.e. where GRPO still has signal —
   or ``"regret"`` — ``1 − mean reward`` (focus on what is not solved yet). The controllers treat the signal like a
   loss: a larger value means "sample this domain more" for ``odm``-style controllers.

All of it — weights, archives, multipliers, momentum, running statistics, mixture and sampler state — is saved in
each checkpoint and restored on resume (:mod:`hfweight.state`); weights are logged every step
(``reward_weight/<name>``) and plotted to ``weighting.png`` at the end of training.

With ``reward_weighting=None`` and ``mixture=None`` every override calls the parent unchanged (exact parity).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from .config import WeightingArguments, as_weighted_config
from .mixin import WeightingMixin, _is_map_dataset, _MixtureCallback, check_declared_domains
from .strategies.base import DomainStats

MIXTURE_REWARD_SIGNALS = ("learnability", "regret")


# ---- configuration ------------------------------------------------------------------------------------------------


@dataclass
class RewardWeightingArguments(WeightingArguments):
    """The weighting fields plus what only the online RL trainers need."""

    reward_validation_steps: int = field(
        default=10,
        metadata={
            "help": "For validation-driven reward weighting (hypervolume; constrained with Nelder–Mead): evaluate the "
            "reward functions on `eval_dataset` before training and then every this many optimizer steps (the "
            "authors validate after every step; each validation generates completions for the whole eval set)."
        },
    )
    reward_gradient_parameters: str | None = field(
        default=None,
        metadata={
            "help": "For reward_weighting='gradient': a regular expression selecting the parameters whose gradients "
            "form the Gram matrix (e.g. 'layers\\.(10|11)\\.'); None = every trainable parameter."
        },
    )
    mixture_reward_signal: str = field(
        default="learnability",
        metadata={
            "help": "Per-domain signal a prompt-domain mixture learns from: 'learnability' (variance of the combined "
            "reward within each prompt's group; p(1-p) for 0/1 rewards) or 'regret' (1 - mean combined reward)."
        },
    )

    supervised_loss = False

    def validate_rl_weighting(self) -> None:
        trainer = type(self).__name__.replace("Config", "Trainer")
        ignored = (
            ("reference_model", None, "the reference GRPO/RLOO regularize towards is TRL's own (the initial policy, "
             "loaded when `beta` > 0); hfweight's `reference_model` feeds reference-based token weightings and "
             "mixtures, which the RL trainers do not have"),
            ("loss_normalization", "token", "the policy loss is TRL's own; its normalization is TRL's `loss_type`"),
            ("allow_negative_weights", False, "it admits negative `sample_weight`/`token_weights` columns, which the "
             "RL trainers do not read; a negative reward weight goes in `reward_weights`"),
        )
        for name, default, why in ignored:
            if getattr(self, name) != default:
                raise ValueError(f"`{name}={getattr(self, name)!r}` has no effect in {trainer}: {why}. Drop the field.")
        for name in ("token_weighting", "sample_weighting"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"`{name}` weights a supervised loss; {trainer}'s policy loss has no per-token cross-entropy to "
                    "weight. Use `reward_weighting` (and `mixture` for prompt domains), or run SFT with "
                    "WeightedSFTTrainer."
                )
        if self.mixture is not None and self.mixture_mode != "resample":
            raise ValueError(
                f"{trainer} applies a prompt-domain mixture by resampling prompts; set mixture_mode='resample' "
                f"(got {self.mixture_mode!r})."
            )
        if isinstance(self.reward_validation_steps, bool) or not isinstance(self.reward_validation_steps, int) or (
            self.reward_validation_steps < 1
        ):
            raise ValueError(f"`reward_validation_steps` must be an integer ≥ 1, got {self.reward_validation_steps!r}.")
        if self.mixture_reward_signal not in MIXTURE_REWARD_SIGNALS:
            raise ValueError(
                f"`mixture_reward_signal` must be one of {MIXTURE_REWARD_SIGNALS}, got {self.mixture_reward_signal!r}."
            )
        if self.reward_gradient_parameters is not None:
            if not getattr(self.build_reward_weighting(), "needs_gram", False):
                raise ValueError(
                    f"`reward_gradient_parameters={self.reward_gradient_parameters!r}` only selects the parameters of "
                    f"reward_weighting='gradient''s gradient Gram; with reward_weighting={self.reward_weighting!r} it has "
                    "no effect. Drop it or set reward_weighting='gradient'."
                )
            try:
                re.compile(self.reward_gradient_parameters)
            except re.error as err:
                raise ValueError(
                    f"`reward_gradient_parameters` is not a valid regular expression: {err}."
                ) from err

    @property
    def rl_weighting_enabled(self) -> bool:
        return self.reward_weighting is not None or self.mixture is not None


@dataclass
class WeightedGRPOConfig(RewardWeightingArguments, GRPOConfig):
    """``trl.GRPOConfig`` plus the weighting fields (:class:`RewardWeightingArguments`)."""

    def __post_init__(self):
        super().__post_init__()
        self.validate_rl_weighting()


@dataclass
class WeightedRLOOConfig(RewardWeightingArguments, RLOOConfig):
    """``trl.RLOOConfig`` plus the weighting fields (:class:`RewardWeightingArguments`).

    RLOO does not standardize advantages by default (``normalize_advantages=False``) and folds the KL penalty into the
    reward, so the absolute scale of the reward weights matters, not only their ratios. Every built-in dynamic
    weighter keeps the total of the initial weights fixed (``saw``, ``gradient``, ``hypervolume`` per-objective,
    ``constrained``: ``Σ w = K − 1``); ``popart`` does so here by default (``fixed_sum=True`` unless set).
    """

    def __post_init__(self):
        super().__post_init__()
        if self.reward_weighting == "popart" and "fixed_sum" not in self.reward_weighting_kwargs:
            self.reward_weighting_kwargs = {**self.reward_weighting_kwargs, "fixed_sum": True}
        self.validate_rl_weighting()


# ---- pure functions -------------------------------------------------------------------------------------------------


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation ignoring NaN, reduced over ``dim`` (TRL's ``nanstd``: Bessel-corrected)."""
    if dim is None:
        sq = (x - torch.nanmean(x)) ** 2
        return (torch.nansum(sq) / ((~torch.isnan(x)).sum() - 1)).sqrt()
    sq = (x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2
    return (torch.nansum(sq, dim=dim) / ((~torch.isnan(x)).sum(dim=dim) - 1)).sqrt()


def group_advantages(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    *,
    algorithm: str,
    aggregation: str = "sum_then_normalize",
    scale_rewards: str = "group",
    normalize_advantages: bool = False,
    reward_clip_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """The advantages TRL 1.16 forms from ``(N, K)`` rewards and weights ``(K,)``, without any KL term.

    - ``algorithm="grpo"`` (``GRPOTrainer._generate_and_score_completions``): ``sum_then_normalize`` — weighted sum,
      minus the group mean, divided by the group (or batch) std + 1e-4 unless ``scale_rewards="none"``;
      ``normalize_then_sum`` (GDPO) — each reward z-scored within its group, weighted sum, standardized over the batch.
    - ``algorithm="rloo"`` (``RLOOTrainer``): weighted sum (clipped to ``reward_clip_range``), minus the leave-one-out
      mean of the scorable siblings; optionally standardized over the batch.

    Rows where every reward is NaN get advantage 0, as in TRL. With one-hot ``weights`` this gives the advantages of a
    single objective — what the gradient-based weighting of Lu et al. (2025) backpropagates per reward. A test checks
    that it reproduces TRL's own advantages.
    """
    w = weights.to(rewards_per_func.device, rewards_per_func.dtype)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    if algorithm == "grpo" and aggregation == "normalize_then_sum":
        k = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = _nanstd(grouped, dim=1).unsqueeze(1) if num_generations > 1 else torch.zeros_like(mean_k)
        rewards = (((grouped - mean_k) / (std_k + 1e-4)).view(-1, k) * w).nansum(dim=1)
        rewards[unscorable] = torch.nan
        std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())
        return torch.nan_to_num((rewards - torch.nanmean(rewards)) / (std + 1e-4), nan=0.0)
    rewards = (rewards_per_func * w).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    if algorithm == "grpo":
        if aggregation != "sum_then_normalize":
            raise ValueError(f"Unknown multi_objective_aggregation {aggregation!r}.")
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
        advantages = rewards - mean
        if scale_rewards == "group":
            std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
        elif scale_rewards == "batch":
            std = _nanstd(rewards).expand_as(rewards)
        else:
            std = None
        if std is not None:
            advantages = advantages / (std + 1e-4)
        return torch.nan_to_num(advantages, nan=0.0)
    if algorithm != "rloo":
        raise ValueError(f"Unknown algorithm {algorithm!r}; expected 'grpo' or 'rloo'.")
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
        grouped = rewards.view(-1, num_generations)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    advantages = rewards - ((total - grouped) / (scorable - 1)).view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def nan_robust_means(rewards: torch.Tensor) -> torch.Tensor:
    """Per-column mean over the finite entries of ``(N, K)`` rewards; NaN for a column with none."""
    finite = torch.isfinite(rewards)
    count = finite.sum(dim=0)
    total = torch.where(finite, rewards, torch.zeros_like(rewards)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def domain_reward_signal(
    combined: torch.Tensor, domains: torch.Tensor, num_generations: int, num_domains: int, signal: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain sums and counts of the mixture signal over the prompt groups of one generation batch.

    ``combined`` is the weighted reward per completion ``(N,)`` (NaN = unscorable), ``domains`` the domain index of
    each completion (constant within a group of ``num_generations``). Per group: ``learnability`` = population
    variance of the group's rewards (``p(1 − p)`` for 0/1 rewards: zero when the prompt is always or never solved),
    ``regret`` = ``1 − mean reward``. Groups without any scorable completion are skipped.
    """
    grouped = combined.view(-1, num_generations).double()
    group_domains = domains.view(-1, num_generations)[:, 0].long()
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)
    mean = torch.where(valid, grouped, torch.zeros_like(grouped)).sum(dim=1) / count.clamp(min=1)
    if signal == "learnability":
        dev = torch.where(valid, grouped - mean.unsqueeze(1), torch.zeros_like(grouped))
        value = (dev**2).sum(dim=1) / count.clamp(min=1)
    elif signal == "regret":
        value = 1.0 - mean
    else:
        raise ValueError(f"Unknown mixture reward signal {signal!r}; expected one of {MIXTURE_REWARD_SIGNALS}.")
    keep = count > 0
    sums = torch.zeros(num_domains, dtype=torch.float64)
    counts = torch.zeros(num_domains, dtype=torch.float64)
    sums.index_add_(0, group_domains[keep].cpu(), value[keep].cpu())
    counts.index_add_(0, group_domains[keep].cpu(), torch.ones(int(keep.sum()), dtype=torch.float64))
    return sums, counts


class DomainRepeatSampler(Sampler[int]):
    """TRL's ``RepeatSampler`` structure over prompts drawn by domain (:class:`hfweight.sampling.DomainSampler`).

    Unique prompts are drawn ``batch_size`` at a time (one generation batch of all ranks) from the domain sampler —
    which reads the mixture's probabilities once per such batch, identically on every rank — and each chunk is
    emitted ``repeat_count`` times with every index repeated ``mini_repeat_count`` (= ``num_generations``) times, as
    in TRL, so each prompt's group is complete and accelerate's batch sharding distributes it as TRL expects.
    """

    def __init__(self, domain_sampler, mini_repeat_count: int, batch_size: int, repeat_count: int):
        self.domain_sampler = domain_sampler
        self.mini_repeat_count = mini_repeat_count
        self.batch_size = batch_size
        self.repeat_count = repeat_count

    def __len__(self) -> int:
        chunks = len(self.domain_sampler) // self.batch_size
        return chunks * self.batch_size * self.mini_repeat_count * self.repeat_count

    def __iter__(self):
        chunk = []
        for index in self.domain_sampler:
            chunk.append(index)
            if len(chunk) == self.batch_size:
                for _ in range(self.repeat_count):
                    for i in chunk:
                        yield from [i] * self.mini_repeat_count
                chunk = []

    def state_dict(self, **kwargs) -> dict:
        return self.domain_sampler.state_dict(**kwargs)

    def load_state_dict(self, state: dict) -> None:
        self.domain_sampler.load_state_dict(state)


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's logical shape (DeepSpeed ZeRO-3 keeps an empty tensor in ``.data`` and the shape in
    ``ds_shape`` outside the forward)."""
    return getattr(param, "ds_shape", None) or param.shape


def _slice_of(flat: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous ``1/world`` slice of ``flat`` (the last ranks may get a shorter or empty one)."""
    size = -(-flat.numel() // world)
    return flat[rank * size : (rank + 1) * size].clone()


def _entries_of(flat: torch.Tensor, params: list, chosen: list) -> torch.Tensor:
    """The entries of ``chosen`` (a subset of ``params``, in ``params``' order) in ``flat``, the concatenation of the
    flattened ``params``."""
    wanted = {id(p) for p in chosen}
    pieces, position = [], 0
    for p in params:
        size = _full_shape(p).numel()
        if id(p) in wanted:
            pieces.append(flat[position : position + size])
        position += size
    return torch.cat(pieces)


def _shards_of(param) -> int:
    from .gradalign import local_piece

    return local_piece(param.data)[1]


def _local_zeros(param) -> torch.Tensor:
    """A zero gradient piece shaped like this rank's piece of ``param`` (a parameter that received no gradient)."""
    data = param.data
    return torch.zeros_like(data.to_local() if hasattr(data, "to_local") else data)


# ---- Trainer glue ---------------------------------------------------------------------------------------------------


class _RewardValidationCallback(TrainerCallback):
    """Validation before training and every ``reward_validation_steps`` optimizer steps."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a resumed run restored the reference point with the weighter's state
            self.trainer.run_reward_validation()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.reward_validation_steps == 0:
            self.trainer.run_reward_validation()


class _PromptSamplerAtStep:
    """The prompt sampler's state at the last consumed generation batch (the DataLoader reads ahead)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def state_dict(self) -> dict:
        batches = self.trainer._generation_batches
        return {"sampler": self.trainer._domain_sampler.state_dict(batches_consumed=batches), "generation_batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.trainer._domain_sampler.load_state_dict(state["sampler"])
        self.trainer._generation_batches = int(state["generation_batches"])


class RewardWeightingMixin(WeightingMixin):
    """Glue shared by :class:`WeightedGRPOTrainer` and :class:`WeightedRLOOTrainer` (mix in before the parent)."""

    _algorithm = "grpo"

    def _init_rl(self, args, train_dataset, parent_init, model, *posargs, **kwargs):
        # None or a plain GRPOConfig/RLOOConfig becomes the Weighted config with weighting off (as the parent builds
        # its default config).
        args = as_weighted_config(self._config_cls, args, model, self._parent_config_cls, self._algorithm.upper())
        self._rl_args = args
        # The domain sampler is built in _get_train_sampler, which TRL calls lazily; it needs the mixture first.
        self.mixture = args.build_mixture() if args.mixture is not None else None
        posargs = (model, *posargs)
        parent_init(*posargs, args=args, train_dataset=train_dataset, **kwargs)
        self._setup_rl_weighting()

    def _setup_rl_weighting(self) -> None:
        args = self.args
        self.weighting_enabled = False  # the supervised-loss pipeline of WeightingMixin stays off
        self.rl_weighting_enabled = args.rl_weighting_enabled
        self._weighting_metrics = defaultdict(list)
        self.token_weighting = self.sample_weighting = None
        self.reward_weighting = None
        self.domain_names = []
        self._validations_done = 0
        self._generation_batches = 0
        self._last_validation: list[float] | None = None
        self._capture_validation: list[torch.Tensor] | None = None
        if not self.rl_weighting_enabled:
            return
        if args.reward_weighting is not None:
            self.reward_weighting = args.build_reward_weighting()
            self.reward_weighting.bind(list(self.reward_func_names), self.reward_weights.clone())
            if getattr(self.reward_weighting, "needs_validation", False):
                if self.eval_dataset is None:
                    raise ValueError(
                        f"reward_weighting={args.reward_weighting!r} learns from validation scores: pass an "
                        "`eval_dataset` of held-out prompts (it is generated on and scored with the same reward "
                        "functions every `reward_validation_steps` steps)."
                    )
                self.add_callback(_RewardValidationCallback(self))
            self._select_gram_parameters()  # fail early on a pattern that matches nothing
        if self.mixture is not None:
            self._setup_prompt_domains()

    # -- prompt-domain mixtures --

    def _setup_prompt_domains(self) -> None:
        from .columns import discover_domains

        column = self.args.domain_column
        if not (_is_map_dataset(self.train_dataset) and column in self.train_dataset.column_names):
            raise ValueError(
                f"mixture={self.args.mixture!r} draws prompts by domain: the training dataset needs a domain column "
                f"{column!r} (set `domain_column` to the column holding each prompt's domain)."
            )
        self._domain_values, sizes = discover_domains(self.train_dataset, column)
        check_declared_domains(self.args, self._domain_values, f"the prompt dataset's column {column!r}")
        self.domain_names = [str(v) for v in self._domain_values]
        for need, what in (("needs_eval", "per-domain held-out losses"), ("needs_target", "per-domain gradients"),
                           ("needs_reference", "reference-model losses")):
            if getattr(self.mixture, need, False):
                raise ValueError(
                    f"mixture={self.args.mixture!r} learns from {what}, which online RL does not produce; prompt-domain "
                    "mixtures learn from rewards: use 'odm', 'temperature', 'schedule', 'static' or 'policy'."
                )
        self.mixture.bind(self.domain_names, sizes)
        self._domain_index = {value: i for i, value in enumerate(self._domain_values)}
        self.args.ignore_data_skip = True  # the sampler restores its own position on resume
        self.add_callback(_MixtureCallback(self))  # total steps for schedules, at train begin

    def _get_train_sampler(self, dataset=None):
        if self.mixture is None:
            return super()._get_train_sampler(dataset)
        from .sampling import DomainSampler

        dataset = dataset if dataset is not None else self.train_dataset
        unique_per_batch = self.args.generation_batch_size // self.num_generations
        self._domain_sampler = DomainSampler.from_column(
            dataset[self.args.domain_column],
            self.mixture,
            domain_order=self._domain_values,
            domain_names=self.domain_names,
            seed=self.args.seed,
            batch_size=unique_per_batch,
            num_samples=len(dataset) - len(dataset) % unique_per_batch,
        )
        return DomainRepeatSampler(
            self._domain_sampler,
            mini_repeat_count=self.num_generations,
            batch_size=unique_per_batch,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
        )

    def _observe_prompt_domains(self, inputs: list[dict], rewards_per_func: torch.Tensor) -> None:
        """Feed the mixture the per-domain reward signal of this generation batch (identical on every rank)."""
        local = torch.tensor(
            [self._domain_index[row[self.args.domain_column]] for row in inputs], device=self.accelerator.device
        )
        domains = self.accelerator.gather(local).cpu()
        weights = self.reward_weights.to(rewards_per_func.device)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        combined = (rewards_per_func * weights).nansum(dim=1)
        combined[unscorable] = torch.nan
        sums, counts = domain_reward_signal(
            combined.cpu(), domains, self.num_generations, len(self.domain_names), self.args.mixture_reward_signal
        )
        for name, s, c in zip(self.domain_names, sums.tolist(), counts.tolist()):
            if c > 0:
                self._weighting_metrics[f"domain_signal/{name}"].append(s / c)
        self.mixture.observe(
            DomainStats(loss_sum=sums, token_count=counts, sample_count=counts, step=self.state.global_step)
        )

    # -- the reward hook --

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self.rl_weighting_enabled:
            return rewards_per_func
        if self._capture_validation is not None:
            self._capture_validation.append(rewards_per_func.detach().float().cpu())
        if self.reward_weighting is not None:
            if self.model.training and self._capture_validation is None:
                weights = self.reward_weighting.weights(rewards_per_func.detach().float().cpu(), self.state.global_step)
                for key, value in self.reward_weighting.metrics().items():
                    self._weighting_metrics[key].append(value)
            else:
                weights = self.reward_weighting.current_weights()
            self.reward_weights = weights.clone()
        if self.model.training and self._capture_validation is None:
            self._last_rewards = rewards_per_func.detach()
            if self.mixture is not None:
                self._observe_prompt_domains(inputs, rewards_per_func.detach())
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.rl_weighting_enabled and self.model.training and self._capture_validation is None:
            self._generation_batches += 1
            if getattr(self.reward_weighting, "needs_gram", False):
                self._update_from_gram(output)
        return output

    # -- validation --

    def run_reward_validation(self) -> list[float]:
        """Generate on ``eval_dataset``, score with the reward functions, hand the per-reward means to the weighter."""
        self._capture_validation = []
        was_training = self.model.training
        # evaluate() logs through the callback handler, which clears `should_log`/`should_evaluate`: called from a
        # step-end callback it would swallow that step's training log. Keep the flags the step had.
        flags = {k: getattr(self.control, k) for k in ("should_log", "should_evaluate", "should_save")}
        try:
            self.evaluate(metric_key_prefix="reward_validation")
            rows = torch.cat(self._capture_validation) if self._capture_validation else torch.empty(0, 0)
        finally:
            self._capture_validation = None
            self.model.train(was_training)
            for key, value in flags.items():
                setattr(self.control, key, value)
        if rows.numel() == 0:
            raise RuntimeError("Reward validation produced no rewards: is `eval_dataset` empty?")
        scores = nan_robust_means(rows)
        self.reward_weighting.observe_validation(scores, self.state.global_step)
        self._validations_done += 1
        self._last_validation = scores.tolist()
        for name, value in zip(self.reward_func_names, self._last_validation):
            if math.isfinite(value):
                self._weighting_metrics[f"validation/{name}"].append(value)
        return self._last_validation

    # -- gradient Gram --

    def _select_gram_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters the Gram is built over, looked up on the model as it is now: FSDP2 replaces the
        parameters with ``DTensor`` ones when the Trainer wraps the model at the start of ``train()``."""
        if not getattr(self.reward_weighting, "needs_gram", False):
            return []
        pattern = self.args.reward_gradient_parameters
        model = self.accelerator.unwrap_model(self.model)
        self._trainable_parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = [(n, p) for n, p in self._trainable_parameters if pattern is None or re.search(pattern, n)]
        if not chosen:
            raise ValueError(
                f"`reward_gradient_parameters={pattern!r}` matches no trainable parameter; parameter names look like "
                f"{[n for n, _ in list(model.named_parameters())[:3]]}."
            )
        return chosen

    def per_reward_advantages(self, rewards_per_func: torch.Tensor, index: int) -> torch.Tensor:
        """The advantages of reward ``index`` alone, formed as the parent forms its combined advantages."""
        one_hot = torch.zeros(rewards_per_func.shape[1])
        one_hot[index] = 1.0
        return group_advantages(rewards_per_func, one_hot, self.num_generations, **self._advantage_options())

    def _advantage_options(self) -> dict:
        if self._algorithm == "grpo":
            return dict(
                algorithm="grpo", aggregation=self.multi_objective_aggregation, scale_rewards=self.scale_rewards
            )
        return dict(
            algorithm="rloo",
            normalize_advantages=self.normalize_advantages,
            reward_clip_range=self.reward_clip_range,
        )

    def _update_from_gram(self, output: dict) -> None:
        """One backward of the parent's policy loss per reward; Gram of the (rank-averaged) gradients; update.

        The loss is the parent's own ``_compute_loss`` on this rank's generation batch, split into the same
        ``steps_per_generation`` chunks as training and summed: the gradient the trainer would accumulate with these
        advantages, averaged over ranks as the data-parallel wrapper averages it. Each rank keeps only its share of
        every reward's gradient (:meth:`_reward_gradient_shares`); the Gram is the sum of the ranks' partial products
        (:func:`hfweight.gradalign.partial_gram`) — one all-reduce of a ``(K, K)`` matrix, no gradient gathered —
        then clipped per reward (:func:`hfweight.strategies.rewards.clip_gram`) and handed to the weighter. The
        parent's loss metrics from these passes are discarded.

        Clipping (``clip_scope="model"``, the default): each reward's gradient is clipped by the norm of its
        rank-averaged gradient over *every* trainable parameter, as the authors clip the actor's full gradient
        (``verl/workers/actor/dp_actor.py``: ``clip_grad_norm_(actor_module.parameters(), max_norm=grad_clip)``) before
        keeping the ``reward_gradient_parameters`` subset for the Gram; the whole gradient is then computed (one
        reward at a time), not only the subset's. ``clip_scope="selected"`` clips by the subset's own norm.
        """
        from .gradalign import complete_products, partial_gram
        from .strategies.rewards import clip_gram

        saved_metrics = {mode: {key: len(v) for key, v in m.items()} for mode, m in self._metrics.items()}
        shares, norms = self._reward_gradient_shares(output, self._last_rewards.float())
        for mode, lengths in saved_metrics.items():  # drop what _compute_loss logged during these passes
            for key in list(self._metrics[mode]):
                del self._metrics[mode][key][lengths.get(key, 0) :]
        world = self.accelerator.num_processes
        partial, sharded = partial_gram(shares, world)
        gram = complete_products(partial, sharded, world, lambda t: self._all_reduce(t).cpu())
        # (K, numel of this rank's share): kept for inspection and tests
        self._last_reward_gradients = torch.stack(
            [torch.cat([piece.reshape(-1).float().cpu() for piece, _ in share]) for share in shares]
        )
        self._last_reward_gram = gram
        self._last_reward_gradient_norms = norms  # (K,) full-model norms the clipping used, or None (the Gram's own)
        gram = clip_gram(gram, self.reward_weighting.clip_norm, norms)
        lr = self._get_learning_rate() if self.lr_scheduler is not None else None
        self.reward_weighting.update_from_gram(gram, self.state.global_step, lr=lr)
        for key, value in self.reward_weighting.metrics().items():
            if key.startswith("gradient_influence/"):
                self._weighting_metrics[key].append(value)

    def _reward_gradient_shares(
        self, output: dict, rewards: torch.Tensor
    ) -> tuple[list[list[tuple[torch.Tensor, int]]], torch.Tensor | None]:
        """Per reward ``k``, this rank's share of the rank-averaged policy gradient ``g_k`` of the Gram parameters, as
        ``(piece, number of shards)`` per parameter (:mod:`hfweight.gradalign`); plus, with ``clip_scope="model"``,
        the norms ``‖g_k‖`` over every trainable parameter (``(K,)``, identical on all ranks), else None.

        - FSDP (parameters are ``DTensor`` shards outside the forward): backward through the FSDP module into
          ``.grad`` — FSDP all-gathers each layer for the pass and reduce-scatters (averages) its gradient as in
          training — and each rank keeps its own gradient shards. The optimizer's ``.grad`` is set aside and restored.
        - Otherwise (one process, DDP, DeepSpeed ZeRO-1/2/3): ``torch.autograd.grad`` through the unwrapped model —
          DDP's reducer and DeepSpeed's gradient hooks (on the parameters' gradient accumulation) never fire, and
          under ZeRO-3 the layers' forward/backward hooks gather the parameters as in training — then one all-reduce
          (mean) per reward; each rank keeps a ``1/W`` slice of it, so the ``K`` stored gradients cost ``K/W`` of
          the selected parameters per rank (with full-model clipping the whole gradient is formed once per reward
          for its norm, then only the selected slice is kept).
        """
        from trl.trainer.utils import split_tensor_dict

        from .gradalign import register_sharded_parameters

        k = rewards.shape[1]
        start = self.accelerator.process_index * output["advantages"].shape[0]
        local = slice(start, start + output["advantages"].shape[0])
        fsdp = getattr(self, "is_fsdp_enabled", False)
        model = self.model_wrapped if fsdp else self.accelerator.unwrap_model(self.model)
        if fsdp:
            register_sharded_parameters(model)
        params = [p for _, p in self._select_gram_parameters()]
        trainable = [p for p in model.parameters() if p.requires_grad]
        whole_model = self.reward_weighting.clip_norm is not None and self.reward_weighting.clip_scope == "model"
        saved = [p.grad for p in trainable] if fsdp else None
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        shares, norms = [], []
        try:
            for index in range(k):
                advantages = self.per_reward_advantages(rewards, index)[local].to(output["advantages"].device)
                chunks = split_tensor_dict(dict(output, advantages=advantages), self.args.steps_per_generation)
                if fsdp:
                    shares.append(self._backward_shards(model, chunks, trainable, params))
                    if whole_model:
                        norms.append(self._sharded_gradient_norm(trainable))
                elif whole_model:
                    flat = self._averaged_gradient(model, chunks, trainable)
                    norms.append(flat.double().norm().cpu())
                    shares.append([(_slice_of(_entries_of(flat, trainable, params), rank, world), world)])
                else:
                    shares.append([(_slice_of(self._averaged_gradient(model, chunks, params), rank, world), world)])
        finally:
            if saved is not None:
                for p, g in zip(trainable, saved):
                    p.grad = g
        return shares, (torch.stack(norms) if whole_model else None)

    def _sharded_gradient_norm(self, trainable) -> torch.Tensor:
        """``‖g‖`` of the current (FSDP-sharded) gradients of ``trainable``: local squares weighted by
        ``shards / W`` (a replicated piece is on every rank), summed over ranks."""
        from .gradalign import snapshot_gradients

        world = self.accelerator.num_processes
        squares = torch.zeros((), dtype=torch.float64)
        for snapshot in snapshot_gradients(trainable):
            if snapshot is not None:
                piece, shards = snapshot
                squares += piece.double().pow(2).sum().cpu() * shards / world
        return self._all_reduce(squares).cpu().sqrt()

    def _backward_shards(self, model, chunks, trainable, params) -> list[tuple[torch.Tensor, int]]:
        """FSDP: the summed chunk losses backpropagated into ``.grad``; snapshots of the local gradient shards."""
        from .gradalign import register_sharded_parameters, snapshot_gradients

        for p in trainable:
            p.grad = None
        for chunk in chunks:
            self._compute_loss(model, chunk).backward()
        register_sharded_parameters(model)
        snapshots = snapshot_gradients(params)
        return [s if s is not None else (_local_zeros(p), _shards_of(p)) for s, p in zip(snapshots, params)]

    def _averaged_gradient(self, model, chunks, params) -> torch.Tensor:
        """The summed chunk losses' gradient w.r.t. ``params`` (flat, float32), averaged over ranks."""
        total = None
        for chunk in chunks:
            grads = torch.autograd.grad(self._compute_loss(model, chunk), params, allow_unused=True)
            flat = torch.cat([
                (g if g is not None else torch.zeros(_full_shape(p), device=p.device, dtype=p.dtype)).reshape(-1).float()
                for g, p in zip(grads, params)
            ])
            total = flat if total is None else total.add_(flat)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)  # DDP averages the policy gradient over ranks; so do we
            total /= dist.get_world_size()
        return total

    # -- logging, state, artifacts --

    def _has_weighting_state(self) -> bool:
        return getattr(self, "rl_weighting_enabled", False)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._has_weighting_state() and self.model.training and "loss" in logs:
            self._add_weighting_logs(logs)
            if self.reward_weighting is not None:  # the weights in force now, over the window's mean
                for name, w in zip(self.reward_func_names, self.reward_weighting.current_weights().tolist()):
                    logs[f"reward_weight/{name}"] = w
        super(WeightingMixin, self).log(logs, *args, **kwargs)  # the parent's log: the mixin's would add them again

    def _stateful_parts(self) -> dict:
        parts = {"reward_weighting": self.reward_weighting, "mixture": self.mixture}
        if getattr(self, "_domain_sampler", None) is not None:
            parts["prompt_sampler"] = _PromptSamplerAtStep(self)
        return parts

    def _state_facts(self) -> dict:
        return {**super()._state_facts(), "reward_functions": list(self.reward_func_names)}

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.reward_weighting is not None:
            self.reward_weights = self.reward_weighting.current_weights().clone()
        if checkpoint is not None and getattr(self, "_domain_sampler", None) is not None:
            self._rng_checkpoint = checkpoint

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        checkpoint = getattr(self, "_rng_checkpoint", None)
        if checkpoint is not None:
            # With the prompt sampler restoring its own position, Trainer loads the RNG state *before* creating the
            # epoch's iterator, which draws a DataLoader seed from the global generator; generation would then sample
            # differently from the uninterrupted run. Reload it here, after the first fetch, as Trainer itself does
            # when it skips batches.
            self._load_rng_state(checkpoint)
            self._rng_checkpoint = None
        return batch_samples, num_items

    def weighting_record(self) -> dict:
        record = super().weighting_record()
        if self.reward_weighting is not None:
            weights = self.reward_weighting.current_weights().tolist()
            record["final_reward_weights"] = dict(zip(self.reward_func_names, weights))
            multipliers = {k.split("/", 1)[1]: v for k, v in self.reward_weighting.metrics().items() if k.startswith("lagrange/")}
            if multipliers:
                record["final_multipliers"] = multipliers
            if self._last_validation is not None:
                record["last_validation"] = dict(zip(self.reward_func_names, self._last_validation))
        return record


class WeightedGRPOTrainer(RewardWeightingMixin, GRPOTrainer):
    """Drop-in for ``trl.GRPOTrainer``; with ``reward_weighting`` and ``mixture`` off it is exactly the parent."""

    _algorithm = "grpo"
    _config_cls, _parent_config_cls = WeightedGRPOConfig, GRPOConfig

    def __init__(self, model, reward_funcs=None, args: WeightedGRPOConfig | None = None, train_dataset=None, **kwargs):
        # `reward_funcs` is optional as in the parent (which raises "No reward source provided" without any source).
        self._init_rl(args, train_dataset, super().__init__, model, reward_funcs, **kwargs)


class WeightedRLOOTrainer(RewardWeightingMixin, RLOOTrainer):
    """Drop-in for ``trl.RLOOTrainer``; with ``reward_weighting`` and ``mixture`` off it is exactly the parent.

    RLOO does not standardize advantages by default, so the absolute scale of the reward weights matters: the
    dynamic weighters keep the total of the initial weights fixed (``popart`` with ``fixed_sum``; ``gradient`` and
    ``hypervolume`` per-objective renormalize to ``Σ w0``), see :mod:`hfweight.strategies.rewards`.
    """

    _algorithm = "rloo"
    _config_cls, _parent_config_cls = WeightedRLOOConfig, RLOOConfig

    def __init__(self, model, reward_funcs, args: WeightedRLOOConfig | None = None, train_dataset=None, **kwargs):
        self._init_rl(args, train_dataset, super().__init__, model, reward_funcs, **kwargs)


__all__ = [
    "DomainRepeatSampler",
    "RewardWeightingArguments",
    "WeightedGRPOConfig",
    "WeightedGRPOTrainer",
    "WeightedRLOOConfig",
    "WeightedRLOOTrainer",
    "domain_reward_signal",
    "group_advantages",
    "nan_robust_means",
]
