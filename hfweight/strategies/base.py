"""The small interfaces every strategy implements.

Strategies are pure functions of tensors plus explicit state: they never see a Trainer, a DataLoader or a process
group. The Trainer glue in :mod:`hfweight.glue` builds the contexts below, calls the strategies, and takes care of
normalization (docs/methods.md#normalization), cross-rank reduction and checkpointing.

A strategy that needs the model beyond the weighted loss (a scoring pass, a meta step, gradient alignment, held-out
evaluations, ...) *declares* it with one of the ``needs_*`` flags below; each flag names the driver in
:mod:`hfweight.glue.drivers` that the glue then runs for it. Every optional hook such a driver calls is declared here
with a default, so the glue never probes a strategy with ``hasattr``.

Every per-token tensor is *aligned with the shifted labels*: shape ``(batch, seq_len - 1)``, entry ``[i, t]`` belongs to
the prediction of token ``t + 1`` of row ``i``. Per-token dataset columns are aligned with ``input_ids`` and shifted
by the glue before a strategy sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Stateful:
    """Anything whose state must survive a checkpoint/resume round trip.

    The default is stateless. Override both methods together; ``load_state_dict(state_dict())`` must restore the
    object exactly, so a resumed run continues as if never interrupted.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


@dataclass
class TokenContext:
    """What a token strategy may look at for one micro-batch (shapes ``(B, T-1)``)."""

    mask: torch.Tensor
    """True where the shifted label is a real target (not -100, padding or a packed-sequence boundary)."""
    column: torch.Tensor | None = None
    """Static per-token weights from the dataset column, if the dataset has one."""
    ref_logps: torch.Tensor | None = None
    """Reference-model log-probabilities of the labels, if a reference is configured."""
    logps: torch.Tensor | None = None
    """Current model's log-probabilities of the labels (detached). ``None`` before the forward pass."""
    kl: torch.Tensor | None = None
    """Per-token ``KL(π_ref ‖ π_θ)`` over the vocabulary, with gradient; only for strategies that ask for it."""


class TokenWeighting(Stateful):
    """Per-token weights ``w_t``.

    Two roles, because some methods reweight the loss without renormalizing it (DFT divides by the token count):

    - :meth:`denominator_weights` enter the step's normalizer ``Σ v_i w_t`` (docs/methods.md#normalization). They are computed *before*
      the forward pass (from the mask, static columns and reference scores). When the true normalizer depends on the
      current model (``denominator_needs_logps``, e.g. Rho-1's top-k selection) they are the planned estimate, and
      :meth:`denominator_weights_after` gives the exact ones after the forward: the glue then rescales the step's
      gradients by ``Z_planned / Z_exact`` before clipping (exact; the same correction as the sample rescale mode).
    - :meth:`loss_weights` multiply each token's loss in the numerator; they may use the current log-probabilities.
    """

    name: str = ""
    column_required: bool = False
    """Whether the strategy cannot run without the dataset's ``token_weights`` column."""
    needs_reference: bool = False
    """Whether the strategy needs reference log-probabilities (``ctx.ref_logps``)."""
    needs_reference_model: bool = False
    """Whether the strategy needs a live reference *model* (full distributions), not just cached log-probs."""
    denominator_needs_logps: bool = False
    """Whether the exact normalizer depends on the current model (e.g. Rho-1's top-k selection on excess loss): then
    :meth:`denominator_weights_after` is called after the forward and the step's gradients are corrected (driver:
    :mod:`hfweight.glue.drivers.exact_denominator`)."""

    def denominator_weights(self, ctx: TokenContext) -> torch.Tensor | None:
        """Weights in the normalizer; ``None`` means 1 on every valid token."""
        return ctx.column

    def denominator_weights_after(self, ctx: TokenContext) -> torch.Tensor | None:
        """The exact normalizer weights once ``ctx.logps`` is known (only called when ``denominator_needs_logps``)."""
        return self.denominator_weights(ctx)

    def loss_weights(self, ctx: TokenContext) -> torch.Tensor | None:
        """Weights on each token's loss; ``None`` means the same as :meth:`denominator_weights`."""
        return self.denominator_weights(ctx)

    def extra_token_loss(self, ctx: TokenContext) -> torch.Tensor | None:
        """An additional per-token loss (with gradient) added to the weighted one; ``None`` for none."""
        return None


@dataclass
class SampleContext:
    """What a sample strategy may look at: one entry per sample of the set being weighted."""

    column: torch.Tensor | None = None
    """Static per-sample weights from the dataset column, if present."""
    losses: torch.Tensor | None = None
    """Per-sample mean token losses of the current model (detached), when the strategy asked for them."""
    domains: torch.Tensor | None = None
    """Domain index of each sample, when the dataset has a domain column."""
    step: int = 0
    """Optimizer steps completed so far."""


class SampleWeighting(Stateful):
    """Per-sample weights ``v_i``."""

    name: str = ""
    column_required: bool = False
    """Whether the strategy cannot run without the dataset's ``sample_weight`` column."""
    needs_losses: bool = False
    """Whether :meth:`weights` needs ``ctx.losses``: the glue provides them in one of the exact modes, ``score`` or
    ``rescale`` (driver: :mod:`hfweight.glue.drivers.loss_modes`)."""
    supports_rescale: bool = False
    """Whether the strategy implements the *rescale* protocol below (docs/methods.md#exact-modes), which lets the glue
    weigh each micro-batch from its own training-forward losses, with no scoring pass."""
    mode: str = "score"
    """With ``needs_losses``: ``"score"``, ``"rescale"`` or ``"auto"`` (rescale where the gradients can be rescaled);
    the glue writes the resolved mode back here."""
    needs_meta_step: bool = False
    """Whether the strategy learns in a meta step on the previous batch (STORM; driver:
    :mod:`hfweight.glue.drivers.meta_step`)."""
    needs_run_length: bool = False
    """Whether the strategy must know how many samples the run will see before its first step (loss truncation's
    window): the glue calls :meth:`set_run_length` at the start of training."""

    def weights(self, ctx: SampleContext) -> torch.Tensor | None:
        """Weights of the samples in ``ctx``; ``None`` means all ones."""
        return ctx.column

    def set_run_length(self, run_samples: int) -> None:
        """With ``needs_run_length``: the number of samples the run will see (max steps × global batch)."""

    # ---- rescale protocol (only with ``supports_rescale``) -----------------------------------------------------------
    # Per optimizer step the glue calls ``begin_step`` once, ``local_weights`` once per micro-batch (after its forward,
    # before its backward: any subset of the step's samples, in any order, on any rank), and ``end_step`` once with
    # the step's global batch. ``local_weights`` must be a pure function of its input and of the state left by the
    # previous ``end_step``, and its weights *unnormalized* (the glue divides by their global sum): then the step
    # objective does not depend on how the step is split into micro-batches and ranks.

    def begin_step(self, step: int) -> None:
        """Called once before the step's first micro-batch."""

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """Unnormalized weights ``u_i ≥ 0`` of a subset of the step's samples (``ctx.losses``: their losses)."""
        raise NotImplementedError

    def end_step(self, ctx: SampleContext) -> None:
        """Called once after the step's last micro-batch with the global batch's losses (every rank, same order)."""


class MixtureController(Stateful):
    """Domain probabilities ``α`` over ``k`` domains, applied by resampling or by loss upweighting."""

    name: str = ""
    domain_names: list[str]

    def bind(self, domain_names: list[str], domain_sizes: torch.Tensor | None = None) -> None:
        """Called once by the glue with the dataset's domains (sorted) and their row counts."""
        self.domain_names = list(domain_names)

    def probabilities(self) -> torch.Tensor:
        """Current mixture ``α`` as a float64 tensor ``(k,)`` summing to 1."""
        raise NotImplementedError

    needs_reference: bool = False
    """Whether :meth:`observe` needs ``stats.excess_sum`` (per-token losses of a reference model)."""
    needs_eval: bool = False
    """Whether the controller learns from per-domain held-out losses: the glue evaluates when
    :meth:`eval_requested` says so and calls :meth:`observe_eval` (driver: :mod:`hfweight.glue.drivers.evaluations`)."""
    needs_target: bool = False
    """Whether the controller learns from the alignment of each domain's gradient with a target set's: the glue
    computes it when :meth:`gradients_requested` says so and calls :meth:`observe_gradients` (DGA; driver:
    :mod:`hfweight.glue.drivers.alignment`). Such a controller has a ``target`` (names of held-out sets) and a
    ``target_batch_size`` (None: the global training batch)."""

    def set_total_steps(self, n: int) -> None:
        """The number of optimizer steps of the run, told before the first step (schedules, warm-ups)."""

    def final_probabilities(self) -> torch.Tensor:
        """The mixture to report as the run's result (``mixture_weights.json``); by default the current one."""
        return self.probabilities()

    def eval_requested(self) -> bool:
        """With ``needs_eval``: whether the glue should evaluate the held-out sets now (checked at step boundaries)."""
        return False

    def gradients_requested(self) -> bool:
        """With ``needs_target``: whether the coming optimizer step should measure gradient alignment."""
        return False

    def observe_gradients(self, signal: torch.Tensor, step: int) -> None:
        """With ``needs_target``: the per-domain alignment signal ``(k,)`` (NaN for a domain absent from the step)."""

    def observe(self, stats: DomainStats) -> None:
        """Called once per optimizer step, on every rank, with the step's all-reduced per-domain statistics.

        Update the mixture here. Every rank receives identical numbers and must compute the identical update.
        """

    def observe_eval(self, losses: torch.Tensor, step: int) -> None:
        """Called with per-domain held-out losses ``(k,)`` (NaN for a domain without held-out rows)."""


@dataclass
class DomainStats:
    """Per-domain statistics of one optimizer step, already summed over all micro-batches and ranks."""

    loss_sum: torch.Tensor
    """Sum of token losses per domain ``(k,)``."""
    token_count: torch.Tensor
    """Number of valid tokens per domain ``(k,)``."""
    sample_count: torch.Tensor
    """Number of samples per domain ``(k,)``."""
    step: int = 0
    """Optimizer steps completed before this one."""
    excess_sum: torch.Tensor | None = None
    """Sum over tokens of ``max(ℓ_t − ℓ_ref,t, 0)`` per domain (DoReMi), when a reference is available."""
    ref_loss_sum: torch.Tensor | None = None
    """Sum over tokens of the reference model's loss ``ℓ_ref,t`` per domain, when a reference is available (DoReMi's
    domain-level excess ``max(mean ℓ − mean ℓ_ref, 0)``)."""

    @property
    def mean_loss(self) -> torch.Tensor:
        """Token-mean loss per domain; NaN for a domain absent from the step."""
        return torch.where(
            self.token_count > 0,
            self.loss_sum / self.token_count.clamp(min=1),
            torch.full_like(self.loss_sum, float("nan")),
        )


class RewardWeighting(Stateful):
    """Weights ``(K,)`` over the K reward functions of GRPO/RLOO, recomputed once per generation batch."""

    name: str = ""
    needs_validation: bool = False
    """Whether the weighter learns from per-reward scores on held-out prompts: the glue generates on ``eval_dataset``
    every ``reward_validation_steps`` and calls :meth:`observe_validation` (:mod:`hfweight.rl.validation`)."""
    needs_gram: bool = False
    """Whether the weighter learns from the Gram matrix of per-reward policy gradients: the glue computes it after
    each training generation batch and calls :meth:`update_from_gram` (:mod:`hfweight.rl.gram`)."""
    clip_norm: float | None = None
    """With ``needs_gram``: clip each reward's gradient to this norm before the Gram (None: no clipping)."""
    clip_scope: str = "model"
    """With ``needs_gram``: whose norm the clipping uses, every trainable parameter's (``"model"``) or the selected
    ones' (``"selected"``)."""

    def bind(self, reward_names: list[str], initial_weights: torch.Tensor) -> None:
        """Called once with the reward functions' names and the config's static ``reward_weights``."""
        self.reward_names = list(reward_names)
        self.initial_weights = initial_weights.double()

    def weights(self, rewards: torch.Tensor, step: int) -> torch.Tensor:
        """Weights for the rewards ``(N, K)`` of this generation batch (gathered over all ranks; NaN where a reward
        function returned None). Must be a pure function of its inputs and the object's state, so every rank agrees."""
        raise NotImplementedError

    def current_weights(self) -> torch.Tensor:
        """The weights in force (the last ones :meth:`weights` returned), float32 ``(K,)``."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """Scalars to log at the next logging step (``reward_weight/<name>``, multipliers, ...)."""
        return {}

    def observe_validation(self, scores: torch.Tensor, step: int) -> None:
        """With ``needs_validation``: NaN-robust per-reward means ``(K,)`` over the held-out prompts."""

    def update_from_gram(self, gram: torch.Tensor, step: int, lr: float | None = None) -> None:
        """With ``needs_gram``: the clipped ``(K, K)`` Gram of per-reward policy gradients, identical on every rank."""
