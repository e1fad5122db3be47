"""The ``editkit`` console command: parse, dispatch to a subcommand, map errors to exit codes.

Exit codes: 0 success, 1 unexpected failure (a bug: run with ``--debug`` for the traceback),
2 a problem the user can fix (bad input, bad option, model not loadable, out of memory),
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from editkit import __version__
from editkit.errors import EditkitError
from editkit.quiet import quiet_library_noise

# Subcommand modules under editkit.commands, in the order --help lists them.
COMMANDS = ("stylize", "edit", "compose", "softrepa", "app", "env")


def echo(message: object) -> None:
    """What a command reports to the user on stdout (results, written files); the CLI's only printer."""
    print(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="editkit",
        description="Diffusion-based image editing and style transfer.",
        epilog="Run 'editkit COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"editkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"editkit.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="editkit: %(message)s")
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    quiet_library_noise()  # two harmless dependency messages (editkit.quiet lists them and why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once
            warnings.showwarning = _show_warning
            return int(args.run(args) or 0)
    except EditkitError as error:
        print(f"editkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("editkit: interrupted", file=sys.stderr)
        return 130
    except MemoryError as error:  # host RAM, or torch.OutOfMemoryError (a RuntimeError) below
        return _out_of_memory(error, args.debug)
    except Exception as error:  # a bug (one line unless --debug), or out of memory
        if _is_out_of_memory(error):
            return _out_of_memory(error, args.debug)
        if args.debug:
            raise
        message = f"{type(error).__name__}: {error}"
        print(f"editkit: unexpected error: {message} (run with --debug for details)", file=sys.stderr)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning for the user as one line on stderr; deprecation and resource noise only in --debug logs.

    ResourceWarning ("unclosed event loop" from gradio's launch) is ignored by Python's default
    filters; the ``simplefilter("default")`` above would show it, so it goes to the debug log too.
    """
    if issubclass(category, (DeprecationWarning, FutureWarning, ResourceWarning)):
        logging.getLogger("py.warnings").debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)
        return
    print(f"editkit: warning: {message}", file=sys.stderr)


def _is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS, XPU), without importing torch for commands that do not."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(error, oom)


def _out_of_memory(error: BaseException, debug: bool) -> int:
    """One line with the knobs that reduce memory; exit code 2 (the user can change the run)."""
    if debug:
        raise error
    from editkit.numerics import out_of_memory_message

    print(f"editkit: error: {out_of_memory_message(error)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
