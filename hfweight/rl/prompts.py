"""Prompt-domain mixtures in GRPO/RLOO (``mixture=...`` with a domain column on the prompts): the setup, the prompt
sampler, the per-domain reward signal the controller learns from, and the sampler's checkpointed position.

The prompt sampler draws domains with the controller's probabilities, keeping TRL's repeat structure
(:class:`DomainRepeatSampler`); the controller learns from ``mixture_reward_signal`` per domain
(:func:`hfweight.rl.advantages.domain_reward_signal`): ``"learnability"`` — the variance of the combined reward within
each prompt's group, ``p(1 − p)`` for a 0/1 reward, i.e. where GRPO still has signal — or ``"regret"`` —
``1 − mean reward`` (focus on what is not solved yet). The controllers treat the signal like a loss: a larger value
means "sample this domain more" for ``odm``-style controllers.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from ..columns import discover_domains
from ..glue.data import check_declared_domains, data_seed, is_map_dataset
from ..strategies.base import DomainStats
from .advantages import combined_rewards, domain_reward_signal

# What a controller may learn from that online RL does not produce: the flag it declares, and what it names.
_OFFLINE_SIGNALS = (
    ("needs_eval", "per-domain held-out losses"),
    ("needs_target", "per-domain gradients"),
    ("needs_reference", "reference-model losses"),
)


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


class PromptMixture:
    """The prompt-domain mixture of one GRPO/RLOO trainer (its controller is ``trainer.mixture``).

    Its checkpointed state (the ``prompt_sampler`` part) is the sampler's position at the last *consumed* generation
    batch — the DataLoader reads ahead — and the number of those batches.
    """

    state_class = "_PromptSamplerAtStep"  # the part's class name in checkpoints of earlier versions (they still resume)

    def __init__(self, trainer):
        """Read the prompts' domains and bind the controller to them; fail on data or a controller it cannot serve."""
        self.trainer = trainer
        args, mixture = trainer.args, trainer.mixture
        column = args.domain_column
        if not (is_map_dataset(trainer.train_dataset) and column in trainer.train_dataset.column_names):
            raise ValueError(
                f"mixture={args.mixture!r} draws prompts by domain: the training dataset needs a domain column "
                f"{column!r} (set `domain_column` to the column holding each prompt's domain)."
            )
        self.domain_values, sizes = discover_domains(trainer.train_dataset, column)
        check_declared_domains(args, self.domain_values, f"the prompt dataset's column {column!r}")
        self.domain_names = [str(v) for v in self.domain_values]
        for flag, what in _OFFLINE_SIGNALS:
            if getattr(mixture, flag):
                raise ValueError(
                    f"mixture={args.mixture!r} learns from {what}, which online RL does not produce; prompt-domain "
                    "mixtures learn from rewards: use 'odm', 'temperature', 'schedule', 'static' or 'policy'."
                )
        mixture.bind(self.domain_names, sizes)
        self.domain_index = {value: i for i, value in enumerate(self.domain_values)}
        trainer._sampler_restores_position = True  # Trainer must not skip batches on resume (see the core's train)
        self.sampler = None  # the DomainSampler, built with the training DataLoader
        self.generation_batches = 0  # training generation batches consumed
        self.rng_checkpoint: str | None = None

    def train_sampler(self, dataset) -> DomainRepeatSampler:
        """The training prompts' sampler: one generation batch of unique prompts (all ranks) per mixture draw."""
        from ..sampling import DomainSampler

        trainer, args = self.trainer, self.trainer.args
        unique_per_batch = args.generation_batch_size // trainer.num_generations
        self.sampler = DomainSampler.from_column(
            dataset[args.domain_column],
            trainer.mixture,
            domain_order=self.domain_values,
            domain_names=self.domain_names,
            seed=data_seed(args),
            batch_size=unique_per_batch,
            num_samples=len(dataset) - len(dataset) % unique_per_batch,
        )
        return DomainRepeatSampler(
            self.sampler,
            mini_repeat_count=trainer.num_generations,
            batch_size=unique_per_batch,
            repeat_count=trainer.num_iterations * args.steps_per_generation,
        )

    def observe(self, inputs: list[dict], rewards_per_func: torch.Tensor, weights: torch.Tensor) -> None:
        """Feed the controller the per-domain signal of this generation batch: its gathered ``(N, K)`` rewards
        combined with the ``weights`` TRL applies to it (identical on every rank)."""
        trainer = self.trainer
        local = torch.tensor(
            [self.domain_index[row[trainer.args.domain_column]] for row in inputs], device=trainer.accelerator.device
        )
        domains = trainer.accelerator.gather(local).cpu()
        combined = combined_rewards(rewards_per_func, weights)
        signal = trainer.args.mixture_reward_signal
        sums, counts = domain_reward_signal(
            combined.cpu(), domains, trainer.num_generations, len(self.domain_names), signal
        )
        for name, s, c in zip(self.domain_names, sums.tolist(), counts.tolist()):
            if c > 0:
                trainer._record(f"domain_signal/{name}", s / c)
        trainer.mixture.observe(
            DomainStats(loss_sum=sums, token_count=counts, sample_count=counts, step=trainer.state.global_step)
        )

    # ---- resume ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        batches = self.generation_batches
        return {"sampler": self.sampler.state_dict(batches_consumed=batches), "generation_batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generation_batches = int(state["generation_batches"])

    def resumed_from(self, checkpoint: str) -> None:
        """The run resumed from ``checkpoint``: reload its RNG state after the first fetch (:meth:`after_fetch`)."""
        if self.sampler is not None:
            self.rng_checkpoint = checkpoint

    def after_fetch(self) -> None:
        """With the prompt sampler restoring its own position, Trainer loads the RNG state *before* creating the
        epoch's iterator, which draws a DataLoader seed from the global generator; generation would then sample
        differently from the uninterrupted run. Reload it after the first fetch, as Trainer itself does when it skips
        batches."""
        if self.rng_checkpoint is not None:
            self.trainer._load_rng_state(self.rng_checkpoint)
            self.rng_checkpoint = None
