"""editkit's attention processors for MM-DiT transformers (SD3 / SD3.5, FLUX.1).

- ``EditkitJointAttnProcessor`` mirrors diffusers' ``JointAttnProcessor2_0`` (SD3 joint attention
  ``[image; text]`` and SD3.5's image-only ``attn2``);
- ``EditkitFluxAttnProcessor`` mirrors ``FluxAttnProcessor`` (double stream ``[text; image]``,
  single stream with the text already concatenated) and calls diffusers' ``dispatch_attention_fn``
  with the stock processor's ``_attention_backend`` and ``_parallel_config``: both are read from
  (and written to) the processor it replaced, so ``set_attention_backend`` and context
  parallelism keep working while attached and after.

Hooks, per kind (tensors in editkit's ``(batch, heads, tokens, head_dim)`` layout for q/k/v):

- ``on_context(site, text)``: the text stream ``(batch, text_tokens, dim)`` before its projections
  (joint sites); tokens a controller inserts (``inserted_tokens``) are removed from the text output,
  so the block's residual stream keeps its length. On FLUX, inserted tokens take the rotary angles
  of the text token at their insertion point (FLUX text ids are all zero, so all text tokens share
  one angle set);
- ``on_qkv(site, q, k, v)``: the joint q/k/v after the q/k norms (and FLUX's rotary embedding), in
  the order of ``site.layout``;
- ``on_probs(site, probs, queries)``: only where ``wants_probs``: the image-query x text-key block,
  normalised over all keys as the model computes it, from the explicit kernel chunked over
  queries; ``queries`` indexes image tokens; inserted text tokens are removed;
- ``on_output(site, hidden)``: the image part after ``to_out`` (FLUX single stream: of the joint
  output; there is no ``to_out``).

With the identity controller the outputs equal the stock processors' bit for bit. Like the stock
SD3 processor, ``EditkitJointAttnProcessor`` ignores ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from editkit.attention.controller import AttentionController
from editkit.attention.kernels import AttentionKernel
from editkit.attention.sites import Kind, Site, TokenLayout

__all__ = [
    "EditkitFluxAttnProcessor",
    "EditkitJointAttnProcessor",
    "TransformerCallState",
    "mmdit_kind",
]


@dataclass
class TransformerCallState:
    """What the processors of one ``attach`` know about the current transformer call.

    Set by a forward pre-hook on the transformer (``editkit.attention.attach``): the image-token
    grid and the text length (FLUX single-stream layers cannot tell it from their input).
    """

    token_grid: tuple[int, int] | None = None
    text_tokens: int | None = None
    image_ids: torch.Tensor | None = None  # the FLUX ``img_ids`` the grid was read from


def mmdit_kind(layer: torch.nn.Module, processor: object) -> Kind | None:
    """The MM-DiT site kind of ``layer`` from its processor and projections; ``None`` for other layers."""
    if isinstance(processor, _MMDiTProcessor):
        return processor.site.kind
    has_text = getattr(layer, "added_kv_proj_dim", None) is not None
    if isinstance(processor, JointAttnProcessor2_0):
        return "joint" if has_text else "image_self"
    if isinstance(processor, FluxAttnProcessor):
        return "joint" if has_text else "single"
    return None


class _MMDiTProcessor:
    """What both MM-DiT processors share: the site per call, probabilities and inserted tokens."""

    text_first = False

    def __init__(
        self, site: Site, controller: AttentionController, kernel: AttentionKernel, call_state: TransformerCallState
    ) -> None:
        self.site = site
        self.controller = controller
        self.kernel = kernel
        self.call_state = call_state
        self._sites: dict[tuple, Site] = {}  # the site per (grid, layout), built once

    def _site_for(self, image_tokens: int, text_tokens: int) -> Site:
        """This site with the call's grid and layout: cached in eager mode, built afresh when traced."""
        grid = self.call_state.token_grid
        key = (grid, image_tokens, text_tokens)
        if torch.compiler.is_compiling():  # filling the cache would make dynamo recompile
            return self._new_site(*key)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = self._new_site(*key)
        return site

    def _new_site(self, grid: tuple[int, int] | None, image_tokens: int, text_tokens: int) -> Site:
        if grid is not None and grid[0] * grid[1] != image_tokens:
            grid = None  # the call's grid is not this layer's token count (e.g. extra reference tokens)
        return self.site.with_call(grid, TokenLayout(image_tokens, text_tokens, self.text_first))

    def _context(self, site: Site, context: torch.Tensor) -> tuple[Site, torch.Tensor, tuple[int, int] | None]:
        """The controlled text stream, the site with its new text length, and the inserted tokens."""
        controlled = self.controller.on_context(site, context)
        if controlled is context:
            return site, context, None
        inserted = self.controller.inserted_tokens(site)
        added = controlled.shape[1] - context.shape[1]
        if added != (0 if inserted is None else inserted[1]):
            raise ValueError(
                f"on_context at {site.name} changed the text length by {added} tokens but inserted_tokens "
                f"declares {inserted}; the text stream must keep its length outside the declared insertion"
            )
        site = self._site_for(site.layout.image_tokens, controlled.shape[1])
        return site, controlled, inserted

    def _probs_callback(self, site: Site, inserted: tuple[int, int] | None) -> Callable | None:
        """The explicit kernel's per-chunk callback: image-query rows x text-key columns to ``on_probs``."""
        controller = self.controller
        if not controller.wants_probs(site):
            return None
        image, text = site.layout.image, site.layout.text
        if text.stop == text.start:  # an image-only layer has no text keys
            return None

        def on_probs(probs: torch.Tensor, rows: slice) -> None:
            start, stop = max(rows.start, image.start), min(rows.stop, image.stop)
            if start >= stop:
                return
            block = probs[..., start - rows.start : stop - rows.start, text]  # (batch, heads, queries, text)
            block = _without(block, inserted, dim=-1)
            controller.on_probs(site, block, slice(start - image.start, stop - image.start))

        return on_probs


def _without(tensor: torch.Tensor, inserted: tuple[int, int] | None, dim: int) -> torch.Tensor:
    """``tensor`` without the ``(start, count)`` inserted positions along ``dim``."""
    if inserted is None:
        return tensor
    start, count = inserted
    size = tensor.shape[dim]
    return torch.cat([tensor.narrow(dim, 0, start), tensor.narrow(dim, start + count, size - start - count)], dim=dim)


def _split_heads(tensor: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    return tensor.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (batch, heads, tokens, head_dim)


class EditkitJointAttnProcessor(_MMDiTProcessor):
    """SD3 / SD3.5 attention (``JointAttnProcessor2_0``) with editkit's controller hooks."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        controller = self.controller
        batch_size, image_tokens = hidden_states.shape[:2]
        site = self._site_for(image_tokens, 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        inserted = None
        if encoder_hidden_states is not None:
            site, encoder_hidden_states, inserted = self._context(site, encoder_hidden_states)

        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_split_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            query, key, value = _with_text(attn, query, key, value, encoder_hidden_states, head_dim)

        query, key, value = controller.on_qkv(site, query, key, value)
        scale = controller.softmax_scale(site, None)
        hidden_states = self.kernel(query, key, value, None, scale, self._probs_callback(site, inserted))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_tokens], hidden_states[:, image_tokens:]
            encoder_hidden_states = _without(encoder_hidden_states, inserted, dim=1)
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        hidden_states = controller.on_output(site, hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def _with_text(attn, query, key, value, context: torch.Tensor, head_dim: int):
    """SD3's joint q/k/v: the image projections followed by the text stream's (``add_*_proj``)."""
    batch_size = context.shape[0]
    text_query = _split_heads(attn.add_q_proj(context), batch_size, attn.heads, head_dim)
    text_key = _split_heads(attn.add_k_proj(context), batch_size, attn.heads, head_dim)
    text_value = _split_heads(attn.add_v_proj(context), batch_size, attn.heads, head_dim)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    # (batch, heads, image + text tokens, head_dim)
    return (
        torch.cat([query, text_query], dim=2),
        torch.cat([key, text_key], dim=2),
        torch.cat([value, text_value], dim=2),
    )


class EditkitFluxAttnProcessor(_MMDiTProcessor):
    """FLUX.1 attention (``FluxAttnProcessor``) with editkit's controller hooks.

    ``_attention_backend`` and ``_parallel_config`` belong to the stock processor this one replaced
    (``original``): reading and setting them here reads and sets them there, so diffusers'
    ``set_attention_backend`` / ``enable_parallelism`` reach the kernel while attached and survive
    the restore. The explicit-probability path (only where ``wants_probs``) runs editkit's chunked
    kernel on the local sequence, so it is refused under context parallelism.
    """

    text_first = True

    def __init__(
        self,
        site: Site,
        controller: AttentionController,
        kernel: AttentionKernel,
        call_state: TransformerCallState,
        original: object,
    ) -> None:
        super().__init__(site, controller, kernel, call_state)
        self.original = original

    @property
    def _attention_backend(self):
        return self.original._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend) -> None:
        self.original._attention_backend = backend

    @property
    def _parallel_config(self):
        return self.original._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, config) -> None:
        self.original._parallel_config = config

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        controller = self.controller
        site, inserted = self._flux_site(hidden_states, encoder_hidden_states), None
        if encoder_hidden_states is not None:
            site, encoder_hidden_states, inserted = self._context(site, encoder_hidden_states)
        if inserted is not None and image_rotary_emb is not None:
            image_rotary_emb = _insert_rotary(image_rotary_emb, inserted, site.layout.text_tokens - inserted[1])
        query, key, value = _flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        # the hooks see (batch, heads, tokens, head_dim); diffusers' dispatch takes (batch, tokens, heads, head_dim)
        query, key, value = controller.on_qkv(site, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        scale = controller.softmax_scale(site, None)
        on_probs = self._probs_callback(site, inserted)
        if on_probs is None:
            hidden_states = dispatch_attention_fn(
                query.transpose(1, 2),
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=attention_mask,
                scale=scale,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
        else:
            if self._parallel_config is not None:
                raise NotImplementedError(
                    f"attention probabilities at {site.name} are not available under context parallelism"
                )
            hidden_states = self.kernel(query, key, value, attention_mask, scale, on_probs).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)  # (batch, tokens, heads * head_dim)

        text_tokens = site.layout.text_tokens
        if encoder_hidden_states is not None:
            text, image = hidden_states.split_with_sizes([text_tokens, site.layout.image_tokens], dim=1)
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))  # linear projection, dropout
            text = attn.to_add_out(_without(text, inserted, dim=1).contiguous())
            return controller.on_output(site, image), text
        image = hidden_states[:, text_tokens:]
        controlled = controller.on_output(site, image)
        if controlled is not image:
            hidden_states = torch.cat([hidden_states[:, :text_tokens], controlled], dim=1)
        return hidden_states

    def _flux_site(self, hidden_states: torch.Tensor, context: torch.Tensor | None) -> Site:
        """The site of this call: double stream from the two inputs, single stream from the call's text length."""
        if context is not None:
            return self._site_for(hidden_states.shape[1], context.shape[1])
        text_tokens = self.call_state.text_tokens
        if text_tokens is None:
            raise RuntimeError(
                f"single-stream attention {self.site.name} needs the text length of the transformer call; "
                "run it through the transformer editkit attached to (its forward records the length)"
            )
        site = self._site_for(hidden_states.shape[1] - text_tokens, text_tokens)
        if self.controller.inserted_tokens(site) is not None:
            raise ValueError(f"inserting text tokens is not supported at single-stream site {site.name}")
        return site


def _flux_qkv(attn, hidden_states, context, rotary):
    """FLUX's joint q/k/v ``(batch, text + image tokens, heads, head_dim)`` after the q/k norms and rotary embedding."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        if attn.fused_projections:
            text = attn.to_added_qkv(context).chunk(3, dim=-1)
        else:
            text = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
        text_query, text_key, text_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in text)
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query, key, value


def _insert_rotary(rotary, inserted: tuple[int, int], text_tokens: int):
    """Rotary angles for a text stream with ``inserted`` tokens: each takes the angles at its insertion point."""
    if not isinstance(rotary, tuple):
        raise TypeError("inserting text tokens needs FLUX's (cos, sin) rotary embedding")
    start, count = inserted
    anchor = min(start, text_tokens - 1)
    return tuple(
        torch.cat([table[:start], table[anchor : anchor + 1].expand(count, -1), table[start:]], dim=0)
        for table in rotary
    )
