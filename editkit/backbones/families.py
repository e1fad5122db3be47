"""Model families editkit supports, and recognising one from a model, a folder index or checkpoint keys.

A family is what the method code needs to know about a model: its denoiser (UNet or MM-DiT
transformer), its text encoders and its diffusers pipeline. ``sd`` (SD 1.x/2.x) and ``sdxl`` are
UNets; ``sd3`` (SD3 and SD3.5, one transformer class: SD3.5 adds q/k norms and, in Medium, an
image-only ``attn2``) and ``flux`` (FLUX.1 dev/schnell) are MM-DiT transformers.

Recognition never loads weights: an object by its denoiser's class and config, a diffusers folder
or cached Hub repo by its ``model_index.json`` (and ``unet/config.json``), a single-file
checkpoint by the names of its tensors (diffusers' own ``CHECKPOINT_KEY_NAMES`` sentinels, read
from the safetensors header).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from editkit.errors import ModelLoadError

__all__ = [
    "FAMILIES",
    "MMDIT_FAMILIES",
    "SUPPORTED_FAMILIES",
    "UNET_FAMILIES",
    "Family",
    "family_of_checkpoint",
    "family_of_index",
    "family_of_model",
    "missing_components",
    "supported_families",
]


@dataclass(frozen=True)
class Family:
    """One supported model family: its name, what users call it, its denoiser and diffusers pipeline."""

    name: str
    label: str
    denoiser: str
    pipeline: str
    required: tuple[str, ...]  # components a folder must have (others may be null in model_index.json)


_UNET = ("unet", "vae", "scheduler")
_MMDIT = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
FAMILIES = {
    family.name: family
    for family in (
        Family("sd", "Stable Diffusion 1.x/2.x", "UNet2DConditionModel", "StableDiffusionPipeline",
               (*_UNET, "text_encoder", "tokenizer")),
        # the SDXL refiner has only the second text encoder
        Family("sdxl", "Stable Diffusion XL", "UNet2DConditionModel", "StableDiffusionXLPipeline",
               (*_UNET, "text_encoder_2", "tokenizer_2")),
        # SD3 runs without T5 (text_encoder_3=None), as diffusers allows
        Family("sd3", "Stable Diffusion 3 / 3.5", "SD3Transformer2DModel", "StableDiffusion3Pipeline", _MMDIT),
        Family("flux", "FLUX.1", "FluxTransformer2DModel", "FluxPipeline", _MMDIT),
    )
}  # fmt: skip
UNET_FAMILIES = ("sd", "sdxl")
MMDIT_FAMILIES = ("sd3", "flux")
SUPPORTED_FAMILIES = "editkit supports Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5 and FLUX.1 pipelines"
_TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: diffusers' single-file model types (``infer_diffusers_model_type``'s names) per family.
_CHECKPOINT_SENTINELS = (
    ("flux", ("flux",)),
    ("sd3", ("sd3", "sd35_large")),
    ("sdxl", ("xl_base",)),
    ("sd", ("v1", "v2")),
)
_UNSUPPORTED_SENTINELS = ("flux2", "flux3", "xl_refiner", "playground-v2-5", "chroma")


def supported_families() -> list[str]:
    """One line per family: its name, what users call it and the diffusers pipeline that loads it
    (``"flux: FLUX.1 (FluxPipeline)"``), for ``editkit env``; :data:`FAMILIES` has the fields."""
    return [f"{f.name}: {f.label} ({f.pipeline})" for f in FAMILIES.values()]


def family_of_model(model: Any) -> str:
    """The family of a pipeline, UNet or transformer (``torch.compile`` wrappers seen through).

    ModelLoadError names the class for anything else (a PixArt transformer, a Kandinsky UNet).
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from editkit.attention import uncompiled

    denoiser = model
    for name in ("unet", "transformer"):  # no truth tests: a compiled module refuses len()
        if getattr(model, name, None) is not None:
            denoiser = getattr(model, name)
            break
    denoiser = uncompiled(denoiser)
    if isinstance(denoiser, SD3Transformer2DModel):
        return "sd3"
    if isinstance(denoiser, FluxTransformer2DModel):
        return "flux"
    if not isinstance(denoiser, UNet2DConditionModel):
        raise ModelLoadError(f"unsupported model family: {type(model).__name__}; {SUPPORTED_FAMILIES}")
    return _unet_family(denoiser.config.get("addition_embed_type"), type(model).__name__)


def _unet_family(addition_embed_type: str | None, name: str) -> str:
    if addition_embed_type == "text_time":
        return "sdxl"
    if addition_embed_type is None:
        return "sd"
    raise ModelLoadError(
        f"unsupported model family: {name} (UNet conditioning {addition_embed_type!r}); {SUPPORTED_FAMILIES}"
    )


def family_of_index(index: Any, where: str, unet_config: Any = None) -> str:
    """The family named by a ``model_index.json`` (``where`` names it in errors).

    A transformer component decides SD3 / FLUX; a UNet one decides SD / SDXL by its
    ``addition_embed_type`` when ``unet_config`` is a dict, else by the presence of a second text
    encoder. Anything else (PixArt, Kandinsky, ...) is a ModelLoadError naming the pipeline class.
    """
    if not isinstance(index, dict):
        raise ModelLoadError(f"{where} is not a JSON object, so not a diffusers model index")
    name = str(index.get("_class_name", "unknown"))
    transformer = _component_class(index.get("transformer"))
    if transformer is not None:
        if transformer in _TRANSFORMER_FAMILIES:
            return _TRANSFORMER_FAMILIES[transformer]
        raise ModelLoadError(f"unsupported model family: {name} (transformer {transformer}); {SUPPORTED_FAMILIES}")
    if _component_class(index.get("unet")) is None:
        raise ModelLoadError(
            f"unsupported model family: {name} (no unet or transformer in {where}); {SUPPORTED_FAMILIES}"
        )
    if isinstance(unet_config, dict):
        return _unet_family(unet_config.get("addition_embed_type"), name)
    return "sdxl" if _component_class(index.get("text_encoder_2")) else "sd"


def _component_class(entry: Any) -> str | None:
    """The class name of a model_index.json component entry ``[library, class]`` (None when null/absent)."""
    if isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def missing_components(folder: Path, index: dict, family: str) -> list[str]:
    """Components of a diffusers folder that are listed without a subfolder, or required but null/absent.

    Required are :attr:`Family.required`; any other component may be null (a safety checker, SD3's
    T5, the second text encoder of an editkit pipeline saved with SD weights).
    """
    required = FAMILIES[family].required
    missing = [name for name in required if _component_class(index.get(name)) is None]
    for name, entry in index.items():
        listed = not name.startswith("_") and _component_class(entry) is not None and entry[0] is not None
        if listed and name not in missing and _empty(folder / name):
            missing.append(name)
    return missing


def _empty(folder: Path) -> bool:
    return not folder.is_dir() or not any(folder.iterdir())


def family_of_checkpoint(path: Path) -> str:
    """The family of a single-file ``.safetensors`` checkpoint, from its tensor names (no weights read).

    Uses diffusers' ``CHECKPOINT_KEY_NAMES`` (the keys its ``from_single_file`` recognises models by),
    with or without the ``model.diffusion_model.`` prefix of full checkpoints.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path} is not a readable safetensors checkpoint ({error})") from None
    return _family_of_keys(keys, path)


def _family_of_keys(keys: set[str], path: Path) -> str:
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    def present(model_type: str) -> bool:
        return any(key in keys for key in _as_list(CHECKPOINT_KEY_NAMES.get(model_type)))

    for model_type in _UNSUPPORTED_SENTINELS:
        if present(model_type):
            raise ModelLoadError(
                f"{path}: a {model_type} checkpoint, an unsupported model family; {SUPPORTED_FAMILIES}"
            )
    for family, model_types in _CHECKPOINT_SENTINELS:
        if any(present(model_type) for model_type in model_types):
            return family
    raise ModelLoadError(
        f"{path}: no Stable Diffusion, SD3 or FLUX.1 weights recognised in this safetensors file "
        f"(e.g. a LoRA, a VAE or another model); {SUPPORTED_FAMILIES}"
    )


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_index(folder: Path) -> dict:
    """A diffusers folder's parsed ``model_index.json`` (ModelLoadError when absent or unreadable)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder; pass a folder "
            "written by save_pretrained or a .safetensors checkpoint"
        )
    return read_json(index_file)


def read_json(path: Path) -> Any:
    """A small JSON file (a config or model index) parsed, ModelLoadError naming it when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None
