"""The shared attention layer: sites, controllers, one processor, kernels, ``attach`` and stores.

Every editkit method is a controller run by the same processor::

    from editkit.attention import attach, CrossAttentionMapStore

    store = CrossAttentionMapStore(grids=[(16, 16)], role="cond")
    with attach(pipe.unet, store):
        store.batch_roles = ("uncond", "cond")
        pipe("a red car", num_inference_steps=30)
    maps = store.aggregate()  # (batch, 16, 16, 77)

The same works on MM-DiT transformers (``attach(pipe.transformer, store)``: SD3 / SD3.5, FLUX.1);
see ``editkit.attention.mmdit_processor`` for what each hook receives there.
"""

from editkit.attention.attach import (
    attach,
    attention_sites,
    exposed_ip_adapters,
    ip_adapter_processors,
    uncompiled,
)
from editkit.attention.controller import AttentionController, ControllerList, compose
from editkit.attention.kernels import AttentionKernel, explicit_attention, xformers_available
from editkit.attention.mmdit_processor import EditkitFluxAttnProcessor, EditkitJointAttnProcessor, mmdit_kind
from editkit.attention.pipeline_mixin import AttentionKernelMixin
from editkit.attention.processor import EditkitAttnProcessor
from editkit.attention.sites import IMAGE_KINDS, TEXT_KINDS, Site, TokenLayout, infer_grid, select_sites, site_matches
from editkit.attention.stores import CrossAttentionMapStore, QKVRecorder, SelfAttentionOutputRecorder

__all__ = [
    "IMAGE_KINDS",
    "TEXT_KINDS",
    "AttentionController",
    "AttentionKernel",
    "AttentionKernelMixin",
    "ControllerList",
    "CrossAttentionMapStore",
    "EditkitAttnProcessor",
    "EditkitFluxAttnProcessor",
    "EditkitJointAttnProcessor",
    "QKVRecorder",
    "SelfAttentionOutputRecorder",
    "Site",
    "TokenLayout",
    "attach",
    "attention_sites",
    "compose",
    "explicit_attention",
    "exposed_ip_adapters",
    "infer_grid",
    "ip_adapter_processors",
    "mmdit_kind",
    "select_sites",
    "site_matches",
    "uncompiled",
    "xformers_available",
]
