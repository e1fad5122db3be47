"""What every task shares, decided once: seed -> generator, the processing size, the mask, metadata.

- **Generator**: a CPU ``torch.Generator`` seeded with the seed (diffusers' advice for results
  that are the same on every device: the noise is drawn on the CPU and moved).
- **Size**: the longer side is scaled to ``size`` (default: the model's native side, the UNet's
  ``sample_size`` x the VAE scale factor), keeping the aspect ratio; each side is rounded to the
  nearest multiple of the VAE scale factor x what the denoiser needs on top: nothing for
  diffusers' UNet, which sizes its up-sampling to the skip connections (so 8 px on SD and SDXL,
  as diffusers' own pipelines require), the patch size for a patchifying transformer. ``size``
  may also be an exact ``(width, height)``, rounded the same way. Photos larger than the model's
  size are processed at the model's size, smaller ones are scaled up to it.
- **Mask**: one of another resolution but the image's aspect ratio is resized to the processing
  size as diffusers' mask processor does (Lanczos for images, then binarised at 0.5); another
  aspect ratio is an error.
- **Metadata**: the values a run used, versions and input hashes (:func:`run_record`), written as
  editkit's JSON and an A1111-style ``parameters`` text (:func:`png_metadata`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from editkit import __version__
from editkit.errors import InputError
from editkit.image import check_mask_aspect, fit_size, load_mask, mask_coverage, read_mask_image

__all__ = [
    "check_mask_aspect",
    "make_generator",
    "native_side",
    "parse_size",
    "png_metadata",
    "prepare_mask",
    "processing_size",
    "run_record",
    "sha256_file",
    "size_multiple",
]

Size = int | tuple[int, int] | None


def make_generator(seed: int) -> torch.Generator:
    """The one seed rule: a CPU generator seeded with ``seed`` (the same images on CPU, CUDA and MPS)."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def native_side(pipe: Any) -> int:
    """The model's native side in pixels: the denoiser's sample size x the VAE scale factor.

    UNets: ``unet.config.sample_size``. MM-DiT pipelines: their ``default_sample_size``, what
    ``StableDiffusion3Pipeline`` (the transformer's ``sample_size``: 128 -> 1024 px) and
    ``FluxPipeline`` (128 -> 1024 px) multiply by the VAE factor for their default height and width.
    """
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    side = getattr(pipe, "default_sample_size", None)
    if side is None:  # a pipeline object without diffusers' attribute: the transformer's config
        side = getattr(pipe.transformer.config, "sample_size", None) or 128
    return int(side) * int(pipe.vae_scale_factor)


def size_multiple(pipe: Any) -> int:
    """Pixels each side is a multiple of: the VAE scale factor x the denoiser's patch size (1 for a UNet),
    x 2 more on FLUX (its latents are packed in 2x2 patches, as ``FluxPipeline`` rounds to 16 px)."""
    from diffusers import FluxTransformer2DModel

    from editkit.attention import uncompiled

    denoiser = _denoiser(pipe)
    patch = int(getattr(getattr(denoiser, "config", None), "patch_size", None) or 1)
    packing = 2 if isinstance(uncompiled(denoiser), FluxTransformer2DModel) else 1
    return int(pipe.vae_scale_factor) * patch * packing


def parse_size(text: str) -> int | tuple[int, int]:
    """``"512"`` (the longer side) or ``"768x512"`` (width x height) -> int or (width, height)."""
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise InputError(f"size must be a number of pixels or WIDTHxHEIGHT, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise InputError(f"size must be a number of pixels or WIDTHxHEIGHT, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def processing_size(pipe: Any, size: Size = None, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) a run processes at: see the module docstring. ``image_size`` None: a square image."""
    multiple = size_multiple(pipe)
    if isinstance(size, tuple):
        return fit_size(int(size[0]), int(size[1]), multiple=multiple)
    width, height = image_size or (1, 1)
    return fit_size(width, height, multiple=multiple, target=int(size or native_side(pipe)))


def prepare_mask(mask: Any, image_size: tuple[int, int], size: tuple[int, int], name: str = "mask"):
    """A mask (path or image) for an image of ``image_size`` -> a (1, 1, H, W) {0, 1} tensor at the
    processing ``size``. The aspect ratio must be the image's; the resize and the 0.5 threshold follow
    diffusers' mask processor. An empty mask is an error (nothing would change)."""
    mask = read_mask_image(mask)
    check_mask_aspect(mask.size, image_size, name)
    tensor = load_mask(mask, size)
    if mask_coverage(tensor) == 0.0:
        raise InputError(f"{name} is empty (all black): nothing would change")
    return tensor


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def run_record(
    command: str, pipe: Any, used: Mapping[str, Any], options: Mapping[str, Any], files: Mapping[str, Any]
) -> dict[str, Any]:
    """What a result records: command, model, options, the values used (device, dtype, size, steps,
    seed), the input files with their SHA-256 (``files``: role -> path, or (shown name, path)), versions."""
    import diffusers

    inputs = {}
    for role, entry in files.items():
        shown, path = entry if isinstance(entry, tuple) else (str(entry), entry)
        inputs[role] = {"file": str(shown), "sha256": sha256_file(path)}
    device = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu")
    return {
        "command": command,
        "model": str(getattr(pipe, "name_or_path", "") or ""),
        **{key: _plain(value) for key, value in options.items()},
        "used": {"device": str(device), "dtype": _dtype_name(_denoiser(pipe).dtype), **used},
        "inputs": inputs,
        "versions": {"editkit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def _denoiser(pipe: Any) -> Any:
    """The UNet, or the transformer of an MM-DiT pipeline."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _a1111_quote(text: str) -> str:
    """A1111's quoting of an infotext value: JSON-quoted when it holds a comma, colon or newline."""
    text = str(text)
    return text if not any(c in text for c in ",:\n") else json.dumps(text, ensure_ascii=False)


def a1111_parameters(record: Mapping[str, Any]) -> str:
    """The A1111 ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``."""
    used = record.get("used", {})
    prompt = record.get("target_prompt") or record.get("prompt") or ""
    pairs = {
        "Steps": used.get("num_inference_steps"),
        "Sampler": used.get("sampler"),
        "CFG scale": used.get("guidance_scale"),
        "Seed": used.get("seed"),
        "Size": "{}x{}".format(*used["size"]) if "size" in used else None,
        "Model": record.get("model") or None,
        "Source prompt": record.get("source_prompt"),
        "Method": record.get("command"),
        "Version": f"editkit {__version__}",
    }
    line = ", ".join(f"{key}: {_a1111_quote(value)}" for key, value in pairs.items() if value not in (None, ""))
    negative = record.get("negative_prompt")
    return "\n".join([str(prompt), *([f"Negative prompt: {negative}"] if negative else []), line])


def png_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """PNG text chunks: ``editkit`` (the record as JSON) and ``parameters`` (A1111's infotext)."""
    text = json.dumps({"version": __version__, **record}, sort_keys=True, default=str)
    return {"editkit": text, "parameters": a1111_parameters(record)}
