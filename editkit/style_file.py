"""The style cache file format: reading a ``.safetensors`` style cache and checking every field.

A style cache (:class:`editkit.style.StyleCache`) is a safetensors file whose metadata key
:data:`CACHE_METADATA_KEY` holds a JSON header (format, kind, model fingerprint, model family,
size, steps, sites, timesteps) and whose tensors are ``final_latent`` (1, channels, h, w), optionally
``image_embeds``, and one ``(1, heads, tokens, head_dim)`` tensor per ``site/timestep/feature``.
:func:`read_cache_file` is the one place a file is checked: a crafted header (nested deep, a
list or null, a non-finite number, a field of the wrong type) or a tensor of the wrong shape or
with non-finite values is an :class:`~editkit.errors.InputError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from editkit.backbones.families import FAMILIES
from editkit.errors import InputError
from editkit.jsonio import parse_json
from editkit.safefiles import is_pickle

__all__ = ["CACHE_FORMAT", "CACHE_METADATA_KEY", "FEATURES_BY_KIND", "check_flow_schedule", "read_cache_file"]

CACHE_FORMAT = "editkit-style-cache/1"
CACHE_METADATA_KEY = "editkit_style_cache"
FEATURES_BY_KIND = {"style": ("key", "value"), "content": ("query",)}


def read_cache_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked header and tensors of the style cache at ``path``; InputError for anything else."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(f"style cache not found: {path}")
    if is_pickle(path):
        raise InputError(f"{path} is a pickle (torch.save) file; editkit reads style caches from .safetensors only")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable safetensors file ({error})") from None
    if CACHE_METADATA_KEY not in metadata:
        raise InputError(f"{path} is a safetensors file but not an editkit style cache (no header)")
    header = parse_json(metadata[CACHE_METADATA_KEY], f"the style cache header of {path}")
    try:
        _check_header(header)
        _check_tensors(header, tensors)
    except ValueError as error:
        raise InputError(f"{path} is not a valid editkit style cache ({error})") from None
    return header, tensors


def _check_header(header: Any) -> None:
    """Every header field present with its type and range (ValueError naming the first bad one)."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != CACHE_FORMAT:
        raise ValueError(f"format {header.get('format')!r}, expected {CACHE_FORMAT!r}")
    if header.get("kind") not in FEATURES_BY_KIND:
        raise ValueError(f"kind {header.get('kind')!r} is not one of {sorted(FEATURES_BY_KIND)}")
    for name in ("model", "model_name", "family"):
        if not isinstance(header.get(name, ""), str):
            raise ValueError(f"{name} must be a string")
    if header.get("family") and header["family"] not in FAMILIES:
        raise ValueError(f"family {header['family'][:40]!r} is not one of {', '.join(FAMILIES)}")
    size = header.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_whole(side, 1) for side in size)):
        raise ValueError(f"size must be [width, height] in pixels, got {size!r}")
    if not _whole(header.get("num_inference_steps"), 1) or not _whole(header.get("resample_steps"), 0):
        raise ValueError("num_inference_steps must be a whole number >= 1 and resample_steps >= 0")
    sites, timesteps = header.get("sites"), header.get("timesteps")
    if not isinstance(sites, list) or not all(isinstance(site, str) for site in sites):
        raise ValueError("sites must be a list of attention site names")
    if not isinstance(timesteps, list) or not all(_whole(t, 0) for t in timesteps):
        raise ValueError("timesteps must be a list of whole numbers >= 0")
    extra = header.get("extra", {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise ValueError("extra must be an object of strings")


def _check_tensors(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Shapes that fit together: a (1, C, h, w) latent scaled like ``size``, one feature shape per site."""
    latent = tensors.get("final_latent")
    if latent is None or latent.ndim != 4 or latent.shape[0] != 1 or min(latent.shape) < 1:
        raise ValueError(f"final_latent must be (1, channels, h, w), got {_shape(latent)}")
    width, height = header["size"]
    if width * latent.shape[2] != height * latent.shape[3] or width % latent.shape[3]:
        raise ValueError(f"final_latent {_shape(latent)} does not match the size {width}x{height}")
    embeds = tensors.get("image_embeds")
    if embeds is not None and (embeds.ndim != 3 or embeds.shape[0] != 1):
        raise ValueError(f"image_embeds must be (1, tokens, dim), got {_shape(embeds)}")
    for site in header["sites"]:
        shapes = set()
        for timestep in header["timesteps"]:
            for name in FEATURES_BY_KIND[header["kind"]]:
                tensor = tensors.get(f"{site}/{timestep}/{name}")
                if tensor is None or tensor.ndim != 4 or tensor.shape[0] != 1 or min(tensor.shape) < 1:
                    raise ValueError(
                        f"{site}/{timestep}/{name} must be (1, heads, tokens, head_dim), got {_shape(tensor)}"
                    )
                shapes.add(tuple(tensor.shape))
        if len(shapes) > 1:
            raise ValueError(f"the features of {site} differ in shape: {sorted(shapes)}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or infinite values")


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _shape(tensor: torch.Tensor | None) -> str:
    return "nothing" if tensor is None else str(tuple(tensor.shape))


def check_flow_schedule(extra: dict[str, str], expected: dict[str, str], label: str = "style cache") -> None:
    """Refuse (InputError) an MM-DiT cache recorded along another schedule or by another method.

    ``extra`` is the cache header's, ``expected`` this run's (``editkit.flow_style_loop.schedule_extra``):
    the feature timing and the exact sigmas (steps, shift, and FLUX's size-dependent ``mu``).
    """
    if extra.get("feature_timing") != expected["feature_timing"]:
        raise InputError(
            f"{label} was not recorded by the MM-DiT style transfer (feature timing "
            f"{extra.get('feature_timing', 'none')!r}); recompute it with this model"
        )
    if extra.get("schedule") != expected["schedule"]:
        made, needed = (_sigma_summary(text) for text in (extra.get("schedule"), expected["schedule"]))
        raise InputError(
            f"{label} was made along another schedule ({made}); this run's is {needed}: recompute it with "
            "the same steps and content size (FLUX's shift depends on the image size)"
        )


def _sigma_summary(text: str | None) -> str:
    """``"N steps, sigma a..b"`` of a cache's schedule field (or ``"unknown"``)."""
    try:
        sigmas = [float(s) for s in parse_json(text, "the schedule")] if text else []
    except (InputError, TypeError, ValueError):
        sigmas = []
    if len(sigmas) < 2:
        return "unknown"
    return f"{len(sigmas) - 1} steps, sigmas {sigmas[0]:.4g}..{sigmas[-2]:.4g}"
