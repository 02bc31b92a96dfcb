#!/usr/bin/env bash
# Set up the Python environment that `make demo` / `make test` run in, and install hfweight (editable) into it.
#
#   scripts/setup.sh                                              the validated versions (requirements/lock.txt)
#   LOCK=requirements/oldest.txt VENV=.venv-oldest scripts/setup.sh the oldest supported versions (make test-oldest)
#   LOCK=none VENV=.venv-latest scripts/setup.sh                     the newest releases (make test-latest)
#
# Which environment. VENV=DIR means the virtual environment DIR (PYTHON=DIR/bin/python). Inside an activated virtual or
# conda environment, the Makefile passes PYTHON=python and the packages go there. Otherwise it passes
# PYTHON=.venv/bin/python and this script creates that virtual environment first, so a system Python that refuses pip
# (PEP 668, "externally-managed-environment") is never touched.
#
# PyTorch. An environment that can already import torch keeps it, never replaced or upgraded (a CUDA or ROCm build
# stays one); a new .venv made from a base Python that has torch sees it (created with --system-site-packages in that
# case only). Otherwise torch is installed at the lock's version: with an NVIDIA driver, PyPI's default (CUDA) build;
# without one, from TORCH_CPU_INDEX when set (PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu, so pip
# pulls no CUDA packages), else from pip's configured index, which on PyPI is the CUDA build too (it runs on a CPU).
# The kept torch is then pinned by its installed *distribution* version (what pip resolves against, e.g. 2.13.0),
# never by torch.__version__, whose local label (2.13.0+cu130) names no distribution pip could find.
#
# Re-running is cheap: nothing is installed while pyproject.toml and the lock file are unchanged since the last
# successful setup of this environment.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VENV:-}" ]; then
    PYTHON=${VENV%/}/bin/python
fi
PYTHON=${PYTHON:-python3}
BASE_PYTHON=${BASE_PYTHON:-python3}
LOCK=${LOCK:-requirements/lock.txt}
EXTRAS=${EXTRAS:-dev,plots,deepspeed,math,search}

# 1. The environment: create the project's virtual environment when PYTHON points into one that does not exist yet.
case "$PYTHON" in
    */bin/python)
        env_dir=${PYTHON%/bin/python}
        if [ ! -x "$PYTHON" ]; then
            if ! command -v "$BASE_PYTHON" >/dev/null 2>&1; then
                echo "[setup] error: no '$BASE_PYTHON' on PATH to create $env_dir (set BASE_PYTHON=/path/to/python3)" >&2
                exit 1
            fi
            venv_flags=()
            if "$BASE_PYTHON" -c "import torch" >/dev/null 2>&1; then
                venv_flags=(--system-site-packages)   # keep the torch this machine already has
                echo "[setup] creating $env_dir (sees $BASE_PYTHON's packages, to keep its torch)"
            else
                echo "[setup] creating the virtual environment $env_dir with $BASE_PYTHON"
            fi
            if ! "$BASE_PYTHON" -m venv "${venv_flags[@]}" "$env_dir"; then
                echo "[setup] error: '$BASE_PYTHON -m venv' failed. On Debian/Ubuntu install the venv module:" \
                     "sudo apt install python3-venv (then run the command again)." >&2
                rm -rf "$env_dir"
                exit 1
            fi
        fi
        ;;
esac
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# 2. The version set: the lock's exact versions (torch is handled apart), or none for the newest releases.
mkdir -p .cache
env_key=$(echo "$PYTHON" | sha1sum | cut -c1-8)   # one set of files per environment: setups of two envs may overlap
constraints=()
torch_version=2.13.0
if [ "$LOCK" != "none" ]; then
    [ -f "$LOCK" ] || { echo "[setup] error: lock file $LOCK not found" >&2; exit 1; }
    locked_torch=$(sed -n 's/^torch==\([0-9.]*\).*/\1/p' "$LOCK")
    torch_version=${locked_torch:-$torch_version}
    filtered=".cache/constraints-$env_key-$(basename "$LOCK")"
    grep -v -E '^(torch|hfweight)==' "$LOCK" > "$filtered"
    constraints=(-c "$filtered")
    if [ "$pyver" != "3.11" ]; then
        echo "[setup] note: $LOCK was validated on Python 3.11; this is Python $pyver (pip may need other versions:" \
             "LOCK=none gives the newest releases)"
    fi
fi
lock_file=$LOCK
[ "$LOCK" = "none" ] && lock_file=/dev/null
stamp=".cache/setup-$env_key-$pyver-$(cat pyproject.toml "$lock_file" | sha1sum | cut -c1-12)"

# 3. PyTorch, if the environment has none.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "[setup] no torch found; NVIDIA GPU present: installing torch==$torch_version (PyPI's CUDA build)"
        "$PYTHON" -m pip install "torch==$torch_version"
    elif [ -n "${TORCH_CPU_INDEX:-}" ]; then
        echo "[setup] no torch found; CPU-only machine: installing torch==$torch_version (CPU build from $TORCH_CPU_INDEX)"
        "$PYTHON" -m pip install "torch==$torch_version" --index-url "$TORCH_CPU_INDEX"
    else
        echo "[setup] no torch found; CPU-only machine: installing torch==$torch_version from pip's configured index" \
             "(on PyPI that is the CUDA build, which also runs on a CPU; set TORCH_CPU_INDEX for the smaller CPU build)"
        "$PYTHON" -m pip install "torch==$torch_version"
    fi
fi

# 4. hfweight and everything else, at the lock's versions; the torch found or installed above is never replaced.
# Pin torch by its installed distribution version (what pip resolves against), not torch.__version__ (see the top).
installed_torch=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('torch'))")
torch_build=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "$installed_torch")
echo "torch==$installed_torch" > ".cache/constraint-$env_key-torch.txt"
constraints+=(-c ".cache/constraint-$env_key-torch.txt")
if [ -f "$stamp" ] && "$PYTHON" -c "import hfweight, trl, pytest, matplotlib" >/dev/null 2>&1; then
    exit 0
fi
upgrade=()
versions="the versions of $LOCK"
[ "$LOCK" = "none" ] && upgrade=(--upgrade --upgrade-strategy eager) && versions="the newest releases"
echo "[setup] installing hfweight[$EXTRAS] into $("$PYTHON" -c 'import sys; print(sys.prefix)') with $versions (torch $torch_build kept)"
"$PYTHON" -m pip install -q "${upgrade[@]}" "${constraints[@]}" -e ".[$EXTRAS]"
touch "$stamp"
echo "[setup] done: $("$PYTHON" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")' 2>&1 | tail -n 1)"
