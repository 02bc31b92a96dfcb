#!/usr/bin/env bash
# The wheel, as a user who ran `pip install hfweight` gets it: build it from this checkout, install it into a fresh
# virtual environment outside the repository, and from a directory that is not the repository run the `hfweight`
# command on the recipes and accelerate configs the wheel ships (issue 21, part 2).
#
#   bash scripts/wheel_check.sh            # PYTHON=<the project's environment> (default: .venv/bin/python, or python)
#
# What it checks, in order:
#  1. the wheel holds the package, its recipes and accelerate configs (the same files as the repository's top-level
#     folders) and the `hfweight` console script, and nothing else (no tests, benchmarks, trainers, caches);
#  2. in a fresh venv with only the wheel installed from this project: `hfweight --version`, `hfweight recipes`, a
#     packaged tiny recipe by name for 3 steps, the packaged demo pipeline's stages resolving inside the wheel, and
#     the same recipe relaunched with `--accelerate_config ddp_cpu --num_processes 2`, whose checkpoint must hold both
#     ranks' weighting state;
#  3. an editable install (`pip install -e`) of the same source finds the recipes at the top level of the source.
#
# Why the fresh venv borrows the project environment's packages: the wheel's dependencies (torch, transformers, trl,
# ...) are large and already installed in the project environment, and downloading them again tests pip, not this
# wheel. `python -m venv --system-site-packages` cannot help (the project environment is itself a venv, not the system
# Python), so a `.pth` file in the fresh venv appends the project environment's site-packages to `sys.path`, and the
# wheel is installed with `pip install --no-deps`. The fresh venv's own site-packages comes first on `sys.path`, so the
# `hfweight` imported, the console script and the recipes are the wheel's (asserted below); the project environment's
# own hfweight (an editable install's finder) is not activated, since `.pth` files of an appended directory are not
# read. The wheel is built from a copy of the checkout's files (tracked and untracked, minus .gitignore'd ones), so no
# `build/` directory is left in the repository and no stale build output can slip into the wheel; with
# `--no-build-isolation` (the project environment's setuptools; nothing downloaded) when that setuptools is recent.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"   # absolute: the steps below run in other directories
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hfweight-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
case "$WORK/" in "$ROOT"/*) echo "wheel_check: $WORK is inside the repository" >&2; exit 1 ;; esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset PYTHONPATH   # the repository must not leak into the runs below
step() { echo "== wheel_check: $* ($(date +%T))"; }

step "build the wheel from a copy of the checkout"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [[ -e "$f" ]] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
# The project environment's setuptools builds the wheel when it can (>= 70.1 has bdist_wheel built in; torch pulls a
# recent one); an older one (Python 3.11's venv bundles 65) makes pip build in an isolated environment from PyPI.
BUILD_FLAGS=(--no-build-isolation)
"$PYTHON" -c 'import setuptools, sys; sys.exit(tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1))' \
    || { BUILD_FLAGS=(); echo "setuptools < 70.1 here: building in pip's isolated build environment"; }
"$PYTHON" -m pip wheel -q --no-deps "${BUILD_FLAGS[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/hfweight-*.whl)"
echo "$WHEEL"

step "check the wheel's contents"
"$PYTHON" - "$WHEEL" "$ROOT" <<'EOF'
import sys
import zipfile
from pathlib import Path

wheel, root = sys.argv[1], Path(sys.argv[2])
names = zipfile.ZipFile(wheel).namelist()
dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
stray = [n for n in names if n.split("/")[0] not in ("hfweight", dist_info) or "__pycache__" in n or n.endswith(".pyc")]
assert not stray, f"files outside the package in the wheel: {stray}"
counts = {}
for kind in ("recipes", "accelerate_configs"):
    shipped = {n.split(f"hfweight/{kind}/", 1)[1] for n in names if n.startswith(f"hfweight/{kind}/")}
    counts[kind] = len(shipped)
    repository = {p.relative_to(root / kind).as_posix() for p in (root / kind).rglob("*") if p.suffix in (".yaml", ".md")}
    assert shipped == repository, f"{kind}: wheel and repository differ: {sorted(shipped ^ repository)}"
modules = {n for n in names if n.startswith("hfweight/") and n.endswith(".py")}
repository = {p.relative_to(root).as_posix() for p in (root / "hfweight").rglob("*.py") if "__pycache__" not in p.parts}
assert modules == repository, f"package modules: wheel and repository differ: {sorted(modules ^ repository)}"
entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
assert "hfweight = hfweight.cli:main" in entry_points, entry_points
print(f"{len(names)} files: {len(modules)} modules, {counts['recipes']} recipe files, "
      f"{counts['accelerate_configs']} accelerate config files, the metadata with the console script")
EOF

step "install it into a fresh venv outside the repository"
"$PYTHON" -m venv "$WORK/venv"
VENV_PY="$WORK/venv/bin/python"
"$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/project-environment.pth"
"$VENV_PY" -m pip install -q --no-deps "$WHEEL"
HFWEIGHT="$WORK/venv/bin/hfweight"
mkdir -p "$WORK/run" && cd "$WORK/run"

step "hfweight --version, hfweight recipes"
test "$("$HFWEIGHT" --version)" = "hfweight $("$VENV_PY" -c 'from importlib.metadata import version; print(version("hfweight"))')"
"$HFWEIGHT" recipes > recipes.txt
grep -q "files in $WORK/venv/.*/site-packages/hfweight/recipes" recipes.txt
grep -q "^  tiny/pretrain_mixture_odm " recipes.txt && grep -q "^  ddp_cpu " recipes.txt
"$VENV_PY" - "$WORK/venv" <<'EOF'
import sys

import hfweight
from hfweight.commands.demo import read_pipeline
from hfweight.resources import resolve

assert hfweight.__file__.startswith(sys.argv[1]), f"hfweight imported from {hfweight.__file__}, not the fresh venv"
stages = read_pipeline(resolve("tiny/demo", "recipes"))["stages"]
assert all(s["config"].startswith(sys.argv[1]) for s in stages), stages  # the pipeline's stages, inside the wheel
EOF

TINY=(--max_eval_samples_per_domain 4 --per_device_train_batch_size 4 --max_length 64 --logging_steps 1
      --disable_tqdm true --report_to none)
step "a packaged tiny recipe by name, 3 steps, in this process"
"$HFWEIGHT" pretrain --config tiny/pretrain_mixture_odm --max_steps 3 --save_strategy no \
    --output_dir "$WORK/run/single" "${TINY[@]}" > single.log 2>&1 || { tail -50 single.log; exit 1; }
test -f "$WORK/run/single/model.safetensors" && test -f "$WORK/run/single/mixture_weights.json"

step "the same under --accelerate_config ddp_cpu --num_processes 2, with a checkpoint"
"$HFWEIGHT" pretrain --config tiny/pretrain_mixture_odm.yaml --max_steps 2 --save_steps 2 \
    --output_dir "$WORK/run/ddp" "${TINY[@]}" --accelerate_config ddp_cpu --num_processes 2 \
    > ddp.log 2>&1 || { tail -80 ddp.log; exit 1; }
"$VENV_PY" - "$WORK/run/ddp/checkpoint-2" <<'EOF'
import sys

from hfweight.state import checkpoint_problem, read_state, state_file

checkpoint = sys.argv[1]
assert checkpoint_problem(checkpoint) is None, checkpoint_problem(checkpoint)
for rank in (0, 1):
    payload = read_state(state_file(checkpoint, rank))
    assert payload["world_size"] == 2, (rank, payload["world_size"])
    assert payload["objects"], f"rank {rank}: no weighting state"
print(f"{checkpoint}: weighting state of ranks 0 and 1, world size 2")
EOF

step "an editable install of the same source finds the top-level recipes"
# --without-pip: pip and setuptools come from the project environment (the venv's bundled setuptools may be too old to
# build an editable wheel without the `wheel` package, and this step must download nothing).
"$PYTHON" -m venv --without-pip "$WORK/editable"
cp "$WORK"/venv/lib/python*/site-packages/project-environment.pth "$WORK"/editable/lib/python*/site-packages/
"$WORK/editable/bin/python" -m pip install -q --no-deps "${BUILD_FLAGS[@]}" -e "$WORK/src"
"$WORK/editable/bin/hfweight" recipes > editable_recipes.txt
grep -q "files in $WORK/src/recipes" editable_recipes.txt

step "passed"
