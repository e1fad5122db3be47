"""The pipeline class of each task, and loading one with editkit's switches (the only place that
imports ``pipelines/``; ruff's TID251 rule keeps the CLI and the app from doing it)."""

from __future__ import annotations

import os
from typing import Any

from editkit.errors import EditkitError

__all__ = ["TASKS", "load_task_pipeline", "pipeline_class", "soft_token_controllers", "text_to_image_class"]

#: Task name -> title. ``generate`` is the model family's plain text-to-image pipeline.
TASKS = {
    "stylize": "style transfer",
    "edit": "contrastive editing",
    "compose": "compositional generation",
    "generate": "soft-token generation",
}


def pipeline_class(task: str) -> type:
    """The pipeline class of ``task`` (``stylize``, ``edit``, ``compose``); imported on first use."""
    try:
        if task == "stylize":
            from pipelines.style_transfer import StyleTransferPipeline

            return StyleTransferPipeline
        if task == "edit":
            from pipelines.contrastive_edit import ContrastiveEditPipeline

            return ContrastiveEditPipeline
        if task == "compose":
            from pipelines.compose import ComposePipeline

            return ComposePipeline
    except ImportError as error:
        raise EditkitError(f"{TASKS[task]} is not available in this install ({error})") from None
    raise KeyError(task)


def text_to_image_class(pipe_or_model: Any) -> type:
    """diffusers' text-to-image class: of a loaded pipeline's family, or for a model path/id."""
    import diffusers

    if isinstance(pipe_or_model, (str, os.PathLike)):
        from editkit.softrepa.train import text_to_image_class as for_model

        return for_model(pipe_or_model)
    from editkit.models import model_family

    sdxl = model_family(pipe_or_model) == "sdxl"
    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


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
    ``compile_mode`` (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``) torch.compiles the UNet."""
    from editkit.models import load_pipeline

    cls = text_to_image_class(model) if task == "generate" else pipeline_class(task)
    pipe = load_pipeline(cls, model, device=device, dtype=dtype)
    if attention == "xformers":  # on editkit pipelines this selects editkit's kernel
        pipe.enable_xformers_memory_efficient_attention()
    if compile_mode:
        from editkit.acceleration import compile_unet

        compile_unet(pipe.unet, mode=None if compile_mode == "default" else compile_mode)
    return pipe


def soft_token_controllers(pipe: Any, path: str | os.PathLike | None, strength: float = 1.0) -> list:
    """The controllers of a SoftREPA token file (empty without one), to pass as ``attention_controllers``."""
    if not path:
        return []
    from editkit.softrepa import load_soft_tokens

    return [load_soft_tokens(path, unet=pipe.unet, strength=strength)]
