"""Resample mode over a map-style dataset: the training sampler draws each global batch's rows by domain with the
controller's current probabilities (:class:`hfweight.sampling.DomainSampler`, seeded identically on every rank), and
its position is checkpointed at the last consumed optimizer step (the DataLoader reads ahead of training)."""

from __future__ import annotations

import math

from ...sampling import DomainSampler
from ..data import data_seed
from .base import Driver


def _product(factors: dict[str, int]) -> str:
    return " × ".join(str(v) for v in factors.values()) + f" = {math.prod(factors.values())}"


class _SamplerAtStep:
    """The domain sampler's state at the last consumed optimizer step, with the global batch's factors (so a resume
    under another global batch is refused with each factor's old and new value)."""

    def __init__(self, sampler, trainer):
        self.sampler, self.trainer = sampler, trainer

    def state_dict(self) -> dict:
        state = self.sampler.state_dict(batches_consumed=self.trainer.state.global_step)
        return {**state, "global_batch": self.trainer._global_batch()}

    def load_state_dict(self, state: dict) -> None:
        saved, now = state.get("global_batch"), self.trainer._global_batch()
        if state["batch_size"] != self.sampler.batch_size:
            old = _product(saved) if saved else str(state["batch_size"])
            raise ValueError(
                f"mixture_mode='resample' draws each global batch by domain as a whole, so it resumes only with the "
                f"global batch it was saved with. The global batch is {' × '.join(now)}: saved {old}, now "
                f"{_product(now)}. Resume with the same product (e.g. double gradient_accumulation_steps when halving "
                "the processes)."
            )
        self.sampler.load_state_dict({k: v for k, v in state.items() if k != "global_batch"})


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
            seed=data_seed(args),
            batch_size=t._global_batch_size(),
            num_samples=len(dataset),
        )
        return self.sampler

    def state_parts(self) -> dict:
        return {} if self.sampler is None else {"domain_sampler": _SamplerAtStep(self.sampler, self.trainer)}
