"""``attach``: install editkit's processor on the sites a controller applies to, restore on exit.

This is the only code in editkit that sets attention processors. It works on UNets (SD 1.x/2.x,
SDXL: ``EditkitAttnProcessor``) and on MM-DiT transformers (SD3 / SD3.5: ``EditkitJointAttnProcessor``,
FLUX.1: ``EditkitFluxAttnProcessor``); which processor replaces a layer's is decided by the
layer's stock processor, never by class names.
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
from editkit.attention.mmdit_processor import (
    EditkitFluxAttnProcessor,
    EditkitJointAttnProcessor,
    FluxAttnProcessor,
    JointAttnProcessor2_0,
    TransformerCallState,
    mmdit_kind,
)
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
    """Every attention site of ``model`` (a UNet or an MM-DiT transformer), in ``attn_processors``'s order.

    UNet kinds come from the names; MM-DiT kinds (``joint``, ``image_self``, ``single``) from each
    layer and its processor (``mmdit_kind``).
    """
    model = uncompiled(model)
    modules = dict(model.named_modules())
    sites = []
    for key in model.attn_processors:
        name = key.removesuffix(".processor")
        module = modules.get(name)
        sites.append(_site_of(name, module))
    return sites


def _site_of(name: str, layer: torch.nn.Module | None) -> Site:
    kind = None if layer is None else mmdit_kind(layer, layer.get_processor())
    return Site.from_name(name, getattr(layer, "is_cross_attention", None), kind=kind)


@contextlib.contextmanager
def attach(
    model: torch.nn.Module,
    controller: AttentionController | Sequence[AttentionController],
    *,
    backend: str = "sdpa",
    sdpa_backends: Sequence[object] | None = None,
    chunk_size: int = 1024,
) -> Iterator[AttentionController]:
    """Run ``model`` with ``controller`` on the sites it applies to; restore the processors after.

    Args:
        model: a diffusers ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL), ``SD3Transformer2DModel``
            (SD3 / SD3.5), ``FluxTransformer2DModel`` (FLUX.1), or any model whose attention layers
            have diffusers' ``get_processor``/``set_processor``.
        controller: one controller or a list of them (composed, run in order).
        backend: ``"sdpa"`` or ``"xformers"`` (falls back to SDPA with a warning off CUDA). FLUX
            layers keep diffusers' dispatcher instead: choose their kernel with
            ``transformer.set_attention_backend``.
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
    layers = _attention_layers(model)
    kernel = AttentionKernel(backend=backend, sdpa_backends=sdpa_backends, chunk_size=chunk_size)
    states = _CallStates()
    snapshot = {name: layer.get_processor() for name, layer in layers.items()}
    installed = _build_processors(layers, snapshot, controller, kernel, states)
    if states.transformer_used:
        recorder = _record_transformer_call(states.transformer, getattr(uncompiled(model), "config", None))
    else:
        recorder = _record_latent_size(states.unet)
    hook = model.register_forward_pre_hook(recorder, with_kwargs=True)
    handles = controller.register_hooks(model)
    _set_processors(layers, installed)
    try:
        yield controller
    finally:
        hook.remove()
        for handle in handles:
            handle.remove()
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


class _CallStates:
    """The call states of one ``attach``: the UNet's (latent size) and the transformer's (grid, text length)."""

    def __init__(self) -> None:
        self.unet = UNetCallState()
        self.transformer = TransformerCallState()
        self.transformer_used = False


def _build_processors(layers, snapshot, controller, kernel, states: _CallStates) -> dict:
    processors = dict(snapshot)
    for name, original in snapshot.items():
        site = _site_of(name, layers[name])
        if not controller.applies_to(site):
            continue
        mmdit = _mmdit_processor(site, original, controller, kernel, states.transformer)
        if mmdit is not None:
            processors[name] = mmdit
            states.transformer_used = True
            continue
        call_state = states.unet
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


def _mmdit_processor(site, original, controller, kernel, call_state):
    """editkit's MM-DiT processor replacing ``original``, or ``None`` when ``original`` is no MM-DiT processor."""
    if isinstance(original, EditkitJointAttnProcessor):  # nested attach: compose with the outer one
        return EditkitJointAttnProcessor(site, compose(original.controller, controller), original.kernel, call_state)
    if isinstance(original, EditkitFluxAttnProcessor):
        return EditkitFluxAttnProcessor(
            site, compose(original.controller, controller), original.kernel, call_state, original.original
        )
    if isinstance(original, JointAttnProcessor2_0):
        return EditkitJointAttnProcessor(site, controller, kernel, call_state)
    if isinstance(original, FluxAttnProcessor):
        return EditkitFluxAttnProcessor(site, controller, kernel, call_state, original)
    return None


def _record_transformer_call(call_state: TransformerCallState, config):
    """A pre-hook recording the image-token grid and the text length of each transformer call.

    SD3 takes latents ``(batch, channels, height, width)``: the grid is the latent size over the
    patch size. FLUX takes packed tokens: the grid is read from ``img_ids`` (rows, columns), once
    per ids tensor (a pipeline passes the same one at every step).
    """
    patch_size = getattr(config, "patch_size", 1) or 1

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("hidden_states")
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        call_state.text_tokens = int(context.shape[1]) if isinstance(context, torch.Tensor) else None
        image_ids = kwargs.get("img_ids")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            call_state.token_grid = (int(sample.shape[-2]) // patch_size, int(sample.shape[-1]) // patch_size)
        elif isinstance(image_ids, torch.Tensor) and image_ids is not call_state.image_ids:
            ids = image_ids.reshape(-1, image_ids.shape[-1])
            call_state.token_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            call_state.image_ids = image_ids
        return None

    return hook


def _record_latent_size(call_state: UNetCallState):
    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            call_state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return None

    return hook
