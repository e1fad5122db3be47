"""What every subcommand shares: option types, options from the task layer's dataclasses, output handling.

The commands are thin: parse, call a pipeline, write the result. Errors a user can fix are
``EditkitError``s; ``editkit.cli`` turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from editkit.errors import InputError
from editkit.models import DEFAULT_SD_MODEL
from editkit.tasks.options import OptionError, cli_default, cli_help, knob_of

logger = logging.getLogger(__name__)


# -- option types: argparse reports their ValueError/ArgumentTypeError as a usage error (exit 2) --
def finite_float(text: str) -> float:
    """A float that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def ranged_float(low: float, high: float) -> Callable[[str], float]:
    """A finite float in [low, high]."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {value:g}")
        return value

    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


# -- shared options ---------------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser, default_model: str = DEFAULT_SD_MODEL) -> None:
    """--model, --device, --dtype, --soft-tokens, --soft-token-strength."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model, help="Hub id, diffusers folder or .safetensors file")
    group.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    group.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 elsewhere)")
    group.add_argument("--soft-tokens", type=Path, default=None, help="SoftREPA token file (.safetensors)")
    group.add_argument("--soft-token-strength", type=finite_float, default=1.0, help="scale of the soft tokens")


def add_knob(parser, flag: str, options: type, name: str, **kwargs: Any) -> None:
    """A flag for field ``name`` of an options dataclass: its default, help and range come from the field."""
    spec = knob_of(options, name)
    if spec.choices is not None:
        kwargs.setdefault("choices", spec.choices)
    elif "type" not in kwargs and "action" not in kwargs and "choices" not in kwargs:
        kwargs["type"] = knob_type(options, name, int if spec.integer else finite_float)
    if "action" not in kwargs and "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
    parser.add_argument(flag, dest=kwargs.pop("dest", name), default=cli_default(options, name),
                        help=cli_help(options, name), **kwargs)  # fmt: skip


def knob_type(options: type, name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that parses with ``parse`` and checks the field's range (argparse reports the problem)."""
    spec = knob_of(options, name)

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if spec.integer else ''}number") from None
        try:
            spec.check(name, value)
        except OptionError as error:
            raise argparse.ArgumentTypeError(error.problem) from None
        return value

    convert.__name__ = name
    return convert


def add_size_option(parser, options: type) -> None:
    """--size N (the longer side; text-to-image: the side) or WIDTHxHEIGHT; default: the model's size."""
    parser.add_argument("--size", type=size_type, default=None, metavar="N|WxH", help=cli_help(options, "size"))


def size_type(text: str) -> int | tuple[int, int]:
    from editkit.tasks.common import parse_size

    try:
        return parse_size(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_seed_option(parser, options: type) -> None:
    add_knob(parser, "--seed", options, "seed")


def make_options(options: type, flags: dict[str, str], args: argparse.Namespace, **values: Any) -> Any:
    """``options`` from the parsed ``args`` (``flags``: field -> flag); an invalid value names its flag."""
    fields = {name: getattr(args, name) for name in flags if hasattr(args, name)}
    try:
        return options(**{**fields, **values})
    except OptionError as error:
        raise InputError(f"{flags.get(error.field, error.field)} {error.problem}") from None


def add_attention_option(parser: argparse.ArgumentParser) -> None:
    """--attention sdpa|xformers: the kernel of editkit's attention layer; --compile [MODE]."""
    parser.add_argument(
        "--attention",
        choices=("sdpa", "xformers"),
        default="sdpa",
        help="attention kernel: torch SDPA or xformers (CUDA, when installed; SDPA otherwise)",
    )
    add_compile_option(parser)


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    """--compile [MODE]: torch.compile the UNet (``compile_mode`` turns the value into the mode)."""
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=("default", "reduce-overhead", "max-autotune"),
        default=None,
        help="torch.compile the UNet with this mode (default: off; the flag alone: mode 'default'); "
        "the first steps pay the compilation",
    )


def load_method_pipeline(task: str, args: argparse.Namespace) -> tuple[object, list]:
    """The pipeline of ``task`` (editkit.tasks) for --model/--device/--dtype with --attention and --compile
    applied, and the controllers of --soft-tokens (an empty list without it) to pass as ``attention_controllers``."""
    from editkit.tasks import check_soft_tokens_source, load_task_pipeline, soft_token_controllers

    check_soft_tokens_source(args.soft_tokens, args.model)  # before the model loads
    attention = getattr(args, "attention", "sdpa")
    pipe = load_task_pipeline(task, args.model, device=args.device, dtype=args.dtype, attention=attention,
                              compile_mode=args.compile)  # fmt: skip
    return pipe, soft_token_controllers(pipe, args.soft_tokens, getattr(args, "soft_token_strength", 1.0))


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's loading switches, recorded beside the task's record (model, kernel, compile, tokens)."""
    settings = {"model": str(args.model), "attention": getattr(args, "attention", "sdpa"), "compile": args.compile}
    if getattr(args, "soft_tokens", None) is not None:
        settings.update(soft_tokens=str(args.soft_tokens), soft_token_strength=args.soft_token_strength)
    return settings


def compile_mode(value: str) -> str | None:
    """torch.compile's mode for a --compile value (``"default"`` is torch's ``None``)."""
    return None if value == "default" else value


def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file, with one clear error when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the {what} {path}: {error}") from None


def add_output_options(parser: argparse.ArgumentParser, *, required: bool = True, batch: bool = False) -> None:
    """-o/--output (``required=False`` for commands that also have a batch mode), --output-dir (``batch``),
    --overwrite."""
    parser.add_argument("-o", "--output", type=Path, required=required, help="output image (.png keeps the parameters)")
    if batch:
        parser.add_argument(
            "--output-dir", type=Path, default=None, help="batch mode: folder for the images and manifest.json"
        )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def check_output_path(path: Path, overwrite: bool, *, suffixes: Iterable[str] | None = None) -> Path:
    """Refuse before any heavy work: an existing output without --overwrite, an unwritable folder,
    a name too long for the file system, ``..`` after a missing folder, and (with ``suffixes``) an
    extension the writer does not support. Also removes the temporary files a killed run left in
    the output's folder. Returns the file that will be written (a symbolic link's target)."""
    from editkit.atomic import check_output_target, remove_stale_temps

    path = path.expanduser()
    target = check_output_target(path, overwrite=overwrite)  # also: a folder, an existing file
    if suffixes is not None and path.suffix.lower() not in set(suffixes):
        raise InputError(f"cannot write {path}: use a {', '.join(sorted(set(suffixes)))} file name")
    folder = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if folder is not None and not _writable(folder):
        raise InputError(f"cannot write to {folder}: permission denied")
    remove_stale_temps(target.parent)
    return target


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def command_params(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed options worth recording in metadata (not callables, not the output path)."""
    ignored = {"run", "command", "output", "overwrite", "debug", *skip}
    return {key: value for key, value in vars(args).items() if key not in ignored and not callable(value)}
