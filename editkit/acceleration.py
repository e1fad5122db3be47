"""Fast paths that keep working with editkit's attention layer: compile, channels_last, memory savers.

- ``compile_unet``: ``torch.compile`` of the UNet *in place* (``nn.Module.compile``), so the module
  object, its ``attn_processors`` and ``attach`` keep working. editkit's processor traces without a
  graph break: the identity controller, ``CrossAttentionMapStore`` and SoftREPA's token controller
  give one graph for the whole UNet, and a new ``attach`` (new processor objects, same classes) reuses
  it. Controllers with per-step state (``StyleInjectionController``, the q/k/v and feature
  recorders, SoftREPA's time tokens) set it up in ``begin_step`` and read no Python timestep in
  their hooks, so the compiled UNet keeps its graphs from step to step (a 12-step stylize, compose
  stage 1 or soft-token generation and 3 edit iterations: at most 2 graphs each;
  ``python -m benchmarks.compile_graphs``). Compose's guided passes, which stop early by raising when
  eager, run whole under compile; ``recompile_limit`` raises dynamo's limit (8).
  diffusers' recipe ``pipe.unet = torch.compile(pipe.unet)`` works too (``attach`` and
  ``model_family`` see through the wrapper).
- ``to_channels_last``: NHWC convolutions (faster on recent GPUs with fp16/bf16).
- ``enable_memory_savers``: diffusers' model CPU offload (accelerate; needs an accelerator), VAE
  tiling (large images: the VAE works on overlapping tiles) and VAE slicing (one image at a time).
- ``graph_breaks``: ``torch._dynamo.explain`` summary, to check a controller before compiling.
- ``frozen_weights``: a module's weights out of autograd for a guidance pass that differentiates
  with respect to the latents only (no weight edges in the graph, no inputs saved for weight
  gradients), the flags restored after.

Attention chunking on the explicit-probability path is ``attach(..., chunk_size=...)``; xformers is
``attach(..., backend="xformers")`` (CUDA, when installed; SDPA otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from editkit.errors import EditkitError

__all__ = [
    "GraphBreakReport",
    "compile_unet",
    "enable_memory_savers",
    "frozen_for_backward",
    "frozen_weights",
    "graph_breaks",
    "to_channels_last",
]

logger = logging.getLogger(__name__)


def compile_unet(
    unet: torch.nn.Module,
    *,
    mode: str | None = None,
    fullgraph: bool = False,
    backend: str | Callable = "inductor",
    dynamic: bool | None = None,
    recompile_limit: int | None = None,
) -> torch.nn.Module:
    """Compile ``unet`` in place with ``torch.compile`` (editkit processors attached or not); returns it.

    Args:
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``...).
        fullgraph: raise on any graph break instead of splitting the graph.
        backend: compiler backend (``"inductor"``; ``"aot_eager"``/``"eager"`` to check tracing only).
        dynamic: ``torch.compile``'s dynamic-shape setting (``None``: automatic).
        recompile_limit: raise dynamo's process-wide recompile limit to at least this (one compiled
            graph per timestep for stateful controllers such as style injection).
    """
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"compile_unet needs a torch.nn.Module, got {type(unet).__name__}")
    if recompile_limit is not None:
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(int(getattr(config, name)), int(recompile_limit)))
    unet.compile(mode=mode, fullgraph=fullgraph, backend=backend, dynamic=dynamic)
    logger.info("UNet compiled (mode=%s, backend=%s, fullgraph=%s)", mode, backend, fullgraph)
    return unet


@contextlib.contextmanager
def frozen_weights(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module``'s parameters with ``requires_grad=False`` inside the block, each flag restored after.

    Backpropagating to latents through a model loaded for inference (``from_pretrained`` leaves
    ``requires_grad=True``) otherwise records a weight edge per layer and keeps each layer's input
    alive for a weight gradient nobody asks for.
    """
    parameters = list(module.parameters())
    flags = [p.requires_grad for p in parameters]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(parameters, flags, strict=True):
            parameter.requires_grad_(flag)


@contextlib.contextmanager
def frozen_for_backward(model: torch.nn.Module, gradient_checkpointing: bool = False) -> Iterator[torch.nn.Module]:
    """:func:`frozen_weights`, plus diffusers' gradient checkpointing switched on inside the block when asked
    and the model does not have it on already (switched back off after): backpropagation to latents only."""
    switch = gradient_checkpointing and not model.is_gradient_checkpointing
    if switch:
        model.enable_gradient_checkpointing()
    try:
        with frozen_weights(model):
            yield model
    finally:
        if switch:
            model.disable_gradient_checkpointing()


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store ``model``'s 4-D weights as NHWC (``channels_last``); returns the model."""
    return model.to(memory_format=torch.channels_last)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def enable_memory_savers(
    pipe, *, cpu_offload: bool = False, vae_tiling: bool = False, vae_slicing: bool = False, gpu_id: int | None = None
):
    """Turn on diffusers' memory savers on ``pipe``; returns the pipeline.

    Args:
        cpu_offload: ``enable_model_cpu_offload`` (accelerate): each model moves to the GPU only
            while it runs (the UNet, about 5 GB for SDXL in fp16, is the largest). Needs a CUDA (or
            other torch) accelerator and the pipeline's ``model_cpu_offload_seq``.
        vae_tiling: the VAE encodes/decodes large images in overlapping tiles (bounded memory).
        vae_slicing: the VAE handles a batch one image at a time.
        gpu_id: accelerator index for the offload (``None``: the default one).
    """
    if cpu_offload:
        if not _has_accelerator():
            raise EditkitError("model CPU offload needs a GPU (CUDA); this machine has none")
        if not getattr(pipe, "model_cpu_offload_seq", None):
            raise EditkitError(f"{type(pipe).__name__} declares no model_cpu_offload_seq; cannot offload")
        pipe.enable_model_cpu_offload(gpu_id=gpu_id)
    vae = getattr(pipe, "vae", None)
    if (vae_tiling or vae_slicing) and vae is None:
        raise EditkitError(f"{type(pipe).__name__} has no VAE to tile or slice")
    if vae_tiling:
        vae.enable_tiling()
    if vae_slicing:
        vae.enable_slicing()
    return pipe


@dataclass
class GraphBreakReport:
    """What ``torch._dynamo.explain`` found: graphs, breaks and their reasons."""

    graph_count: int
    graph_break_count: int
    reasons: list[str] = field(default_factory=list)


def graph_breaks(fn: Callable, *args, **kwargs) -> GraphBreakReport:
    """Trace ``fn(*args, **kwargs)`` with dynamo (no compilation) and report its graph breaks."""
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [str(getattr(reason, "reason", reason)) for reason in explained.break_reasons]
    return GraphBreakReport(explained.graph_count, explained.graph_break_count, reasons)
