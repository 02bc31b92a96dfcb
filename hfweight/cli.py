"""The ``hfweight`` command (also ``python -m hfweight``), after ``trl``'s: one subcommand per entry point.

    hfweight recipes                                         # the packaged recipes and accelerate configs
    hfweight pretrain --config tiny/pretrain_mixture_odm --max_steps 50
    hfweight sft --config tiny/sft_dft --accelerate_config zero3 --num_processes 8
    hfweight demo --config tiny/demo
    hfweight score-reference --reference outputs/tiny/pretrain --output outputs/ref_scores
    hfweight search-mixture ...

The training subcommands (``pretrain``, ``sft``, ``grpo``, ``rloo``) take every field of their config classes on the
command line (TRL's ``TrlParser``: ``--config`` file first, flags override it). ``--config`` is a path or a packaged
recipe name (:mod:`hfweight.resources`). They run in this process, which is also what each process of an outer
``accelerate launch -m hfweight ...`` does; ``--accelerate_config NAME|PATH`` (with an optional ``--num_processes N``)
instead relaunches the same command under ``accelerate launch --config_file <file>``, without those two flags, so
the launched processes run it in-process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from . import resources

TRAINING_COMMANDS = ("pretrain", "sft", "grpo", "rloo")
LAUNCH_FLAGS = ("--accelerate_config", "--num_processes")
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
"""Set in every process a launcher (accelerate, torchrun) starts: a command running there must not launch again."""


class CommandLineError(ValueError):
    """A mistake on the command line: printed as ``hfweight <command>: error: ...`` (exit status 2), without a
    traceback (as is an unknown recipe or accelerate config name, :class:`~hfweight.resources.UnknownResourceError`)."""


def version() -> str:
    """The installed distribution's version (package metadata); the package's own attribute in a bare clone."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("hfweight")
    except PackageNotFoundError:
        from . import __version__

        return __version__


# ---- --config and --accelerate_config ------------------------------------------------------------------------------


def pop_option(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """``(value, argv without the option)`` for ``flag VALUE`` or ``flag=VALUE``; ``(None, argv)`` when absent."""
    for i, token in enumerate(argv):
        if token == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise CommandLineError(f"{flag} needs a value")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, list(argv)


def with_resolved_config(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (a path or a packaged recipe name) replaced by the file it names, in the
    ``--config FILE`` form ``TrlParser`` reads."""
    value, rest = pop_option(argv, "--config")
    return rest if value is None else ["--config", resources.resolve(value, resources.RECIPES), *rest]


def accelerate_launch_arguments(command: str, argv: list[str]) -> list[str] | None:
    """The arguments of ``accelerate launch`` that rerun ``hfweight <command> <argv>`` under ``--accelerate_config``:
    ``--config_file <file> [--num_processes N] -m hfweight <command> <argv without the two launch flags>``. ``None``
    when ``argv`` has no ``--accelerate_config`` (run in this process). Pure: reads no environment."""
    config, rest = pop_option(argv, "--accelerate_config")
    num_processes, rest = pop_option(rest, "--num_processes")
    if config is None:
        if num_processes is not None:
            raise CommandLineError("--num_processes needs --accelerate_config NAME|PATH (the launcher it configures)")
        return None
    launch = ["--config_file", resources.resolve(config, resources.ACCELERATE_CONFIGS)]
    if num_processes is not None:
        if not num_processes.isdigit() or int(num_processes) < 1:
            raise CommandLineError(f"--num_processes {num_processes!r}: expected a positive integer")
        launch += ["--num_processes", num_processes]
    return [*launch, "-m", "hfweight", command, *rest]


def launch_environment(config_file: str) -> dict[str, str]:
    """Environment the launched processes need beyond accelerate's own: ``ACCELERATE_USE_CPU=1`` when the config says
    ``use_cpu: true``. accelerate's multi-process launcher does not pass that setting to the processes, and without it
    each process of a machine without CUDA sets itself up as its own one-process run (``accelerate_configs/README.md``).
    """
    import yaml

    with open(config_file) as f:
        config = yaml.safe_load(f) or {}
    return {"ACCELERATE_USE_CPU": "1"} if config.get("use_cpu") is True else {}


def accelerate_launch(launch_arguments: list[str]) -> int:
    """Run ``accelerate launch <launch_arguments>`` in this process (accelerate's own launcher, as ``trl`` does); the
    exit status of the launched processes."""
    import subprocess

    if any(name in os.environ for name in LAUNCHER_ENV):
        raise CommandLineError(
            "--accelerate_config inside a process a launcher started (LOCAL_RANK/WORLD_SIZE are set): drop it, the "
            "outer launcher already decides the processes"
        )
    from accelerate.commands.launch import launch_command, launch_command_parser

    os.environ.update(launch_environment(launch_arguments[launch_arguments.index("--config_file") + 1]))
    print("accelerate launch " + " ".join(launch_arguments), file=sys.stderr, flush=True)
    try:
        launch_command(launch_command_parser().parse_args(launch_arguments))
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    except SystemExit as err:  # the multi-process launcher exits with 1 when a process failed
        return err.code if isinstance(err.code, int) else 1
    return 0


# ---- subcommands ---------------------------------------------------------------------------------------------------


def run_training(command: str, argv: list[str]) -> int:
    """``hfweight pretrain|sft|grpo|rloo``: every field of the entry point's ``DATACLASSES`` from ``--config`` and the
    command line, then its ``main``; or, with ``--accelerate_config``, the same command under ``accelerate launch``."""
    launch = accelerate_launch_arguments(command, argv)
    if launch is not None:
        with_resolved_config(argv)  # an unknown recipe fails here, not once per launched process
        return accelerate_launch(launch)
    from trl import TrlParser

    module = importlib.import_module(f"hfweight.commands.{command.replace('-', '_')}")
    parser = TrlParser(module.DATACLASSES, prog=f"hfweight {command}", epilog=training_epilog())
    module.main(*parser.parse_args_and_config(with_resolved_config(argv)))
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Leave the default process group together, if the run made one (a launched multi-process run): a rank that exits
    while gloo's threads still talk to another can abort at teardown ("terminate called without an active exception",
    exit status −6) after a run that finished — seen on a 2-rank CPU run of ``hfweight pretrain --accelerate_config
    ddp_cpu``, which then reported a failure. A barrier first, then ``destroy_process_group``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def training_epilog() -> str:
    """The end of a training command's ``--help``: the three options ``TrlParser`` does not list."""
    return (
        "--config NAME|PATH: a recipe file, or a packaged recipe name such as tiny/sft_dft (`hfweight recipes`); "
        "flags override its values. --accelerate_config NAME|PATH [--num_processes N]: rerun the command under "
        f"`accelerate launch` with a packaged config ({', '.join(resources.packaged_names('accelerate_configs'))}) "
        "or a file."
    )


def run_in_process(command: str, argv: list[str]) -> int:
    """``demo`` and ``score-reference``: their own argument parser, in this process (``--accelerate_config`` is for
    the training commands: a demo's stages, or scoring, are not split across processes)."""
    if any(token.split("=")[0] in LAUNCH_FLAGS for token in argv):
        raise CommandLineError(
            f"`hfweight {command}` runs in one process; --accelerate_config is for "
            f"{', '.join(TRAINING_COMMANDS)} (run a stage alone with the command the demo prints)"
        )
    module = importlib.import_module(f"hfweight.commands.{command.replace('-', '_')}")
    module.main(argv, prog=f"hfweight {command}")  # demo resolves its --config (a pipeline) itself
    return 0


def run_search_mixture(command: str, argv: list[str]) -> int:
    """``hfweight search-mixture``: :func:`hfweight.search.cli.main` (imported only when asked for)."""
    try:
        search = importlib.import_module("hfweight.search.cli")
    except ModuleNotFoundError as err:
        if err.name not in ("hfweight.search", "hfweight.search.cli"):
            raise
        raise CommandLineError(
            "`hfweight search-mixture` needs the module hfweight.search.cli, which this installation does not have "
            f"(hfweight {version()}); install a release that includes the mixture search."
        ) from err
    return search.main(argv)


def run_recipes(command: str, argv: list[str]) -> int:
    """``hfweight recipes``: the packaged recipes and accelerate configs, one line each (cut to the terminal's
    width on a terminal, whole when piped)."""
    import shutil

    argparse.ArgumentParser(prog="hfweight recipes", description=run_recipes.__doc__).parse_args(argv)
    width = max(shutil.get_terminal_size().columns, 80) if sys.stdout.isatty() else None
    print(resources.listing(width=width))
    return 0


COMMANDS: dict[str, tuple[Callable[[str, list[str]], int], str]] = {
    "pretrain": (run_training, "causal-LM pretraining with WeightedTrainer (every config field is a flag)"),
    "sft": (run_training, "supervised fine-tuning with WeightedSFTTrainer (every config field is a flag)"),
    "grpo": (run_training, "GRPO with WeightedGRPOTrainer (every config field is a flag)"),
    "rloo": (run_training, "RLOO with WeightedRLOOTrainer (every config field is a flag)"),
    "demo": (run_in_process, "a pipeline of stages (tiny/demo: pretrain -> SFT -> GRPO, each beside its baseline)"),
    "score-reference": (run_in_process, "precompute a reference model's per-token log-probs (ref_logps column)"),
    "search-mixture": (run_search_mixture, "search domain-mixture weights over short proxy runs"),
    "recipes": (run_recipes, "list the packaged recipes and accelerate configs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfweight", allow_abbrev=False,
        description="Per-token, per-sample, domain-mixture and reward weighting for transformers and TRL trainers.",
        epilog="`hfweight <command> --help` lists a command's own flags.",
    )
    parser.add_argument("--version", action="version", version=f"hfweight {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # each command parses its own flags
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hfweight <command> ...``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # --version, --help, or an unknown command (argparse's own message and exit)
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    try:
        return COMMANDS[command][0](command, rest)
    except (CommandLineError, resources.UnknownResourceError) as err:
        parser.exit(2, f"hfweight {command}: error: {err}\n")
    except BrokenPipeError:  # `hfweight recipes | head`: the reader has gone, which is not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush of stdout stays quiet
        return 0


def run_script(command: str) -> None:
    """The body of ``trainers/<command>.py`` (a clone's scripts): ``hfweight <command> <sys.argv[1:]>``. Success
    returns normally, as the scripts always did, so a wrapper running one with ``runpy`` goes on after it (the tests'
    engine wrapper leaves the process group then); a failure exits with its status."""
    status = main([command, *sys.argv[1:]])
    if status:
        raise SystemExit(status)
