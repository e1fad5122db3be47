"""``attach``: install editkit's processor on the sites a controller applies to, restore on exit.

This is the only code in editkit that sets attention processors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    XFormersAttnProcessor,
)

from editkit.attention.controller import AttentionController, compose
from editkit.attention.kernels import AttentionKernel
from editkit.attention.processor import EditkitAttnProcessor, UNetCallState
from editkit.attention.sites import Site

logger = logging.getLogger(__name__)

__all__ = ["attach", "attention_sites", "exposed_ip_adapters", "ip_adapter_processors", "uncompiled"]

# Processors whose computation editkit's processor reproduces exactly: replaced while attached.
_STOCK = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0, XFormersAttnProcessor)
# Processors whose extra work editkit's processor carries along (decoupled image cross-attention).
_IP_ADAPTER = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (diffusers' recipe ``pipe.unet = torch.compile(pipe.unet)``).

    The wrapper prefixes every submodule name with ``_orig_mod.``; site names and processors are
    the original module's. Processors set on it are seen by the compiled wrapper (it calls it).
    """
    return getattr(model, "_orig_mod", model)


def attention_sites(model: torch.nn.Module) -> list[Site]:
    """Every attention site of ``model`` (a UNet), parsed from ``attn_processors``'s names."""
    model = uncompiled(model)
    modules = dict(model.named_modules())
    sites = []
    for key in model.attn_processors:
        name = key.removesuffix(".processor")
        module = modules.get(name)
        sites.append(Site.from_name(name, getattr(module, "is_cross_attention", None)))
    return sites


@contextlib.contextmanager
def attach(
    unet: torch.nn.Module,
    controller: AttentionController | Sequence[AttentionController],
    *,
    backend: str = "sdpa",
    sdpa_backends: Sequence[object] | None = None,
    chunk_size: int = 1024,
) -> Iterator[AttentionController]:
    """Run ``unet`` with ``controller`` on the sites it applies to; restore the processors after.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL) or any model whose
            attention layers have diffusers' ``get_processor``/``set_processor``.
        controller: one controller or a list of them (composed, run in order).
        backend: ``"sdpa"`` or ``"xformers"`` (falls back to SDPA with a warning off CUDA).
        sdpa_backends: optional ``SDPBackend`` members to restrict SDPA to.
        chunk_size: query rows per chunk where explicit probabilities are requested.

    Yields the (composed) controller. The original processor objects are restored in
    ``finally``, also when the body raises. Nested ``attach`` calls compose: the inner
    controller runs after the outer one on the sites both apply to. A site carrying an
    IP-Adapter processor keeps its image prompt; any other foreign processor is left in place
    (with a warning if the controller wanted that site). Fused QKV projections
    (``fuse_qkv_projections``) are supported: editkit's processor splits ``to_qkv``/``to_kv``.
    """
    if not isinstance(controller, AttentionController):
        controller = compose(*controller)
    layers = _attention_layers(unet)
    kernel = AttentionKernel(backend=backend, sdpa_backends=sdpa_backends, chunk_size=chunk_size)
    call_state = UNetCallState()
    snapshot = {name: layer.get_processor() for name, layer in layers.items()}
    installed = _build_processors(layers, snapshot, controller, kernel, call_state)
    hook = unet.register_forward_pre_hook(_record_latent_size(call_state), with_kwargs=True)
    _set_processors(layers, installed)
    try:
        yield controller
    finally:
        hook.remove()
        if any(layers[name].get_processor() is not installed[name] for name in installed):
            logger.warning(
                "attention processors were replaced while an editkit controller was attached "
                "(e.g. enable_xformers_memory_efficient_attention); restoring the originals"
            )
        _set_processors(layers, snapshot)


def ip_adapter_processors(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The IP-Adapter processors by site name: installed ones and those editkit's processor carries while attached."""
    found = {}
    for name, layer in _attention_layers(unet).items():
        processor = layer.get_processor()
        if isinstance(processor, EditkitAttnProcessor):
            processor = processor.ip_adapter
        if isinstance(processor, _IP_ADAPTER):
            found[name] = processor
    return found


@contextlib.contextmanager
def exposed_ip_adapters(unet: torch.nn.Module) -> Iterator[None]:
    """Put the IP-Adapter processors that editkit's processors carry back in place for the body, then re-wrap.

    diffusers' ``set_ip_adapter_scale`` finds adapters by processor type; while a controller is attached at
    an IP-Adapter site, that site holds editkit's processor, so the adapter would be skipped silently.
    """
    layers = _attention_layers(unet)
    wrapped = {
        name: layer.get_processor()
        for name, layer in layers.items()
        if isinstance(layer.get_processor(), EditkitAttnProcessor) and layer.get_processor().ip_adapter is not None
    }
    _set_processors(layers, {name: processor.ip_adapter for name, processor in wrapped.items()})
    try:
        yield
    finally:
        _set_processors(layers, wrapped)


def _attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers ``attn_processors`` reports (those with ``get_processor``), by site name: one walk.

    ``attn_processors``/``set_attn_processor`` rebuild this by recursion on every call; attaching
    walks the tree once and addresses the layers directly (``set_processor``, the method
    ``set_attn_processor`` calls per layer), which keeps attach/detach cheap next to a UNet call.
    """
    modules = uncompiled(unet).named_modules()
    return {name: module for name, module in modules if name and hasattr(module, "get_processor")}


def _set_processors(layers: dict[str, torch.nn.Module], processors: dict) -> None:
    for name, processor in processors.items():
        if layers[name].get_processor() is not processor:
            layers[name].set_processor(processor)


def _build_processors(layers, snapshot, controller, kernel, call_state) -> dict:
    processors = dict(snapshot)
    for name, original in snapshot.items():
        site = Site.from_name(name, getattr(layers[name], "is_cross_attention", None))
        if not controller.applies_to(site):
            continue
        if isinstance(original, EditkitAttnProcessor):  # nested attach: compose with the outer one
            processors[name] = EditkitAttnProcessor(
                site,
                compose(original.controller, controller),
                original.kernel,
                original.call_state,
                original.ip_adapter,
            )
        elif isinstance(original, _STOCK):
            processors[name] = EditkitAttnProcessor(site, controller, kernel, call_state)
        elif isinstance(original, _IP_ADAPTER):
            processors[name] = EditkitAttnProcessor(site, controller, kernel, call_state, ip_adapter=original)
        else:
            logger.warning(
                "site %s has a foreign attention processor (%s); leaving it in place, the controller "
                "does not run there",
                name,
                type(original).__name__,
            )
    return processors


def _record_latent_size(call_state: UNetCallState):
    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            call_state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return None

    return hook
