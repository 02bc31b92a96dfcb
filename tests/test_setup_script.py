"""`scripts/setup.sh` on machines whose torch carries a local version label, without a download.

PyPI's torch 2.13.0 (what every GPU machine and every pip user without a CPU index gets) is the *distribution*
``2.13.0`` while its ``torch.__version__`` is ``2.13.0+cu130``. A constraint written from ``__version__`` names a
distribution pip cannot find, so the project's install ends in ``ResolutionImpossible``. These tests put a stand-in
``torch`` wheel of exactly that shape in a fresh virtual environment and run the script with pip cut off from every
index (``PIP_NO_INDEX``): every other dependency is visible from the project's own environment (a ``.pth`` path to a
copy of its site-packages listing without torch), so nothing is downloaded and only torch's handling is under test.
Both branches of the script run: an NVIDIA GPU present (a fake ``nvidia-smi`` on PATH) and a CPU-only machine.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_DIST_VERSION = "2.13.0"  # what pip resolves against
TORCH_LABELLED_VERSION = "2.13.0+cu130"  # what torch.__version__ says on PyPI's build


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_standin_torch_wheel(folder: Path) -> Path:
    """A minimal valid wheel ``torch-2.13.0`` whose module says ``__version__ = "2.13.0+cu130"``."""
    dist_info = f"torch-{TORCH_DIST_VERSION}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{TORCH_LABELLED_VERSION}"\nSTANDIN = True\n'.encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {TORCH_DIST_VERSION}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: hfweight-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in files.items():
        writer.writerow([name, _record_hash(data), len(data)])
    writer.writerow([f"{dist_info}/RECORD", "", ""])
    files[f"{dist_info}/RECORD"] = record.getvalue().encode()
    wheel = folder / f"torch-{TORCH_DIST_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def site_packages_without_torch(folder: Path) -> Path:
    """A folder of links to this environment's installed packages, torch's own entries left out."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name in ("torch", "torchgen", "functorch") or name.startswith("torch-") or name.endswith(".pth"):
            continue
        if name.startswith(("pip", "__editable__", "hfweight")):
            continue  # the fresh venv brings its own pip; hfweight is what the script installs
        (folder / entry.name).symlink_to(entry)
    return folder


def fake_nvidia_smi(folder: Path, gpu: bool) -> Path:
    """``nvidia-smi`` that lists one GPU (exit 0) or, like a driver without a device, fails."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    body = 'echo "GPU 0: NVIDIA Stand-in (UUID: GPU-0)"; exit 0' if gpu else 'echo "No devices were found"; exit 6'
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def shared_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup-parts")
    wheels = root / "wheels"
    wheels.mkdir()
    build_standin_torch_wheel(wheels)
    return wheels, site_packages_without_torch(root / "deps")


def make_venv(folder: Path, deps: Path) -> Path:
    """A fresh virtual environment that also sees the project's dependencies (``deps``); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    python = folder / "bin" / "python"
    # builds use the project's setuptools (the venv's bundled one may be too old to build a wheel offline)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    Path(purelib, "project-deps.pth").write_text(f"{deps}\n")
    return python


def offline_pip_env(tmp_path: Path, wheels: Path, gpu: bool) -> dict:
    return {
        "PATH": f"{fake_nvidia_smi(tmp_path / 'bin', gpu)}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PIP_CONFIG_FILE": os.devnull,  # no machine pip configuration (no local wheel folder, no caps)
        "PIP_NO_INDEX": "1",  # no download: torch comes from the stand-in folder, the rest is already visible
        "PIP_FIND_LINKS": str(wheels),
        "PIP_NO_BUILD_ISOLATION": "0",  # build hfweight with the venv's setuptools instead of fetching one
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def run_setup(python: Path, env: dict) -> str:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh")],
        env={**env, "PYTHON": str(python)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    return log


def installed_torch(python: Path) -> tuple[str, str]:
    out = subprocess.check_output(
        [str(python), "-c", "import importlib.metadata as m, torch; print(m.version('torch'), torch.__version__)"],
        text=True,
    )
    dist, labelled = out.split()
    return dist, labelled


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [True, False], ids=["nvidia-gpu", "cpu-only"])
def test_setup_installs_with_a_labelled_torch(tmp_path, shared_parts, gpu):
    wheels, deps = shared_parts
    python = make_venv(tmp_path / "venv", deps)
    log = run_setup(python, offline_pip_env(tmp_path, wheels, gpu))
    # the branch taken is the one the machine calls for, and says so
    assert ("NVIDIA GPU present" in log) == gpu, log
    assert ("CPU-only machine" in log) == (not gpu), log
    # torch is pinned by its distribution version, and the one installed is still the stand-in (never replaced)
    assert installed_torch(python) == (TORCH_DIST_VERSION, TORCH_LABELLED_VERSION)
    assert f"torch {TORCH_LABELLED_VERSION} kept" in log, log
    # hfweight itself was installed into the fresh environment, from this checkout
    origin = subprocess.check_output(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('hfweight').origin)"], text=True
    )
    assert Path(origin.strip()).is_relative_to(REPO)


@pytest.mark.slow
def test_setup_keeps_an_existing_labelled_torch(tmp_path, shared_parts):
    """A torch already in the environment (a CUDA/ROCm build a user brought) is kept, not reinstalled."""
    wheels, deps = shared_parts
    python = make_venv(tmp_path / "venv", deps)
    env = offline_pip_env(tmp_path, wheels, gpu=False)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch"], env=env, check=True)
    log = run_setup(python, env)
    assert "no torch found" not in log, log
    assert f"torch {TORCH_LABELLED_VERSION} kept" in log, log
    assert installed_torch(python) == (TORCH_DIST_VERSION, TORCH_LABELLED_VERSION)
