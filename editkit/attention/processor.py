"""editkit's one attention processor.

It mirrors diffusers' ``AttnProcessor2_0`` step by step (spatial_norm, 4-D input, attention mask,
group_norm, norm_cross, norm_q/norm_k, residual_connection, rescale_output_factor) and calls the
controller's hooks in between. With the identity controller its output equals
``AttnProcessor2_0`` bit for bit.

A site that carried an IP-Adapter processor (``load_ip_adapter``) keeps its image prompt: the
adapter's ``to_k_ip``/``to_v_ip`` projections and scales are applied here to the (possibly
controlled) query, exactly as diffusers' ``IPAdapterAttnProcessor2_0`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from editkit.attention.controller import AttentionController
from editkit.attention.kernels import AttentionKernel
from editkit.attention.sites import Site, infer_grid

__all__ = ["EditkitAttnProcessor", "UNetCallState"]


@dataclass
class UNetCallState:
    """What the processors of one ``attach`` know about the current UNet call (its latent size)."""

    latent_hw: tuple[int, int] | None = None


class EditkitAttnProcessor(nn.Module):
    """The shared attention processor: one instance per site, all sharing a controller.

    It is an ``nn.Module`` only so that a wrapped IP-Adapter processor's weights stay in the
    model's module tree (device moves and ``state_dict`` keep seeing them).
    """

    def __init__(
        self,
        site: Site,
        controller: AttentionController,
        kernel: AttentionKernel,
        call_state: UNetCallState,
        ip_adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.site = site
        self.controller = controller
        self.kernel = kernel
        self.call_state = call_state
        self.ip_adapter = ip_adapter
        self._sites: dict[tuple[int, int] | None, Site] = {}  # the site per token grid, built once

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        controller = self.controller
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid = (height, width)
        else:
            grid = infer_grid(hidden_states.shape[1], self.call_state.latent_hw)
        site = self._site_with(grid)

        if encoder_hidden_states is not None:
            encoder_hidden_states = controller.on_context(site, encoder_hidden_states)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, queries, keys) as SDPA expects
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = _project_qkv(attn, hidden_states, encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (batch, heads, tokens, head_dim)
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        query, key, value = controller.on_qkv(site, query, key, value)
        scale = controller.softmax_scale(site, None)
        on_probs = None
        if controller.wants_probs(site):
            inserted = controller.inserted_tokens(site) if site.is_cross else None

            def on_probs(probs: torch.Tensor, queries: slice) -> None:
                if inserted is not None:  # prompt token indices never shift
                    start, count = inserted
                    probs = torch.cat([probs[..., :start], probs[..., start + count :]], dim=-1)
                controller.on_probs(site, probs, queries)

        hidden_states = self.kernel(query, key, value, attention_mask, scale, on_probs)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if ip_hidden_states is not None and self.ip_adapter is not None:
            hidden_states = self._add_image_prompt(attn, query, ip_hidden_states, ip_adapter_masks, hidden_states)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        hidden_states = controller.on_output(site, hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _site_with(self, grid: tuple[int, int] | None) -> Site:
        """This site with the call's token grid: cached in eager mode, built afresh when traced.

        Under ``torch.compile`` filling the cache would change a dict dynamo guards on, so the
        second call would recompile; traced code runs once per graph, so the cache saves nothing.
        """
        if torch.compiler.is_compiling():
            return self.site.with_grid(grid)
        site = self._sites.get(grid)
        if site is None:
            site = self._sites[grid] = self.site.with_grid(grid)
        return site

    def _add_image_prompt(self, attn, query, ip_hidden_states, ip_adapter_masks, hidden_states):
        """IP-Adapter's decoupled cross-attention, as in diffusers' ``IPAdapterAttnProcessor2_0``."""
        if ip_adapter_masks is not None:
            raise NotImplementedError(
                "IP-Adapter masks are not supported while an editkit controller is attached to this layer"
            )
        adapter = self.ip_adapter
        batch_size, heads, _, head_dim = query.shape
        for states, scale, to_k_ip, to_v_ip in zip(ip_hidden_states, adapter.scale, adapter.to_k_ip, adapter.to_v_ip):
            if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
                continue
            if isinstance(scale, list):
                raise NotImplementedError("per-image IP-Adapter scales need IP-Adapter masks")
            ip_key = to_k_ip(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            ip_value = to_v_ip(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
            image_attention = self.kernel(query, ip_key, ip_value)
            image_attention = image_attention.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
            hidden_states = hidden_states + scale * image_attention.to(query.dtype)
        return hidden_states


def _project_qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor | None):
    """Query, key and value projections (batch, tokens, inner_dim), separate or fused.

    After ``fuse_qkv_projections`` a self-attention layer has one ``to_qkv`` and a cross-attention
    layer ``to_q`` plus one ``to_kv``, split as diffusers' ``FusedAttnProcessor2_0`` splits them.
    """
    if getattr(attn, "fused_projections", False):
        if context is None:
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    context = hidden_states if context is None else context
    return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
