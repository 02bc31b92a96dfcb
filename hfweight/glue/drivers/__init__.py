"""Capability drivers of the supervised glue, one file each. :func:`build_drivers` is the one table from what the
strategies declare (and the mixture mode asks for) to the drivers a trainer runs, in the order their hooks run.

| declared by | flag / setting | driver |
|---|---|---|
| sample strategy | ``needs_run_length`` | :class:`~.run_length.RunLength` |
| mixture controller | ``needs_target`` | :class:`~.alignment.GradientAlignment` (DGA) |
| token strategy | ``denominator_needs_logps`` | :class:`~.exact_denominator.ExactDenominator` (Rho-1) |
| sample strategy | ``needs_losses`` | :class:`~.loss_modes.LossModes` (score / rescale) |
| sample strategy | ``needs_meta_step`` | :class:`~.meta_step.MetaStep` (STORM) |
| mixture controller | ``needs_eval`` | :class:`~.evaluations.HeldOutEvaluations` (Aioli, Skill-it) |
| config | ``mixture_mode='resample'`` | :class:`~.sampler.DomainResampling` or :class:`~.streaming.StreamResampling` |

A new capability is a new driver file, a flag on the strategy base class, and a row here.
"""

from __future__ import annotations

from ..data import is_map_dataset
from .alignment import GradientAlignment
from .base import Driver
from .evaluations import HeldOutEvaluations
from .exact_denominator import ExactDenominator
from .loss_modes import LossModes
from .meta_step import MetaStep
from .run_length import RunLength
from .sampler import DomainResampling
from .streaming import StreamResampling


def build_drivers(trainer) -> list[Driver]:
    """The drivers ``trainer``'s strategies and settings need, built (each checks its setup) in hook order."""
    token, sample, mixture, args = trainer.token_weighting, trainer.sample_weighting, trainer.mixture, trainer.args
    drivers: list[Driver] = []
    if sample is not None and sample.needs_run_length:
        drivers.append(RunLength(trainer))
    if mixture is not None and mixture.needs_target:
        drivers.append(GradientAlignment(trainer))
    loss_modes = LossModes(trainer) if sample is not None and sample.needs_losses else None
    if token is not None and token.denominator_needs_logps and (loss_modes is None or loss_modes.mode != "rescale"):
        drivers.append(ExactDenominator(trainer))  # the rescale mode corrects the denominator itself
    if loss_modes is not None:
        drivers.append(loss_modes)
        if sample.needs_meta_step:
            drivers.append(MetaStep(trainer, loss_modes))
    if mixture is not None and mixture.needs_eval:
        drivers.append(HeldOutEvaluations(trainer))
    if mixture is not None and args.mixture_mode == "resample":
        # after the evaluations: a stream must get the probabilities the evaluations just moved
        drivers.append(DomainResampling(trainer) if is_map_dataset(trainer.train_dataset) else StreamResampling(trainer))
        if getattr(args, "packing", False):
            raise ValueError(
                "mixture_mode='resample' draws whole rows by domain, but packed rows mix domains; use "
                "mixture_mode='upweight' with packing."
            )
        trainer._sampler_restores_position = True  # Trainer must not skip batches on resume on top (see the core's train)
    return drivers


__all__ = ["Driver", "build_drivers"]
