#!/usr/bin/env bash
# Install hfweight (editable) with its test and plotting extras into the active Python environment.
#
# PyTorch: if torch is already importable it is kept as is (a CUDA build stays a CUDA build). Otherwise a machine
# with an NVIDIA driver gets the default PyPI build, and a CPU-only machine gets the pinned CPU build
# `torch==2.13.0` (found locally on this project's machines; elsewhere set TORCH_CPU_INDEX to PyTorch's CPU wheel
# index), so a CPU machine never downloads several GB of CUDA packages.
#
# Re-running is cheap: the install is skipped while pyproject.toml is unchanged since the last successful setup.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=".cache/setup-$(${PYTHON} -c 'import sys; print("%d.%d" % sys.version_info[:2])')-$(sha1sum pyproject.toml | cut -c1-12)"

if ! ${PYTHON} -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] no torch found; NVIDIA GPU present: installing the default (CUDA) torch build"
        ${PYTHON} -m pip install torch
    else
        echo "[setup] no torch found; CPU-only machine: installing torch==2.13.0 (CPU build)"
        ${PYTHON} -m pip install "torch==2.13.0" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}
    fi
fi

if [ -f "$STAMP" ] && ${PYTHON} -c "import hfweight, trl, pytest, matplotlib" >/dev/null 2>&1; then
    exit 0
fi
echo "[setup] installing hfweight and its dependencies"
${PYTHON} -m pip install -q -e ".[dev,plots]"
mkdir -p .cache && touch "$STAMP"
echo "[setup] done: $(${PYTHON} -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')"
