"""The ``editkit`` console command: parse, dispatch to a subcommand, map errors to exit codes.

Exit codes: 0 success, 1 unexpected failure (a bug: run with ``--debug`` for the traceback),
2 a problem the user can fix (bad input, bad option, model not loadable, out of memory),
130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import sys
import textwrap
import warnings

from editkit import __version__
from editkit.errors import EditkitError
from editkit.quiet import quiet_library_noise

# Subcommand modules under editkit.commands, in the order --help lists them.
COMMANDS = ("stylize", "edit", "compose", "softrepa", "app", "env")


def echo(message: object) -> None:
    """What a command reports to the user on stdout (results, written files); the CLI's only printer."""
    print(message)


class HelpFormatter(argparse.HelpFormatter):
    """Text wrapped at spaces only, never inside a ``--flag``; a text of several lines (the examples
    of an epilog) kept as written; a default shown where the help does not show it already."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = "%(default)" in text or "default:" in text or "(default" in text
        nothing = default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
        if shown or nothing or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class EditkitParser(argparse.ArgumentParser):
    """editkit's parser: its help formatter, ``--debug`` on every subcommand, and a mistyped flag
    answered with the closest flag ("did you mean --steps?") and the subcommand's own usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
        )

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        flags = [arg for arg in extras if arg.startswith("-") and arg != "-"]
        if flags and (self._subparsers is None or not _has_subcommand(self, parsed)):
            self.error(_unknown_message(self, flags))
        return parsed, extras


def _has_subcommand(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> bool:
    """Whether ``parser`` dispatched to a subcommand (whose own parser already judged the extras)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return any(getattr(parsed, a.dest or "", None) is not None for a in actions)


#: Flags of earlier versions -> the one flag that replaced them (one vocabulary, issue 20).
RENAMED_FLAGS = {"--iterations": "--steps", "--max-side": "--size", "--height": "--size", "--width": "--size"}


def _unknown_message(parser: argparse.ArgumentParser, flags: list[str]) -> str:
    known = [option for action in parser._actions for option in action.option_strings]
    hints = []
    for flag in flags:
        name = flag.split("=")[0]
        if RENAMED_FLAGS.get(name) in known:
            hints.append(f"{flag} (renamed: use {RENAMED_FLAGS[name]})")
            continue
        match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hints.append(f"{flag} (did you mean {match[0]}?)" if match else flag)
    return f"unrecognized arguments: {' '.join(hints)}"


def build_parser() -> argparse.ArgumentParser:
    parser = EditkitParser(
        prog="editkit",
        description="Diffusion-based image editing and style transfer.",
        epilog="Run 'editkit COMMAND --help' for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"editkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=EditkitParser)
    for name in COMMANDS:
        importlib.import_module(f"editkit.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)  # before or after the subcommand
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
