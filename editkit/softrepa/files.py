"""Reading and writing SoftREPA's safetensors files (token files, training checkpoints) strictly.

Every value of a file is checked before it is used: metadata strings are parsed with
:func:`parse_json` (no ``NaN``/``Infinity``, no number that overflows to infinity, a bounded
nesting depth) and the integer parsers below; tensors are checked for shape, dtype and
finiteness with :func:`check_tensor`. A failed check raises :class:`ModelLoadError` naming the
file and the field, so the CLI exits with code 2 instead of a traceback.

Writes go through :func:`write_safetensors`: the file is serialised in memory and written with
Python's own file I/O (its header in a canonical order) inside :func:`editkit.image.atomic_write`, so a full disk is an
``OSError(ENOSPC)`` there (exit code 2, nothing partial left) rather than the Rust writer's
``SafetensorError``, which the CLI would report as an unexpected error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from editkit.errors import InputError, ModelLoadError
from editkit.jsonio import MAX_JSON_DEPTH
from editkit.jsonio import parse_json as strict_json
from editkit.safefiles import is_pickle

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_TOKEN_ABS",
    "check_tensor",
    "parse_int",
    "parse_json",
    "read_safetensors",
    "refuse_unexpected",
    "write_safetensors",
]

# Largest token value accepted: CLIP text embeddings lie within about +-30, float16 overflows at
# 65504, and values near 1e4 already saturate attention; larger values only come from divergence.
MAX_TOKEN_ABS = 1e4
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def read_safetensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file (a pickle is refused, never opened)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    if is_pickle(path) or path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path} is a pickle (torch.save) file; editkit loads {what}s from .safetensors only")
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = dict(reader.metadata() or {})
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RecursionError) as error:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({error})") from None
    return tensors, metadata


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, overwrite: bool
) -> Path:
    """Write a safetensors file atomically; a full disk is an :class:`InputError` and leaves nothing."""
    from safetensors.torch import save

    from editkit.image import atomic_write

    data = _canonical(save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata))
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def _canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes its header from a Rust hash map, in an order that changes from one call
    to the next; sorting makes equal contents equal bytes (resumed and uninterrupted runs give
    identical files). Data offsets are relative to the end of the header, so only its length
    changes; it is padded with spaces to a multiple of 8, as safetensors does.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + length :]


def parse_json(metadata: dict[str, str], key: str, path: Path, kind: type | tuple[type, ...]):
    """Metadata field ``key`` parsed as strict JSON and required to be of ``kind``."""
    if key not in metadata:
        raise ModelLoadError(f"{path}: metadata field {key!r} is missing")
    try:
        value = strict_json(metadata[key], f"{path}: metadata field {key!r}", max_depth=MAX_JSON_DEPTH)
    except InputError as error:  # a broken file is a model-load error (exit 2) naming the file
        raise ModelLoadError(str(error)) from None
    if not isinstance(value, kind):
        raise ModelLoadError(f"{path}: metadata field {key!r} has the wrong type ({type(value).__name__})")
    return value


def parse_int(metadata: dict[str, str], key: str, path: Path, *, minimum: int = 0, default: int | None = None) -> int:
    """Metadata field ``key`` as a decimal integer ``>= minimum`` (``default`` when absent, if given)."""
    if key not in metadata and default is not None:
        return default
    text = metadata.get(key)
    if text is None:
        raise ModelLoadError(f"{path}: metadata field {key!r} is missing")
    if not text.strip().isdigit() or len(text) > 12:
        raise ModelLoadError(f"{path}: metadata field {key!r} is not a whole number ({text[:40]!r})")
    value = int(text)
    if value < minimum:
        raise ModelLoadError(f"{path}: metadata field {key!r} must be at least {minimum}, not {value}")
    return value


def check_tensor(
    tensors: dict[str, torch.Tensor], key: str, path: Path, shape: tuple[int, ...], *, bound: float | None = None
) -> torch.Tensor:
    """Tensor ``key`` as float32, required to have ``shape`` and finite values (within ``bound``)."""
    if key not in tensors:
        raise ModelLoadError(f"{path}: tensor {key!r} is missing")
    tensor = tensors[key]
    if not tensor.is_floating_point():
        raise ModelLoadError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, not a float type")
    if tuple(tensor.shape) != tuple(shape):
        raise ModelLoadError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise ModelLoadError(f"{path}: tensor {key!r} holds NaN or infinite values")
    if bound is not None and tensor.numel() and tensor.abs().max() > bound:
        raise ModelLoadError(f"{path}: tensor {key!r} holds values beyond +-{bound:g} (a diverged training?)")
    return tensor


def refuse_unexpected(tensors: dict[str, torch.Tensor], expected: set[str], path: Path) -> None:
    """Refuse tensors the file type does not define."""
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ModelLoadError(f"{path}: unexpected tensor(s) {', '.join(extra[:3])}")
