"""Resample mode over a map-style dataset: the training sampler draws each global batch's rows by domain with the
controller's current probabilities (:class:`hfweight.sampling.DomainSampler`, seeded identically on every rank), and
its position is checkpointed at the last consumed optimizer step (the DataLoader reads ahead of training)."""

from __future__ import annotations

from ...sampling import DomainSampler
from .base import Driver


class _SamplerAtStep:
    """The domain sampler's state at the last consumed optimizer step."""

    def __init__(self, sampler, state):
        self.sampler, self.state = sampler, state

    def state_dict(self) -> dict:
        return self.sampler.state_dict(batches_consumed=self.state.global_step)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class DomainResampling(Driver):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.sampler: DomainSampler | None = None  # built when the Trainer asks for its train sampler

    def train_sampler(self, dataset) -> DomainSampler:
        t, args = self.trainer, self.trainer.args
        self.sampler = DomainSampler.from_column(
            dataset[args.domain_column],
            t.mixture,
            domain_order=t._domain_values,
            domain_names=t.domain_names,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            batch_size=args.per_device_train_batch_size * args.gradient_accumulation_steps * t._data_parallel_size(),
            num_samples=len(dataset),
        )
        return self.sampler

    def state_parts(self) -> dict:
        return {} if self.sampler is None else {"domain_sampler": _SamplerAtStep(self.sampler, self.trainer.state)}
