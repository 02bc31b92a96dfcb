"""2-rank mixture checks (torchrun --nproc_per_node 2 tests/scripts/mixture_worker.py OUT_PREFIX): every rank writes
OUT_PREFIX.rank{r}.json with a resample run, a DGA alignment, the per-domain statistics DoReMi
received with this rank's share of them recomputed by hand, and sharded inner products vs the full ones."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import leave_process_group  # noqa: E402
from helpers_mixture import dga_alignment, domain_stats_run, resample_run  # noqa: E402

from hfweight.gradalign import complete_products, partial_products, snapshot_gradients  # noqa: E402


class _Param:
    def __init__(self, grad):
        self.grad = grad


def sharded_products() -> dict:
    """⟨a, b⟩ and ‖a‖² from a mix of Shard(0) DTensors, a Replicate DTensor and a plain (DDP-style) replica, against
    the same numbers computed on the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    full_a = [torch.randn(6, 3, generator=g), torch.randn(4, generator=g), torch.randn(5, 2, generator=g)]
    full_b = [torch.randn(6, 3, generator=g), torch.randn(4, generator=g), torch.randn(5, 2, generator=g)]

    def pieces(full):
        return [distribute_tensor(full[0], mesh, [Shard(0)]), distribute_tensor(full[1], mesh, [Replicate()]), full[2]]

    params = [_Param(t) for t in pieces(full_a)]
    target = snapshot_gradients([_Param(t) for t in pieces(full_b)])
    partial, sharded = partial_products(params, [target], dist.get_world_size())
    reduced = complete_products(partial, sharded, dist.get_world_size(), lambda t: (dist.all_reduce(t), t)[1])
    expected = [sum(float((a * b).sum()) for a, b in zip(full_a, full_b)), sum(float((a * a).sum()) for a in full_a)]
    return {"got": reduced.tolist(), "expected": expected, "sharded": sharded}


def main():
    prefix = sys.argv[1]
    out = {"resample": resample_run(2, 2, mixture="doremi", kwargs={}), "dga": dga_alignment(2, 1),
           "learning_progress": resample_run(2, 2, steps=6, mixture="learning_progress", kwargs={"eta": 1.0, "ema": 0.5})}
    out["sharded"] = sharded_products()
    out["domain_stats"] = domain_stats_run(2, 2, steps=2)
    with open(f"{prefix}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    leave_process_group()
