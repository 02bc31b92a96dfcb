"""Checkpointing of every stateful strategy: one file per process inside each Trainer checkpoint.

Each process writes its own file because a few strategies may hold per-rank state (a sampler position, a local
buffer); strategies whose state is identical on every rank simply write the same content W times, which is small.
Writes are atomic (temporary file + rename), so an interrupted save never leaves a truncated state next to a valid
model checkpoint.
"""

from __future__ import annotations

import os
import warnings

import torch

STATE_FILE = "hfweight_state.pt"
STATE_VERSION = 1


def state_file(checkpoint_dir: str, process_index: int) -> str:
    name = STATE_FILE if process_index == 0 else STATE_FILE.replace(".pt", f"_rank{process_index}.pt")
    return os.path.join(checkpoint_dir, name)


def save_state(checkpoint_dir: str, objects: dict, extra: dict, process_index: int, world_size: int) -> str:
    """Write ``{name: obj.state_dict()}`` plus ``extra`` for this process; return the path written."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    payload = {
        "version": STATE_VERSION,
        "world_size": world_size,
        "objects": {name: obj.state_dict() for name, obj in objects.items() if obj is not None},
        "extra": extra,
    }
    path = state_file(checkpoint_dir, process_index)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_state(checkpoint_dir: str, objects: dict, process_index: int) -> dict | None:
    """Restore each object from this process's file (falling back to rank 0's when the world size changed).

    Returns the saved ``extra`` dict, or None when the checkpoint carries no hfweight state (it was written by a
    plain Trainer): the strategies then keep their fresh state, with a warning.
    """
    path = state_file(checkpoint_dir, process_index)
    if not os.path.exists(path):
        fallback = state_file(checkpoint_dir, 0)
        if not os.path.exists(fallback):
            if any(obj is not None and obj.state_dict() for obj in objects.values()):
                warnings.warn(
                    f"{checkpoint_dir} has no {STATE_FILE}; the weighting strategies start from a fresh state.",
                    stacklevel=2,
                )
            return None
        warnings.warn(
            f"{path} not found (the run was saved with a different number of processes); loading rank 0's state.",
            stacklevel=2,
        )
        path = fallback
    payload = torch.load(path, map_location="cpu", weights_only=False)
    saved = payload.get("objects", {})
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in saved:
            raise ValueError(
                f"The checkpoint {checkpoint_dir} has no saved state for {name!r} (it has {sorted(saved)}); the run was "
                "saved with a different weighting configuration. Resume with the original configuration."
            )
        obj.load_state_dict(saved[name])
    return payload.get("extra", {})
