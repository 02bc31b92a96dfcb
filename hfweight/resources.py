"""The packaged recipes and accelerate configs: where they are, and how a name on the command line becomes a file.

One copy of each lives in the repository, at the top level where users look (``recipes/``, ``accelerate_configs/``).
The wheel ships them inside the package (``hfweight/recipes/``, ``hfweight/accelerate_configs/``: ``setup.py`` maps
the two folders into it at build time). :func:`packaged_dir` finds whichever exists, so an installed wheel, an editable
install and a plain clone (``PYTHONPATH=<clone>``) all resolve the same names.

Names: a recipe is named by its path under ``recipes/`` without ``.yaml`` (``tiny/pretrain_mixture_odm``; the suffix
and a leading ``recipes/`` are accepted too), an accelerate config by its file name without ``.yaml`` (``ddp_cpu``).
An existing file always wins over a packaged name, as in ``trl``'s ``--accelerate_config``.

Paths inside a recipe: a pipeline's stage ``config`` (``hfweight demo``) is resolved like ``--config``, relative to
the pipeline file's own folder first, then as a packaged recipe name, so a packaged pipeline finds its packaged stages
wherever it is installed. Every other path in a recipe (``output_dir``, a ``model_name_or_path`` or
``reference_model`` naming an earlier run's ``outputs/...``) is a run's input or output, relative to the current
directory, as in any ``TrainingArguments`` file; no recipe points at another packaged file except through a stage
``config``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

RECIPES = "recipes"
ACCELERATE_CONFIGS = "accelerate_configs"
SUFFIX = ".yaml"


class UnknownResourceError(ValueError):
    """A ``--config`` / ``--accelerate_config`` value that is neither a file nor a packaged name."""


def packaged_dir(kind: str) -> Path:
    """The folder of packaged ``kind`` files (``"recipes"`` or ``"accelerate_configs"``): inside the installed package
    (a wheel), else the repository's top level next to the package (a clone or an editable install)."""
    if kind not in (RECIPES, ACCELERATE_CONFIGS):
        raise ValueError(f"kind={kind!r}: expected {RECIPES!r} or {ACCELERATE_CONFIGS!r}")
    package = Path(__file__).resolve().parent
    for candidate in (package / kind, package.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no packaged {kind}: neither {package / kind} (an installed wheel) nor {package.parent / kind} (a clone) "
        "exists. Reinstall hfweight, or pass a file path."
    )


def packaged_names(kind: str) -> list[str]:
    """Every packaged name of ``kind``, sorted: ``tiny/sft_dft`` for recipes, ``zero3`` for accelerate configs."""
    root = packaged_dir(kind)
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob(f"*{SUFFIX}"))


def _name_of(value: str, kind: str) -> str:
    """A command-line value as a packaged name: ``.yaml`` and a leading ``recipes/`` (or ``accelerate_configs/``) go."""
    name = value.replace(os.sep, "/").removesuffix(SUFFIX)
    return name.removeprefix(f"{kind}/")


def resolve(value: str, kind: str, relative_to: str | os.PathLike | None = None) -> str:
    """The file a ``--config`` (``kind="recipes"``) or ``--accelerate_config`` value names.

    An existing file wins: ``value`` itself, or ``relative_to/value`` when ``relative_to`` is given (a pipeline's own
    folder). Otherwise ``value`` is a packaged name (with or without ``.yaml``); an unknown name is an
    :class:`UnknownResourceError` listing the nearest packaged names.
    """
    candidates = [Path(relative_to) / value] if relative_to is not None and not os.path.isabs(value) else []
    for path in [*candidates, Path(value)]:
        if path.is_file():
            return str(path)
    name = _name_of(value, kind)
    packaged = packaged_dir(kind) / f"{name}{SUFFIX}"
    if packaged.is_file():
        return str(packaged)
    names = packaged_names(kind)
    near = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    # A bare file name (`sft_dft`) is close to `tiny/sft_dft` by suffix, not by difflib's ratio over the whole name.
    near += [n for n in names if n.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1] and n not in near]
    flag = "--config" if kind == RECIPES else "--accelerate_config"
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise UnknownResourceError(
        f"{flag} {value!r} is neither a file nor a packaged {kind[:-1].replace('_', ' ')} name.{hint} "
        f"`hfweight recipes` lists them all ({len(names)} in {packaged_dir(kind)})."
    )


def header_summary(path: str | os.PathLike) -> str:
    """The one-line description of a YAML file: its leading comment paragraph, joined into one line (up to the first
    blank comment line, indented command line or non-comment line)."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            text = line[1:].rstrip("\n")
            if not text.strip() or text.startswith("   "):  # a blank comment line or an example command ends it
                break
            words.append(text.strip())
    return " ".join(words)


def listing(width: int | None = None) -> str:
    """The text of ``hfweight recipes``: every packaged recipe and accelerate config, one line each (its header's
    description, cut to ``width`` columns when given)."""
    sections = [
        (RECIPES, "Recipes", "hfweight <pretrain|sft|grpo|rloo|demo> --config NAME"),
        (ACCELERATE_CONFIGS, "Accelerate configs", "--accelerate_config NAME [--num_processes N]"),
    ]
    lines = []
    for kind, title, usage in sections:
        names = packaged_names(kind)
        column = max(len(name) for name in names) + 2
        lines.append(f"{title} ({usage}; files in {packaged_dir(kind)}):")
        for name in names:
            line = f"  {name:<{column}}{header_summary(packaged_dir(kind) / f'{name}{SUFFIX}')}"
            lines.append(line if width is None or len(line) <= width else line[: width - 1] + "…")
        lines.append("")
    return "\n".join(lines)
