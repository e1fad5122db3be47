"""What every subcommand shares: option types, model options, output handling, PNG metadata.

The commands are thin: parse, call a pipeline, write the result. Errors a user can fix are
``EditkitError``s; ``editkit.cli`` turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from editkit import __version__
from editkit.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


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
    """--model, --device, --dtype, --seed, --soft-tokens, --soft-token-strength."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=default_model,
        help=f"Hub id, diffusers folder or .safetensors file (default: {default_model})",
    )
    group.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    group.add_argument("--dtype", default=None, help="fp16, bf16 or fp32 (default: fp16 on CUDA, fp32 elsewhere)")
    group.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    group.add_argument("--soft-tokens", type=Path, default=None, help="SoftREPA token file (.safetensors)")
    group.add_argument(
        "--soft-token-strength", type=finite_float, default=1.0, help="scale of the soft tokens (default: 1.0)"
    )


def add_attention_option(parser: argparse.ArgumentParser) -> None:
    """--attention sdpa|xformers: the kernel of editkit's attention layer; --compile [MODE]."""
    parser.add_argument(
        "--attention",
        choices=("sdpa", "xformers"),
        default="sdpa",
        help="attention kernel: torch SDPA (default) or xformers (CUDA, when installed; SDPA otherwise)",
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


def load_method_pipeline(pipeline_class, args: argparse.Namespace) -> tuple[object, list]:
    """The pipeline of --model/--device/--dtype with --attention and --compile applied, and the controllers of
    --soft-tokens (an empty list without it) to pass as ``attention_controllers``."""
    from editkit.models import load_pipeline

    pipe = load_pipeline(pipeline_class, args.model, device=args.device, dtype=args.dtype)
    if args.attention == "xformers":  # on editkit pipelines this selects editkit's kernel
        pipe.enable_xformers_memory_efficient_attention()
    if args.compile:
        from editkit.acceleration import compile_unet

        compile_unet(pipe.unet, mode=compile_mode(args.compile))
    if not args.soft_tokens:
        return pipe, []
    from editkit.softrepa import load_soft_tokens

    return pipe, [load_soft_tokens(args.soft_tokens, unet=pipe.unet, strength=args.soft_token_strength)]


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


def add_output_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """-o/--output (``required=False`` for commands that also have a batch mode), --overwrite."""
    parser.add_argument("-o", "--output", type=Path, required=required, help="output image (.png keeps the parameters)")
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


def png_metadata(command: str, params: dict[str, Any]) -> dict[str, str]:
    """PNG text chunks recording how an image was made (readable with PIL's ``image.text``)."""
    clean = {key: (str(value) if isinstance(value, Path) else value) for key, value in params.items()}
    return {"editkit": json.dumps({"version": __version__, "command": command, **clean}, sort_keys=True, default=str)}


def command_params(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed options worth recording in metadata (not callables, not the output path)."""
    ignored = {"run", "command", "output", "overwrite", "debug", *skip}
    return {key: value for key, value in vars(args).items() if key not in ignored and not callable(value)}
