"""Builders of bad (and awkward but valid) inputs shared by the bad-input test matrices.

Each builder writes one file under a folder and returns its path. ``BAD_IMAGES`` maps a case name
to (builder, a fragment of the expected error message); ``AWKWARD_IMAGES`` are unusual images
that must load (16-bit, CMYK, palette, alpha, animated GIF).
"""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _noise(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def good_image(folder: Path, name: str = "good.png", size: tuple[int, int] = (40, 32), seed: int = 0) -> Path:
    path = folder / name
    Image.fromarray(_noise(size, seed)).save(path)
    return path


# -- images that must be refused ------------------------------------------------------------------
def missing(folder: Path) -> Path:
    return folder / "does-not-exist.png"


def directory(folder: Path) -> Path:
    path = folder / "a-folder.png"
    path.mkdir(exist_ok=True)
    return path


def zero_bytes(folder: Path) -> Path:
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def _truncated(folder: Path, image_format: str, suffix: str) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(_noise((64, 64))).save(buffer, format=image_format)
    path = folder / f"truncated{suffix}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def truncated_png(folder: Path) -> Path:
    return _truncated(folder, "PNG", ".png")


def truncated_jpeg(folder: Path) -> Path:
    return _truncated(folder, "JPEG", ".jpg")


def text_named_png(folder: Path) -> Path:
    path = folder / "notes.png"
    path.write_text("this is a text file, not an image\n")
    return path


def decompression_bomb(folder: Path) -> Path:
    """5000 x 4000 = 20 megapixels (over the 4096^2 limit) in a file of a few kB."""
    path = folder / "bomb.png"
    Image.new("L", (5000, 4000), 0).save(path, optimize=True)
    return path


def one_pixel(folder: Path) -> Path:
    path = folder / "one.png"
    Image.new("RGB", (1, 1), "red").save(path)
    return path


def thin(folder: Path) -> Path:
    path = folder / "thin.png"
    Image.new("RGB", (1000, 4), "red").save(path)
    return path


BAD_IMAGES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing file": (missing, "not found"),
    "directory as file": (directory, "is a directory"),
    "zero-byte file": (zero_bytes, "empty (0 bytes)"),
    "truncated PNG": (truncated_png, "truncated or corrupt"),
    "truncated JPEG": (truncated_jpeg, "truncated or corrupt"),
    "text file named .png": (text_named_png, "not an image"),
    "decompression bomb": (decompression_bomb, "over the limit"),
    "1x1 image": (one_pixel, "degenerate size"),
    "extremely thin image": (thin, "degenerate size"),
}


# -- unusual images that must work ----------------------------------------------------------------
def sixteen_bit(folder: Path) -> Path:
    path = folder / "deep.png"
    ramp = (np.arange(80 * 64, dtype=np.uint16).reshape(64, 80) * 30).astype(np.uint16)
    Image.fromarray(ramp).save(path)  # mode I;16
    return path


def cmyk(folder: Path) -> Path:
    path = folder / "print.jpg"
    Image.fromarray(_noise((80, 64))).convert("CMYK").save(path)
    return path


def palette(folder: Path) -> Path:
    path = folder / "palette.png"
    Image.fromarray(_noise((80, 64))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
    return path


def alpha(folder: Path) -> Path:
    path = folder / "alpha.png"
    pixels = np.concatenate([_noise((80, 64)), np.full((64, 80, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def animated_gif(folder: Path) -> Path:
    path = folder / "animated.gif"
    frames = [Image.fromarray(_noise((80, 64), seed)).convert("P") for seed in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


AWKWARD_IMAGES: dict[str, Callable[[Path], Path]] = {
    "16-bit": sixteen_bit,
    "CMYK": cmyk,
    "palette": palette,
    "alpha": alpha,
    "animated GIF": animated_gif,
}


# -- masks ----------------------------------------------------------------------------------------
def mask(folder: Path, kind: str, size: tuple[int, int] = (40, 32)) -> Path:
    """``empty`` (all black), ``full`` (all white), ``other size`` (half white, twice the size: the same
    aspect ratio) or ``other aspect`` (half white, twice the width only)."""
    path = folder / f"mask-{kind.replace(' ', '-')}.png"
    if kind == "other aspect":
        pixels = np.zeros((size[1], size[0] * 2), np.uint8)
        pixels[:, : size[0]] = 255
        Image.fromarray(pixels).save(path)
    elif kind == "other size":
        pixels = np.zeros((size[1] * 2, size[0] * 2), np.uint8)
        pixels[:, : size[0]] = 255
        Image.fromarray(pixels).save(path)
    else:
        Image.new("L", size, 0 if kind == "empty" else 255).save(path)
    return path


# -- safetensors-like files -----------------------------------------------------------------------
def corrupt_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return path


def truncated_copy(source: Path, folder: Path) -> Path:
    data = source.read_bytes()
    path = folder / f"truncated-{source.name}"
    path.write_bytes(data[: len(data) // 2])
    return path


def pickle_file(folder: Path, name: str) -> Path:
    """A pickle (what torch.save writes) under a .safetensors name: must be refused, never unpickled."""
    path = folder / name
    path.write_bytes(pickle.dumps({"tokens": [1.0, 2.0], "note": "a pickle"}))
    return path


def foreign_safetensors(folder: Path, name: str) -> Path:
    """A valid safetensors file that is not an editkit file (no editkit metadata)."""
    import torch
    from safetensors.torch import save_file

    path = folder / name
    save_file({"weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    return path


def not_a_diffusers_folder(folder: Path) -> Path:
    path = folder / "not-a-model"
    path.mkdir(exist_ok=True)
    (path / "readme.txt").write_text("weights go here")
    return path


def unet_less_pipeline(folder: Path) -> Path:
    """A diffusers folder whose model_index.json names a transformer pipeline (no UNet)."""
    path = folder / "transformer-model"
    path.mkdir(exist_ok=True)
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0", "transformer": ["diffusers", "X"]}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


# -- output paths (issue 15.11) -------------------------------------------------------------------
def name_over_the_limit(folder: Path) -> Path:
    return folder / ("x" * 252 + ".png")  # 256 bytes: over NAME_MAX (255) of common file systems


def no_extension(folder: Path) -> Path:
    return folder / "result"


def unsupported_extension(folder: Path) -> Path:
    return folder / "result.gif"


def dot_dot_after_a_missing_folder(folder: Path) -> Path:
    return folder / "ghost" / ".." / "g.png"


#: Output paths refused before the model loads: (builder, message fragment).
BAD_OUTPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "name over 255 bytes": (name_over_the_limit, "at most 255"),
    "no extension": (no_extension, "file name"),
    "unsupported extension": (unsupported_extension, "file name"),
    "'..' after a missing folder": (dot_dot_after_a_missing_folder, "does not exist"),
}


def long_valid_name(folder: Path) -> Path:
    """250 bytes: valid, and so is every temporary name while it is written."""
    return folder / ("é" * 123 + ".png")


def stale_temporaries(folder: Path) -> list[Path]:
    """What killed writers left (old and new naming), made old enough to be stale."""
    import os
    import time

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / ".result.k2j4_9zq.tmp.png", folder / ".cache.a1b2c3d4.tmp.safetensors"]
    paths.append(folder / ".editkit-00000000-12-0123abcd.tmp.png")
    old = time.time() - 3600
    for path in paths:
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    return paths


# -- crafted JSON and style caches (issue 15.2, 15.9) ---------------------------------------------
DEEP_JSON = "[" * 100_000 + "]" * 100_000  # 100k nested brackets: a RecursionError for json.loads


def crafted_style_cache(folder: Path, header: str | None = None, tensors: dict | None = None, **fields) -> Path:
    """A style cache file with ``header`` as its raw JSON header (or a valid one with ``fields``
    changed) and ``tensors`` replacing/adding tensors (``None`` values remove one)."""
    import torch
    from safetensors.torch import save_file

    valid = {
        "format": "editkit-style-cache/1", "kind": "style", "model": "0" * 16, "model_name": "m",
        "size": [32, 32], "num_inference_steps": 1, "resample_steps": 0, "sites": ["site"],
        "timesteps": [1], "features": ["key", "value"], "extra": {},
    }  # fmt: skip
    if header is None:
        header = json.dumps({**valid, **fields}).replace('"__inf__"', "Infinity").replace('"__big__"', "1e400")
    data = {"final_latent": torch.zeros(1, 4, 4, 4), "site/1/key": torch.zeros(1, 2, 16, 4)}
    data["site/1/value"] = torch.zeros(1, 2, 16, 4)
    for name, tensor in (tensors or {}).items():
        if tensor is None:
            data.pop(name)
        else:
            data[name] = tensor
    path = folder / "crafted.safetensors"
    save_file(data, str(path), metadata={"editkit_style_cache": header})
    return path


def _crafted(**kwargs) -> Callable[[Path], Path]:
    return lambda folder: crafted_style_cache(folder, **kwargs)


def _tensor(*shape: int, fill: float = 0.0):
    import torch

    return torch.full(shape, fill)


#: Crafted style caches: (builder, message fragment); each must be exit 2 before the model loads.
CRAFTED_CACHES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "header nested 20,000 deep": (_crafted(header="[" * 20_000 + "]" * 20_000), "nested too deeply"),
    "header a JSON list": (_crafted(header="[1, 2]"), "not an object"),
    "header null": (_crafted(header="null"), "not an object"),
    "Infinity in the header": (_crafted(size=["__inf__", 32]), "not a finite number"),
    "1e400 in the header": (_crafted(num_inference_steps="__big__"), "not a finite number"),
    "size of strings": (_crafted(size=["a", "b"]), "size must be"),
    "steps a string": (_crafted(num_inference_steps="1"), "num_inference_steps"),
    "sites not a list": (_crafted(sites="site"), "sites must be"),
    "unknown kind": (_crafted(kind="texture"), "kind"),
    "latent of the wrong shape": (_crafted(tensors={"final_latent": _tensor(4, 4)}), "final_latent must be"),
    "latent not matching the size": (_crafted(tensors={"final_latent": _tensor(1, 4, 4, 8)}), "does not match"),
    "feature of the wrong shape": (_crafted(tensors={"site/1/key": _tensor(16, 4)}), "must be (1, heads"),
    "feature missing": (_crafted(tensors={"site/1/value": None}), "got nothing"),
    "features of two shapes": (_crafted(tensors={"site/1/value": _tensor(1, 2, 8, 4)}), "differ in shape"),
    "NaN latent": (_crafted(tensors={"final_latent": _tensor(1, 4, 4, 4, fill=float("nan"))}), "NaN or infinite"),
}


def rewritten_safetensors(
    source: Path, folder: Path, name: str, *, metadata: dict | None = None, drop=(), tensors: dict | None = None
) -> Path:
    """A copy of the safetensors file ``source`` with metadata fields set (``None``: removed), tensors dropped/set."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as reader:
        values = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (not a dict)
        fields = dict(reader.metadata() or {})
    for key, value in (metadata or {}).items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    values = {k: v for k, v in values.items() if not any(k.startswith(prefix) for prefix in drop)}
    values.update(tensors or {})
    path = folder / name
    save_file(values, str(path), metadata=fields)
    return path


def raw_safetensors(folder: Path, name: str, header: bytes) -> Path:
    """A file with the safetensors layout (8-byte length, then ``header``) whose header is crafted."""
    path = folder / name
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path
