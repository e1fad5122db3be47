"""The SD3 / SD3.5 backbone: ``StableDiffusion3Pipeline``'s text encoders and ``SD3Transformer2DModel``.

Text goes through the pipeline's own ``encode_prompt`` (CLIP-L + CLIP-G hidden states, padded to
the T5 width and followed by T5's; pooled: both CLIP projections). The transformer predicts the
flow velocity and takes the scheduler's timestep (0-1000) as is.
"""

from __future__ import annotations

from typing import Any

import torch

from editkit.backbones.base import FlowBackbone, FlowConditioning, prompt_list

__all__ = ["SD3Backbone"]

#: StableDiffusion3Pipeline's default T5 length (tokens).
SD3_MAX_SEQUENCE_LENGTH = 256


class SD3Backbone(FlowBackbone):
    """A ``StableDiffusion3Pipeline`` (SD3 Medium, SD3.5 Medium/Large/Large Turbo).

    Args:
        pipe: the loaded pipeline.
        max_sequence_length: T5 tokens (diffusers' default 256).
    """

    family = "sd3"

    def __init__(self, pipe: Any, max_sequence_length: int = SD3_MAX_SEQUENCE_LENGTH) -> None:
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode_text(
        self, prompts: str | list[str], *, height: int | None = None, width: int | None = None
    ) -> FlowConditioning:
        prompts = prompt_list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return FlowConditioning(embeds.to(self.dtype), pooled.to(self.dtype))

    def denoise(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, conditioning: FlowConditioning
    ) -> torch.Tensor:
        return self.pipe.transformer(
            hidden_states=latents,
            timestep=self._timesteps(timestep, latents),
            encoder_hidden_states=conditioning.prompt_embeds,
            pooled_projections=conditioning.pooled_prompt_embeds,
            return_dict=False,
        )[0]
