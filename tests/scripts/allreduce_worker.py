"""All-reduce one tensor across the launched processes and print what each rank saw.

Usage: accelerate launch --config_file accelerate_configs/ddp_cpu.yaml tests/scripts/allreduce_worker.py

The distributed state is created the way the trainers create it, through ``TrainingArguments(use_cpu=True)`` (the
``--use_cpu true`` that ddp_cpu.yaml asks for), so the test checks the path a real CPU run takes.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from helpers import leave_process_group  # noqa: E402
from transformers import TrainingArguments  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, use_cpu=True, report_to=[])
    value = torch.tensor([float(args.process_index + 1)])
    if dist.is_initialized():
        dist.all_reduce(value)
        backend = dist.get_backend()
    else:
        backend = "none"
    # One write per line: both ranks share the launcher's stdout, and print() writes the newline separately.
    sys.stdout.write(
        f"rank={args.process_index} world_size={args.world_size} backend={backend} sum={value.item():g}\n"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
    leave_process_group()
