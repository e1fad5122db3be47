"""The FLUX.1 backbone: ``FluxPipeline``'s text encoders, 2x2 latent packing and ``FluxTransformer2DModel``.

Text goes through the pipeline's own ``encode_prompt`` (T5 sequence embeddings, CLIP-L pooled
output, text position ids). Latents stay spatial at the interface; :meth:`FluxBackbone.denoise`
packs them with the pipeline's ``_pack_latents`` and ``_prepare_latent_image_ids`` and unpacks the
velocity with ``_unpack_latents``, exactly as ``FluxPipeline`` does. The transformer takes
``timestep / 1000`` (it scales by 1000 inside) and, for guidance-distilled models (FLUX.1-dev,
``guidance_embeds``), the distilled guidance scale as an input instead of classifier-free guidance.
"""

from __future__ import annotations

from typing import Any

import torch

from editkit.backbones.base import FlowBackbone, FlowConditioning, prompt_list
from editkit.errors import InputError

__all__ = ["FLUX_GUIDANCE_SCALE", "FluxBackbone"]

#: FluxPipeline's default distilled guidance (FLUX.1-dev model card: 3.5).
FLUX_GUIDANCE_SCALE = 3.5
#: FluxPipeline's default T5 length (tokens; FLUX.1-schnell uses 256).
FLUX_MAX_SEQUENCE_LENGTH = 512


class FluxBackbone(FlowBackbone):
    """A ``FluxPipeline`` (FLUX.1-dev, FLUX.1-schnell).

    Args:
        pipe: the loaded pipeline.
        guidance_scale: the distilled guidance input of guidance-distilled models (ignored, and not
            passed, when ``transformer.config.guidance_embeds`` is false, as for schnell).
        max_sequence_length: T5 tokens (diffusers' default 512).
    """

    family = "flux"

    def __init__(
        self,
        pipe: Any,
        guidance_scale: float = FLUX_GUIDANCE_SCALE,
        max_sequence_length: int = FLUX_MAX_SEQUENCE_LENGTH,
    ) -> None:
        super().__init__(pipe)
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length

    @property
    def guidance_distilled(self) -> bool:
        """Whether the transformer takes a distilled ``guidance`` input (FLUX.1-dev)."""
        return bool(self.pipe.transformer.config.get("guidance_embeds", False))

    @torch.no_grad()
    def encode_text(
        self, prompts: str | list[str], *, height: int | None = None, width: int | None = None
    ) -> FlowConditioning:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt_list(prompts), prompt_2=None, device=self.device,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return FlowConditioning(embeds.to(self.dtype), pooled.to(self.dtype), text_ids)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, C, H, W) -> (batch, H/2 * W/2, 4C): 2x2 patches as tokens (``FluxPipeline._pack_latents``)."""
        batch, channels, height, width = latents.shape
        if height % 2 or width % 2:
            raise InputError(f"FLUX latents need an even height and width, got {height}x{width}")
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def unpack_latents(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(batch, tokens, 4C) -> (batch, C, height, width) for a latent ``height`` x ``width``."""
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(packed, height * scale, width * scale, scale)

    def image_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """The (H/2 * W/2, 3) rotary position ids of packed image tokens (``_prepare_latent_image_ids``)."""
        batch, _, height, width = latents.shape
        return self.pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, self.dtype)

    def guidance(self, batch: int, device: torch.device, guidance_scale: float | None = None) -> torch.Tensor | None:
        """The distilled guidance input, one value per sample (None for models without it)."""
        if not self.guidance_distilled:
            return None
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return torch.full([1], scale, device=device, dtype=torch.float32).expand(batch)

    def denoise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        conditioning: FlowConditioning,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The velocity for spatial ``latents``; ``guidance_scale`` overrides the backbone's for this call."""
        _, _, height, width = latents.shape
        velocity = self.pipe.transformer(
            hidden_states=self.pack_latents(latents),
            timestep=self._timesteps(timestep, latents).to(latents.dtype) / 1000,
            guidance=self.guidance(latents.shape[0], latents.device, guidance_scale),
            pooled_projections=conditioning.pooled_prompt_embeds,
            encoder_hidden_states=conditioning.prompt_embeds,
            txt_ids=conditioning.text_ids,
            img_ids=self.image_ids(latents),
            return_dict=False,
        )[0]
        return self.unpack_latents(velocity, height, width)
