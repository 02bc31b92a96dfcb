"""Packaging that pyproject.toml cannot declare: the top-level ``recipes/`` and ``accelerate_configs/`` ship inside the
package as ``hfweight/recipes/`` and ``hfweight/accelerate_configs/``, with no second copy in the repository.

``package_dir`` maps each folder (and its subfolders, listed here as packages so new ones are never left out) into
``hfweight``; their YAML and README files are the package data. Everything else is in pyproject.toml.
``hfweight.resources.packaged_dir`` finds the files in the wheel or, in a clone or editable install, at the top level.
"""

import os

from setuptools import find_packages, setup

SHIPPED = {"hfweight.recipes": "recipes", "hfweight.accelerate_configs": "accelerate_configs"}
DATA = ["*.yaml", "*.md"]


def shipped_packages() -> list[str]:
    """``hfweight.recipes``, ``hfweight.recipes.tiny``, ...: every folder of the shipped trees, as a package name."""
    names = []
    for package, folder in SHIPPED.items():
        for dirpath, dirnames, _ in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            names.append(package + dirpath[len(folder) :].replace(os.sep, "."))
    return names


setup(
    packages=find_packages(include=["hfweight", "hfweight.*"]) + shipped_packages(),
    package_dir=SHIPPED,
    package_data={name: DATA for name in shipped_packages()},
)
