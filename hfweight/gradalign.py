"""Inner products of gradients that stay exact when parameters are sharded (DGA's signal, docs/methods.md#dga).

After a backward through the data-parallel wrapper each rank holds the *reduced* gradient — in full (single process,
DDP: replicated on every rank) or as its shard (FSDP2: a ``DTensor`` whose local piece is this rank's shard). The
inner product ``⟨a, b⟩ = Σ_params Σ_entries a·b`` is therefore a sum of per-rank partial sums over the shards — but a
replicated parameter's full contribution is present on *every* rank, so a plain all-reduce would count it W times.

Every piece is weighted by ``(number of distinct shards of it) / world size``: a replicated tensor by ``1/W``, a
tensor split over all ``W`` ranks by 1, a ``DTensor`` sharded over some mesh dimensions and replicated over the others
(HSDP) by ``Π shard sizes / W``. The weighted partial sums of every rank then add up, with one all-reduce of a short
vector, to the exact inner products — no gradient is ever gathered. Without any sharded piece (single process, DDP)
the local sums are already complete and no collective is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_F64 = torch.float64


def local_piece(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(this rank's piece of the gradient, number of distinct shards of it)``.

    A ``DTensor`` contributes its local shard; its shard count is the product of the mesh sizes of the dimensions it
    is ``Shard``-ed over (1 when every placement is ``Replicate``). A plain tensor is a full replica (1 shard).
    """
    to_local = getattr(grad, "to_local", None)
    if to_local is None:
        return grad, 1
    shards = 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_shard():
            shards *= grad.device_mesh.size(dim)
    return to_local(), shards


def snapshot_gradients(params: Sequence[torch.nn.Parameter]) -> list[tuple[torch.Tensor, int] | None]:
    """Detached copies of the local gradient pieces (None where a parameter has no gradient)."""
    out = []
    for p in params:
        if p.grad is None:
            out.append(None)
        else:
            piece, shards = local_piece(p.grad)
            out.append((piece.detach().clone(), shards))
    return out


def partial_products(
    params: Sequence[torch.nn.Parameter], others: Sequence[Sequence[tuple[torch.Tensor, int] | None]], world_size: int
) -> tuple[torch.Tensor, bool]:
    """Weighted local partial sums ``[⟨g, o_1⟩, …, ⟨g, o_m⟩, ‖g‖²]`` (float64) of the current gradients ``g`` of
    ``params`` against the snapshots ``others``, and whether any piece was sharded (then the sums must be all-reduced
    over the ``world_size`` ranks; see the module docstring for the weights)."""
    sums = torch.zeros(len(others) + 1, dtype=_F64)
    sharded = False
    for index, p in enumerate(params):
        if p.grad is None:
            continue
        piece, shards = local_piece(p.grad)
        sharded = sharded or shards > 1
        flat = piece.detach().reshape(-1).to(_F64)
        weight = shards / world_size
        for j, other in enumerate(others):
            if other[index] is not None:
                sums[j] += weight * torch.dot(flat, other[index][0].reshape(-1).to(_F64)).cpu()
        sums[-1] += weight * torch.dot(flat, flat).cpu()
    return sums, sharded


def partial_gram(pieces: Sequence[Sequence[tuple[torch.Tensor, int] | None]], world_size: int) -> tuple[torch.Tensor, bool]:
    """Weighted local partial sums of the Gram ``S_kj = ⟨g_k, g_j⟩`` (float64 ``(K, K)``) of ``K`` gradients, each
    given as one snapshot per parameter (:func:`snapshot_gradients`: ``(local piece, number of shards)`` or None), and
    whether any piece was sharded; complete it with :func:`complete_products` (weights as in the module docstring)."""
    k = len(pieces)
    sums = torch.zeros(k, k, dtype=_F64)
    sharded = False
    for index in range(len(pieces[0]) if k else 0):
        column = [p[index] for p in pieces]
        present = [c for c in column if c is not None]
        if not present:
            continue
        shards = present[0][1]
        sharded = sharded or shards > 1
        flat = torch.stack([
            (c[0].detach().reshape(-1).to(_F64) if c is not None else torch.zeros(present[0][0].numel(), dtype=_F64,
                                                                              device=present[0][0].device))
            for c in column
        ])
        sums += (shards / world_size) * (flat @ flat.T).cpu()
    return sums, sharded


def complete_products(
    partial: torch.Tensor, sharded: bool, world_size: int, all_reduce: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The exact products from every rank's weighted partial sums: one all-reduce (sum) when any piece is sharded;
    otherwise each rank's sums are already complete (undo the ``1/W`` weight instead of adding W equal copies)."""
    if sharded and world_size > 1:
        return all_reduce(partial.clone())
    return partial * world_size


def register_sharded_parameters(model: torch.nn.Module) -> None:
    """Put every FSDP2 module back in its sharded state. The root module keeps its parameters unsharded after its
    forward/backward (they are needed again right away), and while it does, ``named_parameters()`` returns the
    temporary unsharded tensors — whose ``.grad`` is not the gradient the optimizer steps on. Resharding registers the
    ``DTensor`` parameters again, so ``.grad`` can be read, set aside and cleared on the real ones."""
    for module in model.modules():
        reshard = getattr(module, "reshard", None)
        if reshard is not None and type(module).__name__.startswith("FSDP"):
            reshard()
