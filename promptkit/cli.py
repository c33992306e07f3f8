"""`promptkit` command line. Each subcommand lives with the code it drives and exposes
`configure(parser)` and `run(args)`; this module only dispatches and turns user mistakes
into one clear line instead of a traceback."""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings

COMMANDS = {
    "list-methods": ("promptkit.cli", "List registered prompt-learning methods and test-time adapters."),
    "train": ("promptkit.training.cli", "Few-shot prompt training."),
    "eval": ("promptkit.training.cli", "Evaluate saved prompts (or zero-shot) on a dataset."),
    "tta": ("promptkit.tta.cli", "Test-time adaptation over a dataset."),
    "soup": ("promptkit.weights", "Average the prompts of several runs (model soup: uniform or greedy)."),
    "data": ("promptkit.data.cli", "Dataset recipes: list them, check a dataset folder against its recipe."),
    "bench": ("promptkit.bench.cli", "The papers' protocols over datasets x methods x shots x seeds, resumable."),
    "demo": ("promptkit.demo", "End-to-end demo on the embedded model and benchmark (offline)."),
}
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError, FileExistsError)
# torch re-raises a DataLoader worker's exception with the worker's traceback in its message.
WORKER_ERROR = "in DataLoader worker process"


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .registry import ADAPTERS, list_methods, list_objectives

    print("methods:", " ".join(list_methods()))
    try:
        from . import tta  # noqa: F401  (registers the adapters)
    except ImportError:
        pass
    print("test-time adapters:", " ".join(ADAPTERS.names()))
    print("objectives:", " ".join(list_objectives()))
    return 0


def main(argv: list[str] | None = None) -> int:
    from .training.trainer import NonFiniteLossError

    parser = argparse.ArgumentParser(prog="promptkit", description="Prompt learning on frozen CLIP models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("promptkit"):
                raise
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: a subcommand's default must not overwrite `promptkit --debug train ...`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the full traceback of an error")
        modules[name].configure(command, name)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_, **__: print(
            f"promptkit {args.command}: warning: {message}", file=sys.stderr)
        try:
            return int(modules[args.command].run(args) or 0)
        except Exception as err:
            user = isinstance(err, USER_ERRORS + (NonFiniteLossError,)) or WORKER_ERROR in str(err)
            if args.debug or not user:
                raise
            print(f"promptkit {args.command}: error: {_one_line(err)}", file=sys.stderr)
            return 2


def _one_line(err: Exception) -> str:
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if WORKER_ERROR in text:  # keep the worker's own message: the last line of its traceback, less the type
        text = re.sub(r"^[\w.]+: ", "", text.rstrip().splitlines()[-1])
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
