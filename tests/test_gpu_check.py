"""The GPU check (benchmarks/gpu_check.py, issue 12 item 8) in its CPU ``--dry-run`` mode, so it cannot rot before a
GPU is at hand: every part runs on a tiny Qwen2 and the judged rows pass (bit-for-bit parity with each parent, the
fused LM head matching the plain path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    for parent in ("Trainer", "SFTTrainer", "GRPOTrainer", "RLOOTrainer"):
        assert any(k.startswith("parity Weighted") and k.endswith(f"vs {parent}, max |Δθ|") and "| PASS |" in v
                   for k, v in rows.items()), (parent, table)
    assert sum("fused head" in k and "| PASS |" in v for k, v in rows.items()) == 4, table  # loss+grads, fp32+bf16
    assert sum(k.startswith("cost ") for k in rows) == 6, table
    assert not any("| FAIL |" in line for line in table), table
