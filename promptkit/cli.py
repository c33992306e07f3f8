"""`promptkit` command line. Each subcommand lives with the code it drives and exposes
`configure(parser)` and `run(args)`; this module only dispatches and turns user mistakes
into one clear line instead of a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "list-methods": ("promptkit.cli", "List registered prompt-learning methods and test-time adapters."),
    "train": ("promptkit.training.cli", "Few-shot prompt training."),
    "eval": ("promptkit.training.cli", "Evaluate saved prompts (or zero-shot) on a dataset."),
    "tta": ("promptkit.tta.cli", "Test-time adaptation over a dataset."),
    "demo": ("promptkit.demo", "End-to-end demo on the embedded model and benchmark (offline)."),
}
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError)


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from .registry import ADAPTERS, list_methods

    print("methods:", " ".join(list_methods()))
    try:
        from . import tta  # noqa: F401  (registers the adapters)
    except ImportError:
        pass
    print("test-time adapters:", " ".join(ADAPTERS.names()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptkit", description="Prompt learning on frozen CLIP models.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("promptkit"):
                raise
            continue
        modules[name].configure(sub.add_parser(name, help=help_text, description=help_text), name)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"promptkit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
