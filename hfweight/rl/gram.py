"""The gradient Gram, for a reward weighter that declares ``needs_gram`` (``gradient``, Lu et al. 2025): after a
training generation batch is scored, one backward per reward function of TRL's own policy loss with the advantages
of that reward alone (computed exactly as TRL computes the combined ones,
:func:`hfweight.rl.advantages.group_advantages`), gradients averaged over ranks, Gram ``S = GGᵀ``,
exponentiated-gradient update. Cost: K extra backward passes over the generation batch. The update applies from the
next generation batch (TRL has already formed this batch's advantages).

This module owns the parameter selection (``reward_gradient_parameters``), the per-reward advantages, each rank's
share of every reward's gradient under each engine, the full-model norms the clipping uses, and the update.
"""

from __future__ import annotations

import re

import torch
from trl.trainer.utils import split_tensor_dict

from ..gradalign import (
    complete_products,
    local_piece,
    partial_gram,
    register_sharded_parameters,
    snapshot_gradients,
)
from ..strategies.rewards import clip_gram
from .advantages import group_advantages

# A gradient share: per parameter, (this rank's piece, number of shards) — see hfweight.gradalign.
Share = list[tuple[torch.Tensor, int]]


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


def _local_zeros(param) -> torch.Tensor:
    """A zero gradient piece shaped like this rank's piece of ``param`` (a parameter that received no gradient)."""
    data = param.data
    return torch.zeros_like(data.to_local() if hasattr(data, "to_local") else data)


class RewardGram:
    """The Gram updates of one GRPO/RLOO trainer. The last Gram and this rank's per-reward gradients are kept on the
    trainer for inspection and tests (``_last_reward_gram`` ``(K, K)``, ``_last_reward_gradients``
    ``(K, numel of this rank's share)``)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.select_parameters()  # fail early on a pattern that matches nothing

    def select_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The trainable parameters the Gram is built over, looked up on the model as it is now: FSDP2 replaces the
        parameters with ``DTensor`` ones when the Trainer wraps the model at the start of ``train()``."""
        trainer = self.trainer
        pattern = trainer.args.reward_gradient_parameters
        model = trainer.accelerator.unwrap_model(trainer.model)
        named = list(model.named_parameters())
        chosen = [(n, p) for n, p in named if p.requires_grad and (pattern is None or re.search(pattern, n))]
        if not chosen:
            raise ValueError(
                f"`reward_gradient_parameters={pattern!r}` matches no trainable parameter; parameter names look like "
                f"{[n for n, _ in named[:3]]}."
            )
        return chosen

    def per_reward_advantages(self, rewards_per_func: torch.Tensor, index: int) -> torch.Tensor:
        """The advantages of reward ``index`` alone, formed as the parent forms its combined advantages."""
        one_hot = torch.zeros(rewards_per_func.shape[1])
        one_hot[index] = 1.0
        return group_advantages(rewards_per_func, one_hot, self.trainer.num_generations, **self._advantage_options())

    def _advantage_options(self) -> dict:
        trainer = self.trainer
        if trainer._algorithm == "grpo":
            return dict(
                algorithm="grpo", aggregation=trainer.multi_objective_aggregation, scale_rewards=trainer.scale_rewards
            )
        return dict(
            algorithm="rloo",
            normalize_advantages=trainer.normalize_advantages,
            reward_clip_range=trainer.reward_clip_range,
        )

    def update(self, output: dict, rewards: torch.Tensor) -> None:
        """One backward of the parent's policy loss per reward; Gram of the (rank-averaged) gradients; update.

        ``output`` is the parent's scored generation batch, ``rewards`` its gathered ``(N, K)`` rewards. The loss is
        the parent's own ``_compute_loss`` on this rank's generation batch, split into the same
        ``steps_per_generation`` chunks as training and summed: the gradient the trainer would accumulate with these
        advantages, averaged over ranks as the data-parallel wrapper averages it. Each rank keeps only its share of
        every reward's gradient (:meth:`gradient_shares`); the Gram is the sum of the ranks' partial products
        (:func:`hfweight.gradalign.partial_gram`) — one all-reduce of a ``(K, K)`` matrix, no gradient gathered —
        then clipped per reward (:func:`hfweight.strategies.rewards.clip_gram`) and handed to the weighter. The
        parent's loss metrics from these passes are discarded.

        Clipping (``clip_scope="model"``, the default): each reward's gradient is clipped by the norm of its
        rank-averaged gradient over *every* trainable parameter, as the authors clip the actor's full gradient
        (``verl/workers/actor/dp_actor.py``: ``clip_grad_norm_(actor_module.parameters(), max_norm=grad_clip)``) before
        keeping the ``reward_gradient_parameters`` subset for the Gram; the whole gradient is then computed (one
        reward at a time), not only the subset's. ``clip_scope="selected"`` clips by the subset's own norm.
        """
        trainer = self.trainer
        weighting = trainer.reward_weighting
        saved_metrics = {mode: {key: len(v) for key, v in m.items()} for mode, m in trainer._metrics.items()}
        shares, norms = self.gradient_shares(output, rewards)
        for mode, lengths in saved_metrics.items():  # drop what _compute_loss logged during these passes
            for key in list(trainer._metrics[mode]):
                del trainer._metrics[mode][key][lengths.get(key, 0) :]
        world = trainer.accelerator.num_processes
        partial, sharded = partial_gram(shares, world)
        gram = complete_products(partial, sharded, world, lambda t: trainer._all_reduce(t).cpu())
        trainer._last_reward_gradients = torch.stack(
            [torch.cat([piece.reshape(-1).float().cpu() for piece, _ in share]) for share in shares]
        )
        trainer._last_reward_gram = gram
        gram = clip_gram(gram, weighting.clip_norm, norms)
        lr = trainer._get_learning_rate() if trainer.lr_scheduler is not None else None
        weighting.update_from_gram(gram, trainer.state.global_step, lr=lr)
        for key, value in weighting.metrics().items():
            if key.startswith("gradient_influence/"):
                trainer._record(key, value)

    def gradient_shares(self, output: dict, rewards: torch.Tensor) -> tuple[list[Share], torch.Tensor | None]:
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
        trainer = self.trainer
        start = trainer.accelerator.process_index * output["advantages"].shape[0]
        local = slice(start, start + output["advantages"].shape[0])
        fsdp = getattr(trainer, "is_fsdp_enabled", False)
        model = trainer.model_wrapped if fsdp else trainer.accelerator.unwrap_model(trainer.model)
        if fsdp:
            register_sharded_parameters(model)
        params = [p for _, p in self.select_parameters()]
        trainable = [p for p in model.parameters() if p.requires_grad]
        weighting = trainer.reward_weighting
        whole_model = weighting.clip_norm is not None and weighting.clip_scope == "model"
        saved = [p.grad for p in trainable] if fsdp else None
        world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        shares, norms = [], []
        try:
            for index in range(rewards.shape[1]):
                advantages = self.per_reward_advantages(rewards, index)[local].to(output["advantages"].device)
                chunks = split_tensor_dict(dict(output, advantages=advantages), trainer.args.steps_per_generation)
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
        world = self.trainer.accelerator.num_processes
        squares = torch.zeros((), dtype=torch.float64)
        for snapshot in snapshot_gradients(trainable):
            if snapshot is not None:
                piece, shards = snapshot
                squares += piece.double().pow(2).sum().cpu() * shards / world
        return self.trainer._all_reduce(squares).cpu().sqrt()

    def _backward_shards(self, model, chunks, trainable, params) -> Share:
        """FSDP: the summed chunk losses backpropagated into ``.grad``; snapshots of the local gradient shards."""
        for p in trainable:
            p.grad = None
        for chunk in chunks:
            self.trainer._compute_loss(model, chunk).backward()
        register_sharded_parameters(model)
        snapshots = snapshot_gradients(params)
        return [s if s is not None else (_local_zeros(p), local_piece(p.data)[1]) for s, p in zip(snapshots, params)]

    def _averaged_gradient(self, model, chunks, params) -> torch.Tensor:
        """The summed chunk losses' gradient w.r.t. ``params`` (flat, float32), averaged over ranks (as DDP averages
        the policy gradient)."""
        total = None
        for chunk in chunks:
            grads = torch.autograd.grad(self.trainer._compute_loss(model, chunk), params, allow_unused=True)
            flat = torch.cat(
                [(g if g is not None else p.new_zeros(_full_shape(p))).reshape(-1).float() for g, p in zip(grads, params)]
            )
            total = flat if total is None else total.add_(flat)
        return self.trainer._all_reduce(total).div_(self.trainer.accelerator.num_processes)
