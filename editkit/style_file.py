"""The style cache (:class:`StyleCache`) and its file format: reading a ``.safetensors`` style cache and
checking every field.

A style cache file is a safetensors file whose metadata key
:data:`CACHE_METADATA_KEY` holds a JSON header (format, kind, model fingerprint, model family,
size, steps, sites, timesteps) and whose tensors are ``final_latent`` (1, channels, h, w), optionally
``image_embeds``, and one ``(1, heads, tokens, head_dim)`` tensor per ``site/timestep/feature``.
:func:`read_cache_file` is the one place a file is checked: a crafted header (nested deep, a
list or null, a non-finite number, a field of the wrong type) or a tensor of the wrong shape or
with non-finite values is an :class:`~editkit.errors.InputError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from editkit.backbones.families import FAMILIES
from editkit.errors import InputError
from editkit.jsonio import parse_json
from editkit.safefiles import is_pickle

if TYPE_CHECKING:
    from editkit.style import FeatureRecorder

__all__ = [
    "CACHE_FORMAT",
    "CACHE_METADATA_KEY",
    "FEATURES_BY_KIND",
    "FEATURE_TIMINGS",
    "StyleCache",
    "check_feature_timing",
    "check_flow_schedule",
    "read_cache_file",
]

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


# -- the style cache -----------------------------------------------------------------------------
@dataclass
class StyleCache:
    """An image's recorded attention features and inverted start latent, reusable across runs.

    ``kind="style"`` holds keys/values, ``kind="content"`` queries, per (site, timestep) as
    ``(1, heads, tokens, head_dim)`` tensors. ``final_latent`` is the inverted latent at the first
    generation timestep (for AdaIN and, for a content, the start of generation). ``size`` is the
    image's (width, height) in pixels; ``model`` a ``model_fingerprint``.
    """

    kind: str
    features: dict[tuple[str, int], dict[str, torch.Tensor]]
    final_latent: torch.Tensor
    model: str
    size: tuple[int, int]
    num_inference_steps: int
    resample_steps: int
    sites: tuple[str, ...]
    timesteps: tuple[int, ...]
    model_name: str = ""
    family: str = ""  # "sd", "sdxl", "sd3", "flux" (editkit.models.model_family); "" in older caches
    image_embeds: torch.Tensor | None = None  # CLIP image embedding (1, 1, dim), when an IP-Adapter was used
    extra: dict[str, str] = field(default_factory=dict)

    def feature(self, site: str, timestep: int, name: str) -> torch.Tensor:
        """The recorded ``name`` (query/key/value) at ``site`` and ``timestep``."""
        return self.features[(site, int(timestep))][name]

    def nbytes(self) -> int:
        """Bytes of the recorded attention features (the start latent excluded)."""
        return sum(t.numel() * t.element_size() for rec in self.features.values() for t in rec.values())

    def header(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "kind": self.kind,
            "model": self.model,
            "model_name": self.model_name,
            "family": self.family,
            "size": list(self.size),
            "num_inference_steps": self.num_inference_steps,
            "resample_steps": self.resample_steps,
            "sites": list(self.sites),
            "timesteps": list(self.timesteps),
            "features": list(FEATURES_BY_KIND[self.kind]),
            "extra": self.extra,
        }

    def check_family(self, family: str | None, label: str = "style cache") -> None:
        """Refuse (InputError) a cache made on another model family; ``family=None`` or a cache without one passes.

        Separate from :meth:`validate` so the CLI can refuse it from the model's index, before the model loads."""
        if family is not None and self.family and self.family != family:
            raise InputError(
                f"{label} was made on a {self.family} model ({self.model_name or '?'}), this is a {family} model: "
                "attention features do not transfer between model families; recompute the cache with this model"
            )

    def validate(
        self,
        *,
        kind: str,
        model: str,
        sites: Sequence[str],
        timesteps: Sequence[int],
        size: tuple[int, int] | None = None,
        label: str = "style cache",
        family: str | None = None,
    ) -> None:
        """Refuse (InputError, one line) a cache made for another family, model, size, site set or schedule."""
        if self.kind != kind:
            raise InputError(f"{label} holds {self.kind} features, a {kind} cache is needed")
        self.check_family(family, label)
        if self.model != model:
            raise InputError(
                f"{label} was made with another model ({self.model_name or '?'}, fingerprint {self.model}); "
                f"this model's fingerprint is {model}: recompute the cache with this model"
            )
        if size is not None and tuple(size) != tuple(self.size):
            raise InputError(
                f"{label} was made at {self.size[0]}x{self.size[1]} px, this run needs {size[0]}x{size[1]}: "
                "recompute it (or use the size it was made at)"
            )
        missing_sites = sorted(set(sites) - set(self.sites))
        if missing_sites:
            raise InputError(f"{label} lacks the attention sites {missing_sites[:3]}{'...' * (len(missing_sites) > 3)}")
        missing_steps = sorted(set(int(t) for t in timesteps) - set(self.timesteps))
        if missing_steps:
            raise InputError(
                f"{label} was made with {self.num_inference_steps} steps and lacks timesteps {missing_steps[:5]}; "
                "use the same number of steps and injection window"
            )

    def to(self, device: str | torch.device) -> StyleCache:
        """A copy with every tensor on ``device``."""
        features = {k: {n: t.to(device) for n, t in rec.items()} for k, rec in self.features.items()}
        embeds = None if self.image_embeds is None else self.image_embeds.to(device)
        latent = self.final_latent.to(device)
        return dataclasses.replace(self, features=features, final_latent=latent, image_embeds=embeds)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically to a ``.safetensors`` file with the header in its metadata."""
        from editkit.atomic import save_safetensors

        tensors = {"final_latent": self.final_latent.detach().cpu().contiguous()}
        if self.image_embeds is not None:
            tensors["image_embeds"] = self.image_embeds.detach().cpu().contiguous()
        for (site, timestep), record in self.features.items():
            for name, tensor in record.items():
                tensors[f"{site}/{timestep}/{name}"] = tensor.detach().cpu().contiguous()
        metadata = {CACHE_METADATA_KEY: json.dumps(self.header())}
        return save_safetensors(path, tensors, metadata=metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> StyleCache:
        """Read a cache written by ``save``; a missing, foreign or corrupt file raises InputError."""
        path = Path(path).expanduser()
        header, tensors = read_cache_file(path)
        try:
            return cls._from_parts(header, tensors, device)
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"{path} is not a valid editkit style cache ({error})") from None

    @classmethod
    def _from_parts(cls, header: dict, tensors: dict[str, torch.Tensor], device) -> StyleCache:
        if header.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {CACHE_FORMAT!r}")
        kind = header["kind"]
        names = FEATURES_BY_KIND[kind]
        sites, timesteps = tuple(header["sites"]), tuple(int(t) for t in header["timesteps"])
        features = {
            (site, t): {name: tensors[f"{site}/{t}/{name}"].to(device) for name in names}
            for site in sites
            for t in timesteps
        }
        return cls(
            kind=kind,
            features=features,
            final_latent=tensors["final_latent"].to(device),
            model=str(header["model"]),
            size=(int(header["size"][0]), int(header["size"][1])),
            num_inference_steps=int(header["num_inference_steps"]),
            resample_steps=int(header["resample_steps"]),
            sites=sites,
            timesteps=timesteps,
            model_name=str(header.get("model_name", "")),
            family=str(header.get("family", "")),
            image_embeds=tensors["image_embeds"].to(device) if "image_embeds" in tensors else None,
            extra=dict(header.get("extra", {})),
        )

    @classmethod
    def from_recorder(cls, recorder: FeatureRecorder, final_latent: torch.Tensor, **header) -> StyleCache:
        """Wrap a finished recording (``header``: kind, model, size, steps, resample_steps, sites, timesteps)."""
        return cls(features=dict(recorder.records), final_latent=final_latent.detach().contiguous(), **header)


#: Where the features of step t are recorded: the inversion's own call UNet(z_{t-1}, t), or UNet(z_t, t).
FEATURE_TIMINGS = ("inversion_step", "inverted_latent")


def check_feature_timing(cache: StyleCache, feature_timing: str, label: str) -> None:
    """Refuse a cache recorded with the other ``feature_timing`` (older caches: inversion_step)."""
    recorded = cache.extra.get("feature_timing", "inversion_step")
    if recorded != feature_timing:
        raise InputError(f"{label} was recorded with feature_timing={recorded!r}, this run uses {feature_timing!r}")
