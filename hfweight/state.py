"""Checkpoints: the weighting state inside each Trainer checkpoint, and which checkpoint a run resumes from.

Each process writes its own state file because a few strategies hold per-rank state (STORM's meta batch); strategies
whose state is identical on every rank simply write the same content W times, which is small. Writes are atomic
(temporary file + rename), so an interrupted save never leaves a truncated state file next to a valid model.

Every state file carries a small *fingerprint* of the configuration that wrote it (the class of each stateful part,
the domains, the mixture mode, the reward functions, the world size). Resuming checks it and refuses, naming the file
and each difference, a checkpoint that is missing, unreadable or from another configuration: a resumed run either
continues the strategies' state exactly or stops — it never restarts them silently.

Trainer writes ``trainer_state.json`` last in every checkpoint (after model, optimizer, scheduler, RNG and our state
files), so a checkpoint without it, or without a rank's state file, was cut short (e.g. a SIGKILL during the save).
:func:`resolve_resume_checkpoint` skips such checkpoints, with a warning, when it looks for the latest one.
"""

from __future__ import annotations

import json
import os
import re
import warnings

import torch

STATE_FILE = "hfweight_state.pt"
STATE_VERSION = 2
TRAINER_STATE_FILE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, the last file of a checkpoint
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + "-<step>"
TRUE_VALUES, FALSE_VALUES = ("true",), ("", "false", "none")  # what --resume_from_checkpoint may say


class CheckpointNotFoundError(FileNotFoundError, ValueError):
    """No checkpoint to resume from. A ValueError, as the parent ``Trainer.train`` raises, and its message starts with
    the parent's (:data:`NO_CHECKPOINT_IN_DIR`, :data:`NO_CHECKPOINT_AT`) before our detail, so code and tests
    written for the parent (transformers' own trainer tests included) catch and match it unchanged."""


# transformers.Trainer.train's messages for the two cases (resume_from_checkpoint=True with none in output_dir; a path
# that holds no checkpoint): ours start with them.
NO_CHECKPOINT_IN_DIR = "No valid checkpoint found in output directory ({output_dir})"
NO_CHECKPOINT_AT = "Can't find a valid checkpoint at {checkpoint}"


def state_file(checkpoint_dir: str, process_index: int) -> str:
    name = STATE_FILE if process_index == 0 else STATE_FILE.replace(".pt", f"_rank{process_index}.pt")
    return os.path.join(checkpoint_dir, name)


def _class_name(obj) -> str:
    """``module.Class`` of a stateful part; a class renamed by a refactor sets ``state_class`` to the name earlier
    checkpoints recorded, so they still resume."""
    cls = type(obj)
    return f"{cls.__module__}.{getattr(cls, 'state_class', cls.__qualname__)}"


def fingerprint(objects: dict, **facts) -> dict:
    """What must match between the run that saved a state and the run that loads it: the class of each stateful part
    (a different strategy under the same name would load foreign state) and ``facts`` (domains, mixture mode, ...)."""
    parts = {name: _class_name(obj) for name, obj in objects.items() if obj is not None}
    return {"parts": parts, **facts}


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """``["key: saved X, this run Y", ...]`` for every entry that differs (parts compared one by one)."""
    differences = []
    saved_parts, current_parts = saved.get("parts", {}), current.get("parts", {})
    for name in sorted(set(saved_parts) | set(current_parts)):
        was, now = saved_parts.get(name, "absent"), current_parts.get(name, "absent")
        # Classes compare by name: a class that moved to another module (a refactor) still loads its own state.
        if was.rsplit(".", 1)[-1] != now.rsplit(".", 1)[-1]:
            differences.append(f"{name}: saved {was}, this run {now}")
    for key in sorted((set(saved) | set(current)) - {"parts"}):
        if saved.get(key) != current.get(key):
            differences.append(f"{key}: saved {saved.get(key)!r}, this run {current.get(key)!r}")
    return differences


def save_state(checkpoint_dir: str, objects: dict, facts: dict, process_index: int, world_size: int) -> str:
    """Write ``{name: obj.state_dict()}`` with the configuration's fingerprint for this process; return the path."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    payload = {
        "version": STATE_VERSION,
        "world_size": world_size,
        "fingerprint": fingerprint(objects, **facts),
        "per_rank": sorted(name for name, obj in objects.items() if getattr(obj, "per_rank_state", False)),
        "objects": {name: obj.state_dict() for name, obj in objects.items() if obj is not None},
    }
    path = state_file(checkpoint_dir, process_index)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_state(path: str) -> dict:
    """The payload of a state file, or a ValueError naming the file when it cannot be read (truncated, corrupt)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated zip/pickle raises RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the file is truncated or corrupt. Resume from an "
            "earlier checkpoint."
        ) from err
    if not isinstance(payload, dict) or "objects" not in payload:
        raise ValueError(f"{path} is not an hfweight state file (no 'objects' entry).")
    return payload


def load_state(checkpoint_dir: str, objects: dict, facts: dict, process_index: int, world_size: int) -> None:
    """Restore each object from this process's state file in ``checkpoint_dir``.

    Raises ValueError naming the file when it is missing, unreadable, or was written by another configuration
    (different strategies, domains, mixture mode or reward functions; a different world size when a part holds
    per-rank state). With a different world size and no per-rank state, every process loads rank 0's file.
    """
    own, first = state_file(checkpoint_dir, process_index), state_file(checkpoint_dir, 0)
    if not os.path.exists(first):
        parts = sorted(name for name, obj in objects.items() if obj is not None)
        raise ValueError(
            f"{first} is missing: {checkpoint_dir} holds no weighting state, so the state of {parts} cannot be "
            "restored. The checkpoint was written with weighting off or its save was interrupted. Resume from a "
            "checkpoint written by this configuration, or start a new run from its model (model_name_or_path)."
        )
    payload = read_state(first)
    saved_world = int(payload.get("world_size", 1))
    if saved_world == world_size and own != first:
        if not os.path.exists(own):
            raise ValueError(
                f"{own} is missing: {checkpoint_dir} was written by {saved_world} processes but rank {process_index}'s "
                "state file is not there (its save was interrupted). Resume from an earlier checkpoint."
            )
        payload = read_state(own)
    if "fingerprint" in payload:  # version 1 files carry none; their parts are still checked below
        differences = fingerprint_differences(payload["fingerprint"], fingerprint(objects, **facts))
        if differences:
            raise ValueError(
                f"{first} was written by another weighting configuration: " + "; ".join(differences)
                + ". Resume with the configuration that wrote it (or start a new run from its model)."
            )
    per_rank = payload.get("per_rank", [])
    if saved_world != world_size and per_rank:
        raise ValueError(
            f"{first} was written by {saved_world} processes and this run has {world_size}; the state of {per_rank} "
            f"is per rank and cannot be split or merged. Resume with {saved_world} processes."
        )
    saved = payload["objects"]
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in saved:
            raise ValueError(
                f"{first} has no saved state for {name!r} (it has {sorted(saved)}); the run was saved with a different "
                "weighting configuration. Resume with the original configuration."
            )
        try:
            obj.load_state_dict(saved[name])
        except Exception as err:
            raise ValueError(f"{first}: the saved state of {name!r} does not fit this run: {err}") from err


# ---- which checkpoint to resume from ------------------------------------------------------------------------------


def checkpoint_problem(checkpoint_dir: str) -> str | None:
    """Why ``checkpoint_dir`` is not a complete checkpoint (its save was cut short), or None when it is complete."""
    trainer_state = os.path.join(checkpoint_dir, TRAINER_STATE_FILE)
    if not os.path.exists(trainer_state):
        return f"no {TRAINER_STATE_FILE} (Trainer writes it last; the save was interrupted)"
    try:
        with open(trainer_state) as f:
            json.load(f)
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE_FILE} is unreadable ({err})"
    first = state_file(checkpoint_dir, 0)
    if os.path.exists(first):
        try:
            world_size = int(read_state(first).get("world_size", 1))
        except ValueError as err:
            return str(err)
        rank_files = [state_file(checkpoint_dir, rank) for rank in range(1, world_size)]
        missing = [os.path.basename(path) for path in rank_files if not os.path.exists(path)]
        if missing:
            return f"{missing} missing (written by {world_size} processes; a rank's save was interrupted)"
    return None


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The ``checkpoint-<step>`` directory of ``output_dir`` with the highest step that is complete; each newer,
    incomplete one is skipped with a warning saying why."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        ((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_DIR.match(name))
         and os.path.isdir(os.path.join(output_dir, name))),
        reverse=True,
    )
    for _, name in steps:
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        warnings.warn(f"Skipping the incomplete checkpoint {path}: {problem}.", stacklevel=2)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint directory a run resumes from, checked before any training starts (``None``: a fresh start).

    ``resume_from_checkpoint`` is what ``--resume_from_checkpoint`` or ``Trainer.train`` received: ``None``/``False``/
    ``"false"`` → a fresh start; ``True``/``"true"`` → the latest complete ``checkpoint-<step>`` in ``output_dir``
    (as transformers' example scripts do with ``get_last_checkpoint``, but skipping checkpoints whose save was cut
    short), an error if there is none; a path → that directory, an error if it does not exist or is incomplete.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    text = str(resume_from_checkpoint).strip()
    if resume_from_checkpoint is True or text.lower() in TRUE_VALUES:
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise CheckpointNotFoundError(
                NO_CHECKPOINT_IN_DIR.format(output_dir=output_dir)
                + f": resume_from_checkpoint={resume_from_checkpoint!r} but output_dir holds no complete "
                "checkpoint-<step> directory to resume from. Pass a checkpoint path, or drop the flag to start fresh."
            )
        return checkpoint
    if text.lower() in FALSE_VALUES:
        return None
    if not os.path.isdir(text):
        raise CheckpointNotFoundError(
            NO_CHECKPOINT_AT.format(checkpoint=text) + f": resume_from_checkpoint={text!r}: no such directory. Pass an existing checkpoint-<step> directory, or "
            "'true' for the latest checkpoint in output_dir."
        )
    problem = checkpoint_problem(text)
    if problem is not None:
        raise ValueError(
            f"resume_from_checkpoint={text!r} is not a complete checkpoint: {problem}. Resume from an earlier "
            "checkpoint, or pass 'true' for the latest complete one."
        )
    return text
