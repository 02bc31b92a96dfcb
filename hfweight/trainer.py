"""``WeightedTrainer``: ``transformers.Trainer`` with the weighting pipeline."""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

from .config import WeightedTrainingArguments, as_weighted_config
from .glue import WeightingMixin


class WeightedTrainer(WeightingMixin, Trainer):
    """Drop-in for ``transformers.Trainer``. Takes ``WeightedTrainingArguments``; with every weighting field at its
    default it is exactly the parent (same loss and gradients, bit for bit).

    Example::

        args = WeightedTrainingArguments(output_dir="out", sample_weighting="static", loss_normalization="token")
        trainer = WeightedTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
        trainer.train()
    """

    def __init__(self, model=None, args: WeightedTrainingArguments | None = None, *posargs, reference_model=None, **kwargs):
        if args is None:
            args = WeightedTrainingArguments(output_dir="trainer_output")  # the parent's default output_dir
        # A plain TrainingArguments (what the parent takes) runs with weighting off.
        args = as_weighted_config(WeightedTrainingArguments, args, model, TrainingArguments, "")
        super().__init__(model, args, *posargs, **kwargs)
        self._setup_weighting(reference_model)
