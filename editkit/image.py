"""The only image I/O helpers of editkit: load, normalise, resize, convert and save.

Loading is defensive: the pixel count is checked from the header before any decoding, files are
fully decoded (so truncated data fails here, not deep inside a pipeline), EXIF orientation is
applied and every PIL mode is turned into 8-bit RGB. Problems the user can fix raise
:class:`~editkit.errors.InputError` with a one-line message naming the file. Saving is atomic
(:func:`editkit.atomic.atomic_write`, re-exported here): a temporary file next to the target is
renamed into place, so an interrupted save never leaves a partial file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from editkit.atomic import atomic_write
from editkit.errors import InputError

__all__ = [
    "atomic_write",
    "check_mask_aspect",
    "fit_mask",
    "fit_size",
    "latent_edit_region",
    "load_image",
    "load_mask",
    "mask_coverage",
    "pil_to_tensor",
    "read_mask_image",
    "resize_to",
    "save_image",
    "tensor_to_pil",
]

logger = logging.getLogger(__name__)

ImageInput = str | os.PathLike | Image.Image
DEFAULT_MAX_PIXELS = 4096 * 4096
MIN_SIDE = 8  # pixels; smaller images cannot hold one latent pixel
MAX_ASPECT = 64  # longer side / shorter side
SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def load_image(path_or_image: ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load a path or PIL image as 8-bit RGB, oriented by its EXIF tag, alpha composited on white.

    ``max_pixels`` bounds width * height; it is checked from the header before decoding. PIL's own
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, never changed here) applies as well.
    """
    return _to_rgb(_read(path_or_image, max_pixels), _name(path_or_image))


def read_mask_image(path_or_image: ImageInput) -> Image.Image:
    """A mask as 8-bit grayscale at its own size: its non-uniform alpha channel, else its luminance."""
    return _mask_channel(_read(path_or_image, DEFAULT_MAX_PIXELS), _name(path_or_image))


def load_mask(path_or_image: ImageInput, size: tuple[int, int], *, threshold: float = 0.5) -> torch.Tensor:
    """Load a mask as a (1, 1, height, width) float tensor of 0s and 1s; ``size`` is (width, height).

    The mask is the alpha channel when the image has a non-uniform one, its luminance otherwise;
    it is resized to ``size`` with Lanczos filtering and thresholded (``value >= threshold`` is 1),
    as diffusers' mask processor (``VaeImageProcessor(do_binarize=True)``) does with PIL masks.
    Empty masks are returned as they are: check :func:`mask_coverage`.
    """
    if not 0.0 < threshold <= 1.0:
        raise InputError(f"mask threshold must be in (0, 1], got {threshold}")
    name = _name(path_or_image)
    gray = _mask_channel(_read(path_or_image, DEFAULT_MAX_PIXELS), name)
    values = np.asarray(gray)
    if not np.isin(values, (0, 255)).all():
        warnings.warn(f"mask {name} is not binary; thresholded at {threshold}", stacklevel=2)
    if gray.size != tuple(size):
        warnings.warn(f"mask {name} is {gray.width}x{gray.height}, resized to {size[0]}x{size[1]}", stacklevel=2)
        gray = gray.resize(tuple(size), Image.Resampling.LANCZOS)
    binary = np.asarray(gray, dtype=np.float32) / 255.0 >= threshold
    return torch.from_numpy(binary.astype(np.float32))[None, None]


def check_mask_aspect(mask_size: tuple[int, int], image_size: tuple[int, int], name: str = "mask") -> None:
    """Refuse a mask (width, height) whose aspect ratio is not the image's; a mask that is the image
    scaled, each side rounded to a whole pixel, passes (|mw * h - mh * w| <= (w + h) / 2)."""
    (mw, mh), (w, h) = mask_size, image_size
    if abs(mw * h - mh * w) > max(w + h, mw + mh) / 2:
        raise InputError(
            f"{name} is {mw}x{mh} but the image is {w}x{h}: a mask needs the image's size or at least its aspect ratio"
        )


def fit_mask(mask: torch.Tensor, size: tuple[int, int], *, threshold: float = 0.5) -> torch.Tensor:
    """A (batch, 1, h, w) mask tensor resized to ``size`` = (height, width) as diffusers' mask processor
    does with tensors (nearest interpolation, then 0/1 at ``threshold``); another aspect ratio raises."""
    height, width = size
    check_mask_aspect((mask.shape[-1], mask.shape[-2]), (width, height))
    if tuple(mask.shape[-2:]) != (height, width):
        mask = torch.nn.functional.interpolate(mask.float(), size=(height, width))
    return (mask >= threshold).to(mask.dtype)


def mask_coverage(mask: torch.Tensor) -> float:
    """Fraction of mask pixels that are set (> 0.5): 0.0 for an empty mask, 1.0 for a full one."""
    return float((mask > 0.5).float().mean()) if mask.numel() else 0.0


def fit_size(
    width: int, height: int, *, multiple: int = 8, max_side: int | None = None, target: int | None = None
) -> tuple[int, int]:
    """Scale (width, height) keeping the aspect ratio, then round each side to a multiple.

    ``target`` is the new length of the longer side (None keeps the size), ``max_side`` caps both
    sides; each side is rounded to the nearest multiple of ``multiple`` and is at least ``multiple``.
    """
    if width < 1 or height < 1 or multiple < 1:
        raise InputError(f"invalid size {width}x{height} or multiple {multiple}")
    if max_side is not None and max_side < multiple:
        raise InputError(f"max_side {max_side} is smaller than the size multiple {multiple}")
    scale = 1.0 if target is None else target / max(width, height)
    if max_side is not None:
        scale = min(scale, max_side / max(width, height))
    limit = math.inf if max_side is None else (max_side // multiple) * multiple

    def _round(side: float) -> int:
        return int(min(limit, max(multiple, math.floor(side / multiple + 0.5) * multiple)))

    return _round(width * scale), _round(height * scale)


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` = (width, height) with Lanczos filtering (a no-op when already that size)."""
    size = (int(size[0]), int(size[1]))
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def pil_to_tensor(images: Image.Image | Sequence[Image.Image], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack same-size images into a (batch, 3, height, width) tensor in [-1, 1]."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise InputError("pil_to_tensor needs at least one image")
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise InputError(f"images in a batch must share one size, got {sorted(sizes)}")
    arrays = [np.asarray(_to_rgb(image, "image"), dtype=np.float32) for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (batch, 3, height, width)
    return (batch / 127.5 - 1.0).to(dtype)


def tensor_to_pil(tensor: torch.Tensor) -> list[Image.Image]:
    """Convert a (batch, 3 or 1, height, width) or (3 or 1, height, width) tensor in [-1, 1] to images."""
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise InputError(f"expected a (batch, 3, height, width) tensor, got shape {tuple(tensor.shape)}")
    pixels = ((tensor.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()  # (batch, height, width, channels)
    if pixels.shape[-1] == 1:
        return [Image.fromarray(array[..., 0]) for array in pixels]  # mode L
    return [Image.fromarray(array) for array in pixels]  # mode RGB


def save_image(
    image: Image.Image,
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save atomically as PNG, JPEG or WebP (by extension); ``metadata`` goes into PNG text chunks."""
    path = Path(path).expanduser()
    image_format = SAVE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise InputError(f"cannot save {path}: use a .png, .jpg or .webp file name")
    options: dict = {}
    if metadata and image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(str(key), str(value))
        options["pnginfo"] = info
    elif metadata:
        warnings.warn(f"metadata is stored in PNG files only; not written to {path.name}", stacklevel=2)
    if image_format == "JPEG" and image.mode not in ("RGB", "L"):
        image = _to_rgb(image, str(path))
    return atomic_write(path, lambda tmp: image.save(tmp, format=image_format, **options), overwrite=overwrite)


def _name(path_or_image: ImageInput) -> str:
    return "image" if isinstance(path_or_image, Image.Image) else str(path_or_image)


def _read(path_or_image: ImageInput, max_pixels: int) -> Image.Image:
    """Check, fully decode and orient an image (first frame); its mode is left as it is."""
    if isinstance(path_or_image, Image.Image):
        _check_size(path_or_image, "image", max_pixels)
        _decode(path_or_image, "image")
        return _orient(path_or_image, "image")
    path = Path(path_or_image).expanduser()
    with _open(path) as image:
        _check_size(image, str(path), max_pixels)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            warnings.warn(f"{path} has {frames} frames; using the first", stacklevel=3)
        _decode(image, str(path))
        return _orient(image, str(path))


def _open(path: Path) -> Image.Image:
    """Open (lazily) an image file, turning every failure into an InputError naming the file."""
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image PIL can read; use PNG, JPEG or WebP") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{path} exceeds PIL's decompression-bomb pixel limit; downscale it") from None
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror or error}") from None


def _check_size(image: Image.Image, name: str, max_pixels: int) -> None:
    """Refuse images over ``max_pixels`` or of a degenerate size, from the header (before decoding)."""
    width, height = image.size
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}; downscale it"
        )
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise InputError(
            f"{name} has a degenerate size {width}x{height} (sides must be >= {MIN_SIDE} px "
            f"and the aspect ratio at most {MAX_ASPECT}:1)"
        )


def _decode(image: Image.Image, name: str) -> None:
    """Decode all pixel data now, so truncated or corrupt files fail here."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{name} is truncated or corrupt ({error}); re-export or replace it") from None


def _orient(image: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag; returns a new image detached from the file."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError) as error:  # a broken EXIF block
        logger.warning("ignoring the unreadable EXIF orientation of %s: %s", name, error)
        return image.copy()


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha over white, integers and floats scaled to 0..255."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode.startswith(("I", "F")):
        return _scale_to_8bit(image, name).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise InputError(f"{name} has the unsupported color mode {image.mode}; save it as RGB") from None


def _scale_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """Scale a 16/32-bit integer or float image to 8-bit grayscale without clipping.

    16-bit modes and 32-bit integers within 0..65535 are 16-bit data (divided by 257: 65535 -> 255);
    floats within 0..1 are multiplied by 255; other ranges are stretched from min..max, with a warning.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I") and low >= 0 and high <= 65535:
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        warnings.warn(f"{name}: pixel values {low:g}..{high:g} stretched to 0..255", stacklevel=4)
        scaled = (values - low) / max(high - low, 1e-12) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))  # mode L


def _mask_channel(image: Image.Image, name: str) -> Image.Image:
    """The mask as 8-bit grayscale: a non-uniform alpha channel, else the luminance."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        low, high = alpha.getextrema()
        if low != high:
            return alpha
        image = image.convert("RGBA").convert("RGB")
    return _to_rgb(image, name).convert("L")


def latent_edit_region(mask, size: tuple[int, int], latents: torch.Tensor) -> torch.Tensor | None:
    """A {0, 1} edit mask at the image's ``size`` (or its aspect ratio) -> the ``(batch, 1, h, w)`` latent
    mask of ``latents`` (a latent cell is in if any of its pixels is); None stays None.

    PIL masks are read as luminance; a mask of another size is resized as diffusers' mask processor
    does (:func:`fit_mask`). InputError for another shape, non-binary values or an empty mask."""
    import torch.nn.functional as F

    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    mask = torch.as_tensor(mask, dtype=torch.float32)
    mask = mask.reshape(1, 1, *mask.shape[-2:]) if mask.ndim in (2, 3) else mask
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise InputError(f"mask must be (height, width) or (batch, 1, height, width), got {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = fit_mask(mask, size)
    if not ((mask == 0) | (mask == 1)).all():
        raise InputError("mask must be binary (0 and 1 only)")
    if not mask.any():
        raise InputError("mask must be not empty: it selects nothing to edit")
    region = F.adaptive_max_pool2d(mask, latents.shape[-2:])
    return region.to(latents.device).expand(latents.shape[0], -1, -1, -1)
