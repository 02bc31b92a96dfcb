"""STORM-like self-taught on-the-fly meta loss rescaling — after Heck et al., "Learning from Noisy Labels via
Self-Taught On-the-Fly Meta Loss Rescaling", AAAI 2025 (docs/methods.md#storm).

A rescaler ``Ω_ω`` (a small MLP on standardized per-sample features) gives ``v_i = Ω(F_i) / mean Ω(F)``; ω is
meta-learned through a first-order one-step look-ahead on the previous training batch, plus ``kl_weight ·
KL(v̂ ‖ uniform)``. Defaults: ``hidden`` 16, ``meta_lr`` 1e-3, ``meta_every`` 1, ``feature_momentum`` 0.99,
``kl_weight`` 1.0. The authors' code was not readable here: the features, Ω and the normalizations are this
library's choices (see :class:`MetaRescaler`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...registry import register_sample_weighting
from ..base import SampleContext, SampleWeighting
from ..checks import in_range, integer, number
from .base import arg, check_mode, finish_weights, global_losses

STORM_FEATURES = ("loss", "entropy", "loss_change")
"""Columns of :func:`sample_features`."""


def sample_features(
    losses: torch.Tensor, entropies: torch.Tensor | None = None, prev_losses: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw per-sample rescaler features ``(N, 3)``: ``[ℓ_i, H_i, ℓ_i − b_i]``.

    - ``ℓ_i``: the sample's mean token loss;
    - ``H_i``: the mean entropy of the model's predictive distribution over the sample's valid tokens (a confidence
      signal that does not need the label); NaN column when ``entropies`` is None;
    - ``ℓ_i − b_i``: the loss relative to a baseline ``b_i`` (``prev_losses``), e.g. the running mean loss of the
      sample's domain before this step (what :class:`MetaRescaler` passes): positive for a sample harder than its
      domain currently is; NaN column when ``prev_losses`` is None.

    Heck et al. build their features from the model's own predictions and losses over ``G`` forward passes; their
    feature list is not verified here (docs/methods.md#storm), and these single-pass features are this library's
    choice. Non-finite inputs stay non-finite (NaN/inf) so the caller can mask them; float32.
    """
    loss = torch.as_tensor(losses).detach().to(torch.float32).flatten()
    nan = torch.full_like(loss, float("nan"))
    ent = nan if entropies is None else torch.as_tensor(entropies).detach().to(loss).flatten()
    if prev_losses is None:
        change = nan
    else:
        change = loss - torch.as_tensor(prev_losses).detach().to(loss).flatten()
    return torch.stack([loss, ent, change], dim=1)


class RescalerNet(nn.Module):
    """``Ω_ω``: a tiny MLP from standardized features ``(N, F)`` to a positive scale per sample ``(N,)``.

    ``Linear(F, hidden) → tanh → Linear(hidden, 1) → softplus``. The last layer starts at weight 0 and bias
    ``log(e − 1)``, so every output is exactly ``softplus(log(e − 1)) = 1`` at initialization: training starts
    unweighted and departs from it only as far as the meta objective pushes. The first layer is initialized from a
    private generator seeded with ``seed`` (identical on every rank, and the global RNG is not consumed).
    """

    def __init__(self, num_features: int = len(STORM_FEATURES), hidden: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.hidden = nn.Linear(num_features, hidden)
            self.out = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.fill_(math.log(math.e - 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.out(torch.tanh(self.hidden(features)))).squeeze(-1)


def meta_objective(scales: torch.Tensor, per_sample_losses_after_lookahead: torch.Tensor) -> torch.Tensor:
    """STORM's self-taught meta loss on a meta batch drawn from the training data itself::

        L_meta = Σ_j s_j ℓ_j(θ') / Σ_j s_j          s_j = Ω_ω(F_j),  θ' = θ − η ∇_θ L_train(θ; ω)

    Both arguments may carry gradients to ω: through ``scales`` (the "outer" term of Heck et al.'s Algorithm 1: the
    meta batch is itself rescaled, which is how the method needs no clean validation set) and through the losses at
    the look-ahead parameters θ'(ω) (the "meta" term). Normalizing by ``Σ s`` makes the objective invariant to a global
    scale of Ω (otherwise the outer term would simply shrink every scale). Samples with a non-finite loss are left out;
    returns 0 (still connected to ``scales``) when none is left.
    """
    losses = per_sample_losses_after_lookahead.flatten()
    s = scales.flatten()
    valid = torch.isfinite(losses.detach())
    if not bool(valid.any()):
        return (s * 0.0).sum()
    s, losses = s[valid], losses[valid].to(s.dtype)
    return (s * losses).sum() / s.sum().clamp(min=1e-12)


def lookahead_surrogate(
    train_scales: torch.Tensor,
    directional_derivatives: torch.Tensor,
    lookahead_lr: float,
    static: torch.Tensor | None = None,
    denominators: torch.Tensor | None = None,
) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ω is the meta gradient through the one-step look-ahead, obtained without
    differentiating through the model (no ``create_graph``, no Hessian)::

        S(ω) = −η Σ_i c_i s_i(ω) d_i / Σ_k c_k s_k(ω) D_k,      d_i = ⟨∇_θ N_i(θ), g_val⟩  (detached)

    for a training step whose loss is ``L_train = Σ_i c_i s_i N_i(θ) / Σ_k c_k s_k D_k``
    (docs/methods.md#normalization): ``N_i`` the sample's numerator (its token-loss sum in token normalization, its
    mean token loss in sample normalization), ``D_i`` its share of the denominator (its token count, or 1), ``c_i`` the
    static part of its weight (``static``: the ``sample_weight`` column × domain factor; default 1), and ``g_val = ∇_θ
    L_meta(θ')`` the gradient of :func:`meta_objective` at the look-ahead ``θ' = θ − η ∇_θ L_train``. Then
    ``∂S/∂s_k = −η c_k (d_k − D_k d̄) / Z = ∂L_meta(θ'(ω))/∂s_k`` exactly (``Z = Σ c s D``, ``d̄ = Σ c s d / Z =
    ⟨∇L_train, g_val⟩``): θ' is linear in the normalized weights at fixed θ, so ``∂θ'/∂s_k = −η c_k (∇N_k − D_k
    ∇L_train) / Z`` involves no second derivative of the model (the tests check it against the second-order graph,
    on a regression model here and on the tiny Llama through the trainer). With ``static`` and ``denominators``
    ``None`` this is ``−η Σ_i (s_i / Σ s) d_i``. The ``d_i`` for all samples at once come from two extra forwards by
    central differences, ``d_i ≈ (N_i(θ + δ g_val) − N_i(θ − δ g_val)) / (2δ)``: the only approximation.
    Non-finite ``d_i`` (samples without a valid token) are left out. The derivation is the first-order form of the
    Meta-Weight-Net / learning-to-reweight look-ahead gradient that Heck et al. (AAAI 2025) build STORM on.
    """
    d = directional_derivatives.detach().flatten().to(train_scales.dtype)
    s = train_scales.flatten()
    c = torch.ones_like(d) if static is None else static.detach().flatten().to(d)
    den = torch.ones_like(d) if denominators is None else denominators.detach().flatten().to(d)
    valid = torch.isfinite(d) & torch.isfinite(c) & torch.isfinite(den)
    if not bool(valid.any()):
        return (s * 0.0).sum()
    s, d, c, den = s[valid], d[valid], c[valid], den[valid]
    return -float(lookahead_lr) * (c * s * d).sum() / (c * s * den).sum().clamp(min=1e-12)


def scales_kl_to_uniform(scales: torch.Tensor) -> torch.Tensor:
    """``KL(v̂ ‖ uniform) = Σ_i v̂_i log(N v̂_i)`` with ``v̂ = s / Σ s`` over the finite scales (0 when all are equal),
    differentiable w.r.t. the scales. :class:`MetaRescaler`'s regularizer (``kl_weight``): the same entropy term as
    Sow et al.'s ``r·KL(v ‖ uniform)`` (their weights solve ``max_v Σ v f − r KL``). Not in Heck et al.'s description:
    it is this library's guard against the collapse measured without it (see :class:`MetaRescaler`)."""
    s = scales.flatten()
    valid = torch.isfinite(s.detach())
    if int(valid.sum()) < 2:
        return (s * 0.0).sum()
    s = s[valid]
    v = s / s.sum().clamp(min=1e-12)
    return (v * torch.log((v * v.numel()).clamp(min=1e-12))).sum()


@register_sample_weighting("storm")
class MetaRescaler(SampleWeighting):
    """STORM-like self-taught on-the-fly meta loss rescaling — after Heck et al., "Learning from Noisy Labels via
    Self-Taught On-the-Fly Meta Loss Rescaling", AAAI 2025 (docs/methods.md#storm). The authors' code (university
    GitLab) was not readable here: the features, the architecture of Ω and the normalizations below are this library's
    choices and are documented as such; only the scheme (a rescaler fed with the model's own signals, meta-learned
    through a one-step look-ahead on batches drawn from the noisy training data, the meta batch itself rescaled)
    follows the paper.

    This class holds Ω (:attr:`rescaler`, a :class:`RescalerNet`), its optimizer (:attr:`meta_optimizer`, Adam) and the
    running feature statistics. :meth:`weights` is a no-grad forward: ``v_i = Ω(F_i) / mean_j Ω(F_j)`` over the
    samples with a finite loss (0 for the others), times the static ``sample_weight`` column if any.

    Features (:func:`sample_features`, standardized): the sample's loss; its mean token entropy, which nothing computes
    (it would need the full-vocabulary logits the fused path avoids), so that column is a constant 0: loss-only
    features, the column kept so that Ω's shape and checkpoints stay the same; and its loss minus the running mean loss
    of its domain before this step (``ctx.domains``; one global running mean when there are no domains).
    Standardization: ``(x − μ)/√(σ² + 1e-6)`` clamped
    to [−5, 5], with per-feature running mean/variance updated once per step as in BatchNorm (``μ ← m μ + (1 − m)
    batch mean``, same for the variance, ``m = feature_momentum``; the first batch initializes them). Non-finite
    features are set to 0 and left out of the statistics.

    Modes (:data:`SAMPLE_MODES`): ``"score"``: :meth:`weights` updates the statistics with the step's global batch,
    then weighs it (``v = Ω(F)/mean Ω(F)``). ``"rescale"`` (default through ``"auto"``): :meth:`local_weights` gives
    ``u_i = Ω(F_i)`` per micro-batch from the statistics *before* the step (a domain never seen before gets a 0
    loss-change feature), the glue divides by the global ``Σ u``, and :meth:`end_step` updates the statistics with the
    global batch. The first step has no statistics yet: every feature is 0 and the weights are uniform in both modes.

    Args:
        hidden: width of Ω's hidden layer (16).
        meta_lr: Adam learning rate of Ω (1e-3).
        meta_every: a meta step every this many optimizer steps (1); see :meth:`should_meta_step`.
        feature_momentum: ``m`` of the running feature statistics and of the per-domain loss baselines (0.99).
        seed: seed of Ω's initialization (0), the same on every rank.
        max_grad_norm: clip Ω's gradient to this norm in :meth:`meta_update` (1.0; ``None`` for no clipping).
        kl_weight: ``λ`` of the regularizer ``λ · KL(v̂_B ‖ uniform)`` added to the meta objective
            (:func:`scales_kl_to_uniform` of the training batch's scales; 1.0; 0 for the plain objective). Why: the
            self-taught outer term ``∂/∂s_k Σ s ℓ / Σ s = (ℓ_k − L)/Σ s`` always moves weight towards the samples
            with the lowest loss — the right direction for noisy *labels* (the paper's setting), but in language-model
            pretraining the lowest losses are redundant text. On the built-in corpus (400 steps, ``meta_lr=1e-2``,
            ``benchmarks/results/sample_effectiveness_long_seed0*.md``) Ω moved the weight onto the repetitive domain:
            without the term ESS 1.9 of 16 samples and clean held-out loss +0.73 vs uniform; with ``kl_weight=1`` ESS
            5.7 of 16 and +0.61. The term bounds the collapse (the optimum of outer term + KL alone is
            ``v ∝ exp(−ℓ/λ)``), it does not change its direction: for pretraining data prefer ``loss``.
        mode: ``"auto"`` (default), ``"rescale"`` or ``"score"``; see above.

    The meta step (run by the glue's meta-step driver, declared by ``needs_meta_step``), every ``meta_every`` steps, after the step's last backward
    (and the rescale of its gradients) and before clipping and the model's ``optimizer.step()``; every per-sample
    tensor below is over the *global* batch (all-gathered), so every rank computes the same ω:

    1. Training batch B (this step): ``F_B`` = the features its weights were computed from (:meth:`step_features`),
       train scales ``s = Ω(F_B)`` *with* graph to ω. ``.grad`` holds ``g_train = ∇_θ Σ v̂_i ℓ_i`` (v̂ ∝ weights).
    2. Look-ahead ``θ' = θ − η g_train`` in place (η: the optimizer's current learning rate; an SGD look-ahead, as in
       Meta-Weight-Net, whatever the model's optimizer; θ is copied and restored exactly afterwards).
    3. Meta batch V = the **previous** step's batch (a batch of the noisy training data itself, independent of B,
       kept in memory and in the checkpoint) with the features ``F_V`` its own step used, so that ``s_V = Ω(F_V)`` is
       known before V's forward. At θ', micro-batch by micro-batch (memory as in training): forward, then backward of
       ``Σ_local s_V,j ℓ_j(θ') / Σ_global s_V``; the gradients are summed over ranks with one all-reduce: ``g_val =
       ∇_θ meta_objective(s_V, ℓ_V(θ'))``.
    4. Restore θ; two no-grad forwards of B at ``θ ± δ g_val`` (δ = 0.01 / ‖g_val‖, as DARTS) give
       ``d_i ≈ (ℓ_i(θ + δ g_val) − ℓ_i(θ − δ g_val)) / 2δ``; restore θ and ``.grad = g_train``; all-gather d and ℓ_V.
    5. ``self.meta_update(meta_objective(s_V, ℓ_V(θ')) + lookahead_surrogate(s, d, η) + λ KL(s/Σs ‖ uniform))``: the
       first term is the outer term (∇_ω through ``s_V``: the meta batch is itself rescaled, so no clean set is
       needed), the second the meta term (∇_ω through ``s``, exact for the look-ahead by :func:`lookahead_surrogate`),
       the third this library's regularizer (``kl_weight``).

    The first step (no V yet) has no meta step. What is differentiated: only ω; never the model twice. Cost per meta
    step: one forward + backward of V and two forwards of B, measured +1.8-2.5 training steps (mean CPU time per
    step vs static weights on the tiny benchmark: 3.0× with a meta step every step, 1.6× with ``meta_every=4``, see
    ``benchmarks/results/overhead_sample_weighting.md``; amortize with ``meta_every``); memory: parameter-sized copies of θ,
    ``g_train`` and ``g_val``; nothing second-order. The textbook alternative — θ' built with ``create_graph=True``
    and one ``backward`` of ``meta_objective(s_V, ℓ_V(θ'(ω)))`` — gives the same gradient (up to the finite
    difference) but needs double backward through the model (not available with fused/flash kernels, FSDP or ZeRO-3)
    and about 3× the memory. The meta step needs the gradients in ``param.grad``: single process, DDP or FSDP2 (every
    update is elementwise, so it runs on each rank's shards; only ‖g_val‖ takes the shards' partial sums and one
    all-reduce). DeepSpeed is refused at setup: its engine keeps the gradients (partitioned under ZeRO-2/3).

    How this differs from the paper's description (Heck et al., AAAI 2025; their code was not readable here): the
    features are single-pass (loss, loss change vs. the domain's running mean; no entropy, no statistics over G
    forward passes); Ω is a 2-layer MLP with a softplus output started at exactly 1; the meta batch is the previous
    training batch rather than a separately drawn one; the look-ahead is first-order by finite differences rather than
    through a second-order graph; weights are normalized by their step-global sum (docs/methods.md#normalization).
    """

    needs_losses = True
    supports_rescale = True
    needs_meta_step = True
    """The glue runs the meta step below after each step's backward (every ``meta_every``)."""

    def __init__(
        self,
        hidden: int = 16,
        meta_lr: float = 1e-3,
        meta_every: int = 1,
        feature_momentum: float = 0.99,
        seed: int = 0,
        max_grad_norm: float | None = 1.0,
        kl_weight: float = 1.0,
        mode: str = "auto",
    ):
        self.mode = check_mode(mode, "storm")
        self.kl_weight = number(kl_weight, arg("storm", "kl_weight"), low=0)
        self.last_features: torch.Tensor | None = None  # score mode: the features :meth:`weights` last used
        self.hidden = integer(hidden, arg("storm", "hidden"), 1)
        self.meta_lr = number(meta_lr, arg("storm", "meta_lr"), low=0, low_open=True)
        self.meta_every = integer(meta_every, arg("storm", "meta_every"), 1)
        self.feature_momentum = in_range(feature_momentum, arg("storm", "feature_momentum"), 0, 1, high_open=True)
        self.seed = integer(seed, arg("storm", "seed"), 0)
        self.max_grad_norm = None
        if max_grad_norm is not None:
            self.max_grad_norm = number(max_grad_norm, arg("storm", "max_grad_norm"), low=0, low_open=True,
                                        finite=False, hint=" or None")
        self.num_features = len(STORM_FEATURES)
        self.rescaler = RescalerNet(self.num_features, self.hidden, self.seed)
        self.meta_optimizer = torch.optim.Adam(self.rescaler.parameters(), lr=self.meta_lr)
        self.feature_mean = torch.zeros(self.num_features, dtype=torch.float64)
        self.feature_var = torch.ones(self.num_features, dtype=torch.float64)
        self.feature_seen = torch.zeros(self.num_features, dtype=torch.bool)
        self.domain_loss = torch.zeros(0, dtype=torch.float64)  # running mean loss per domain index
        self.domain_seen = torch.zeros(0, dtype=torch.bool)
        self.meta_steps = 0

    # -- features ---------------------------------------------------------------------------------------------------

    def _baselines(
        self, losses: torch.Tensor, domains: torch.Tensor | None, update: bool, unseen_from_batch: bool = True
    ) -> torch.Tensor:
        """Running mean loss of each sample's domain before this batch (a domain seen for the first time: its mean in
        this batch, or NaN when not ``unseen_from_batch``); updates the running means when ``update``."""
        n = losses.numel()
        dom = torch.zeros(n, dtype=torch.long) if domains is None else domains.detach().to("cpu", torch.long).flatten()
        if dom.numel() != n:
            raise ValueError(f"sample_weighting='storm': {dom.numel()} domain indices for {n} losses.")
        size = max(int(dom.max()) + 1 if n else 0, self.domain_loss.numel())
        pad = size - self.domain_loss.numel()
        running = torch.cat([self.domain_loss, torch.zeros(pad, dtype=torch.float64)])
        seen = torch.cat([self.domain_seen, torch.zeros(pad, dtype=torch.bool)])
        valid = torch.isfinite(losses)
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, dom[valid], losses[valid])
        counts = torch.zeros(size, dtype=torch.float64).index_add_(0, dom[valid], torch.ones_like(losses[valid]))
        present = counts > 0
        batch_mean = torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums))
        unseen = batch_mean if unseen_from_batch else torch.full_like(batch_mean, float("nan"))
        baselines = torch.where(seen, running, unseen)[dom]
        if update:
            m = self.feature_momentum
            updated = torch.where(seen, m * running + (1 - m) * batch_mean, batch_mean)
            self.domain_loss = torch.where(present, updated, running)
            self.domain_seen = seen | present
        return baselines

    def features(self, ctx: SampleContext, update_stats: bool = False, state_only: bool = False) -> torch.Tensor:
        """Standardized features ``(N, 3)`` float32 of the samples in ``ctx`` (on the rescaler's device).

        With ``update_stats`` the running feature statistics and domain baselines are updated first, as
        :meth:`weights` does once per step; the meta step's extra calls leave them alone. With ``state_only`` (rescale
        mode) each row depends on the state and that sample alone (a domain not seen before gets a NaN baseline,
        hence a 0 feature), so any split of the batch gives the same rows.
        """
        losses = global_losses(ctx, "storm")
        baselines = self._baselines(losses, ctx.domains, update_stats, unseen_from_batch=not state_only)
        raw = sample_features(losses, None, baselines).to(torch.float64)
        finite = torch.isfinite(raw) & torch.isfinite(losses).unsqueeze(1)
        if update_stats:
            m = self.feature_momentum
            for j in range(self.num_features):
                col = raw[finite[:, j], j]
                if col.numel() == 0:
                    continue
                mean = col.mean()
                var = col.var(unbiased=False)
                if bool(self.feature_seen[j]):
                    self.feature_mean[j] = m * self.feature_mean[j] + (1 - m) * mean
                    self.feature_var[j] = m * self.feature_var[j] + (1 - m) * var
                else:
                    self.feature_mean[j], self.feature_var[j] = mean, var
                    self.feature_seen[j] = True
        z = (raw - self.feature_mean) / torch.sqrt(self.feature_var + 1e-6)
        z = torch.where(finite & self.feature_seen, z, torch.zeros_like(z)).clamp(-5.0, 5.0)
        return z.to(self._device(), torch.float32)

    def _device(self) -> torch.device:
        return next(self.rescaler.parameters()).device

    def scales(self, features: torch.Tensor) -> torch.Tensor:
        """``Ω_ω(F)`` with graph to ω (for the meta step); ``features`` from :meth:`features`."""
        return self.rescaler(features.to(self._device(), torch.float32))

    # -- weights ------------------------------------------------------------------------------------------------------

    def weights(self, ctx: SampleContext) -> torch.Tensor:
        """Score mode: update the statistics with the global batch, then ``v = Ω(F) / mean Ω(F)``."""
        feats = self.features(ctx, update_stats=True)
        self.last_features = feats.detach()
        with torch.no_grad():
            s = self.scales(feats).detach().to("cpu", torch.float64)
        valid = torch.isfinite(global_losses(ctx, "storm")) & torch.isfinite(s)
        out = torch.zeros_like(s)
        if bool(valid.any()):
            out[valid] = s[valid] / s[valid].mean().clamp(min=1e-12)
        return finish_weights(out, ctx)

    def local_weights(self, ctx: SampleContext) -> torch.Tensor:
        """Rescale mode: ``u_i = Ω(F_i)`` from the statistics before the step (unnormalized; any subset)."""
        feats = self.features(ctx, state_only=True)
        with torch.no_grad():
            s = self.scales(feats).detach().to("cpu", torch.float64)
        valid = torch.isfinite(global_losses(ctx, "storm")) & torch.isfinite(s)
        return finish_weights(torch.where(valid, s, torch.zeros_like(s)), ctx)

    def end_step(self, ctx: SampleContext) -> None:
        """Rescale mode: update the running statistics with the step's global batch."""
        self.features(ctx, update_stats=True)

    def step_features(self, ctx: SampleContext, mode: str) -> torch.Tensor:
        """The features the current step's weights were computed from (global batch ``ctx``): in score mode those of
        the last :meth:`weights` call, in rescale mode the state-only features (call it before :meth:`end_step`)."""
        if mode == "score":
            if self.last_features is None or self.last_features.shape[0] != global_losses(ctx, "storm").numel():
                raise RuntimeError("MetaRescaler.step_features: call weights(ctx) on this step's batch first.")
            return self.last_features
        return self.features(ctx, state_only=True)

    # -- meta step ----------------------------------------------------------------------------------------------------

    def should_meta_step(self, step: int) -> bool:
        """Whether the glue runs a meta step after ``step`` completed optimizer steps."""
        return step % self.meta_every == 0

    def meta_update(self, objective: torch.Tensor) -> float:
        """One Adam step of ω on ``objective`` (a scalar with graph to Ω's parameters, e.g.
        ``meta_objective(...) + lookahead_surrogate(...)``). Gradients are taken w.r.t. ω only
        (``torch.autograd.grad``), so the model's ``.grad`` is never touched. Returns the gradient norm before
        clipping. Inputs must be identical on every rank (global tensors) so that ω stays identical everywhere.
        """
        params = list(self.rescaler.parameters())
        grads = torch.autograd.grad(objective, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_steps += 1
        return float(norm)

    # -- state --------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "rescaler": {k: v.detach().clone() for k, v in self.rescaler.state_dict().items()},
            "meta_optimizer": copy.deepcopy(self.meta_optimizer.state_dict()),
            "feature_mean": self.feature_mean.clone(),
            "feature_var": self.feature_var.clone(),
            "feature_seen": self.feature_seen.clone(),
            "domain_loss": self.domain_loss.clone(),
            "domain_seen": self.domain_seen.clone(),
            "meta_steps": self.meta_steps,
            "config": {"hidden": self.hidden, "num_features": self.num_features},
        }

    def load_state_dict(self, state: dict) -> None:
        config = state.get("config", {})
        if config.get("hidden", self.hidden) != self.hidden:
            raise ValueError(
                f"sample_weighting='storm': the checkpoint's rescaler has `hidden={config['hidden']}` but this run has "
                f"`hidden={self.hidden}`; resume with the original value."
            )
        self.rescaler.load_state_dict(state["rescaler"])
        self.meta_optimizer.load_state_dict(copy.deepcopy(state["meta_optimizer"]))
        self.feature_mean = state["feature_mean"].detach().cpu().to(torch.float64).clone()
        self.feature_var = state["feature_var"].detach().cpu().to(torch.float64).clone()
        self.feature_seen = state["feature_seen"].detach().cpu().to(torch.bool).clone()
        self.domain_loss = state["domain_loss"].detach().cpu().to(torch.float64).clone()
        self.domain_seen = state["domain_seen"].detach().cpu().to(torch.bool).clone()
        self.meta_steps = int(state["meta_steps"])
