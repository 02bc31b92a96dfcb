"""The exact step denominator of a token weighting whose normalizer depends on the current model
(``denominator_needs_logps``, e.g. Rho-1's top-k selection; docs/methods.md#normalization).

The plan's ``Z`` uses the weights known before the forward (:meth:`TokenWeighting.denominator_weights`); each
micro-batch adds its exact share after the forward (:meth:`TokenWeighting.denominator_weights_after`), and after the
last backward the gradients are rescaled by ``Z_planned / Z_exact`` before clipping — the same correction as the
sample weights' rescale mode, which takes this over when it runs (the rescale rows carry the exact shares).
"""

from __future__ import annotations

import torch

from ...columns import BATCH_TOKEN_WEIGHTS
from ...loss import weighted_denominator
from ..step import rescale_step
from .base import Driver


class ExactDenominator(Driver):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.exact: torch.Tensor | None = None

    def before_step(self, plan, batch_samples: list[dict]) -> None:
        """Start this rank's exact ``Z``, or None where the planned one is already exact and no correction is possible
        (DeepSpeed steps inside its backward)."""
        t = self.trainer
        self.exact = None
        if not getattr(t, "is_deepspeed_enabled", False):
            self.exact = torch.zeros((), dtype=torch.float64, device=t.args.device)
            return
        if t.args.loss_normalization == "sample" or any(BATCH_TOKEN_WEIGHTS in b for b in batch_samples):
            raise ValueError(
                f"token_weighting={t.args.token_weighting!r} with a `token_weights` column or "
                "loss_normalization='sample' normalizes over tokens chosen in the forward, which needs a gradient "
                "correction before the optimizer step that DeepSpeed's engine does not allow; train it with DDP or FSDP "
                "(accelerate_configs/ddp.yaml, fsdp2.yaml), or use token normalization without the column."
            )
        # token mode without a column: the planned count ceil(k% · n_valid) is the exact one

    def after_forward(self, plan, micro) -> None:
        if self.exact is not None:
            self.exact += weighted_denominator(
                micro.mask, micro.den_w, micro.v, self.trainer.args.loss_normalization, micro.segments, micro.num_samples
            ).to(self.exact.device)

    def close_step(self, plan, loss: torch.Tensor) -> torch.Tensor:
        """All-reduce the exact ``Z`` and rescale the step's gradients to it."""
        if self.exact is None:
            return loss
        t = self.trainer
        z = float(t._all_reduce(self.exact.view(1) / t._replica_factor())[0])
        return rescale_step(t, plan, loss, z)
