"""The shared attention layer: sites, controllers, one processor, kernels, ``attach`` and stores.

Every editkit method is a controller run by the same processor::

    from editkit.attention import attach, CrossAttentionMapStore

    store = CrossAttentionMapStore(grids=[(16, 16)], role="cond")
    with attach(pipe.unet, store):
        store.batch_roles = ("uncond", "cond")
        pipe("a red car", num_inference_steps=30)
    maps = store.aggregate()  # (batch, 16, 16, 77)
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
from editkit.attention.pipeline_mixin import AttentionKernelMixin
from editkit.attention.processor import EditkitAttnProcessor
from editkit.attention.sites import Site, infer_grid, select_sites, site_matches
from editkit.attention.stores import CrossAttentionMapStore, QKVRecorder, SelfAttentionOutputRecorder

__all__ = [
    "AttentionController",
    "AttentionKernel",
    "AttentionKernelMixin",
    "ControllerList",
    "CrossAttentionMapStore",
    "EditkitAttnProcessor",
    "QKVRecorder",
    "SelfAttentionOutputRecorder",
    "Site",
    "attach",
    "attention_sites",
    "compose",
    "explicit_attention",
    "exposed_ip_adapters",
    "infer_grid",
    "ip_adapter_processors",
    "select_sites",
    "site_matches",
    "uncompiled",
    "xformers_available",
]
