"""The pipeline class of each task, and loading one with editkit's switches (the only place that
imports ``pipelines/``; ruff's TID251 rule keeps the CLI and the app from doing it)."""

from __future__ import annotations

import os
from typing import Any

from editkit.errors import EditkitError

__all__ = [
    "PIPELINES",
    "TASKS",
    "load_task_pipeline",
    "pipeline_class",
    "soft_token_controllers",
    "text_to_image_class",
]

#: Task name -> title. ``generate`` is the model family's plain text-to-image pipeline.
TASKS = {
    "stylize": "style transfer",
    "edit": "contrastive editing",
    "compose": "compositional generation",
    "generate": "soft-token generation",
}


#: (task, family) -> "module:Class" of its pipeline. UNet families share one class per task; the
#: MM-DiT families get thin per-family classes (``shared/design/mmdit.md``).
PIPELINES: dict[tuple[str, str], str] = {
    **{("stylize", f): "pipelines.style_transfer:StyleTransferPipeline" for f in ("sd", "sdxl")},
    **{("edit", f): "pipelines.contrastive_edit:ContrastiveEditPipeline" for f in ("sd", "sdxl")},
    **{("compose", f): "pipelines.compose:ComposePipeline" for f in ("sd", "sdxl")},
    ("stylize", "sd3"): "pipelines.flow_style_transfer:SD3StyleTransferPipeline",
    ("stylize", "flux"): "pipelines.flow_style_transfer:FluxStyleTransferPipeline",
    ("edit", "sd3"): "pipelines.flow_edit:SD3ContrastiveEditPipeline",
    ("edit", "flux"): "pipelines.flow_edit:FluxContrastiveEditPipeline",
    ("compose", "sd3"): "pipelines.flow_compose:SD3ComposePipeline",
    ("compose", "flux"): "pipelines.flow_compose:FluxComposePipeline",
}


def pipeline_class(task: str, family: str | None = None) -> type:
    """The pipeline class of ``task`` (``stylize``, ``edit``, ``compose``) for a model ``family``
    (``sd``, ``sdxl``, ``sd3``, ``flux``; None: the UNet class); imported on first use."""
    import importlib

    from editkit.backbones.families import FAMILIES

    if task not in TASKS or task == "generate":
        raise KeyError(task)
    family = family or "sd"
    if family not in FAMILIES:
        raise EditkitError(f"unknown model family {family!r}; editkit knows {', '.join(FAMILIES)}")
    target = PIPELINES.get((task, family))
    label = FAMILIES[family].label
    if target is None:
        raise EditkitError(f"{TASKS[task]} does not run on {label} models yet")
    module_name, class_name = target.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise EditkitError(f"{TASKS[task]} on {label} models is not available in this install ({error})") from None


def text_to_image_class(pipe_or_model: Any) -> type:
    """diffusers' text-to-image class: of a loaded pipeline's family, or for a model path/id."""
    import diffusers

    if isinstance(pipe_or_model, (str, os.PathLike)):
        from editkit.softrepa.train import text_to_image_class as for_model

        return for_model(pipe_or_model)
    from editkit.models import model_family

    family = model_family(pipe_or_model)
    classes = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
               "flux": diffusers.FluxPipeline}  # fmt: skip
    return classes.get(family, diffusers.StableDiffusionPipeline)


def load_task_pipeline(
    task: str,
    model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    attention: str = "sdpa",
    compile_mode: str | None = None,
) -> Any:
    """Load ``task``'s pipeline; ``attention="xformers"`` picks editkit's xformers kernel,
    ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``) torch.compiles the UNet
    (the transformer of an MM-DiT); the pipeline class follows the model's family (:data:`PIPELINES`)."""
    from editkit.models import load_pipeline, model_source_family

    cls = text_to_image_class(model) if task == "generate" else pipeline_class(task, model_source_family(model))
    pipe = load_pipeline(cls, model, device=device, dtype=dtype)
    if attention == "xformers":  # on editkit pipelines this selects editkit's kernel
        pipe.enable_xformers_memory_efficient_attention()
    if compile_mode:
        from editkit.acceleration import compile_unet

        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        compile_unet(denoiser, mode=None if compile_mode == "default" else compile_mode)
    return pipe


def check_soft_tokens_source(path: str | os.PathLike | None, model: str | os.PathLike) -> None:
    """Refuse a token file trained on another family than ``model``'s, from the model's index, before it loads.

    A no-op without a file, or for a Hub repo not cached yet (:func:`soft_token_controllers` checks the
    loaded model in any case). The file itself is read and checked whole (it is small).
    """
    if not path:
        return
    from editkit.models import model_source_family
    from editkit.softrepa import check_token_family, read_soft_tokens

    family = model_source_family(model)
    if family is not None:
        check_token_family(read_soft_tokens(path), family, path)


def soft_token_controllers(pipe: Any, path: str | os.PathLike | None, strength: float = 1.0) -> list:
    """The controllers of a SoftREPA token file (empty without one), to pass as ``attention_controllers``."""
    if not path:
        return []
    from editkit.softrepa import load_soft_tokens

    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    return [load_soft_tokens(path, model=denoiser, strength=strength)]
