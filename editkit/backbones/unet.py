"""The SD 1.x/2.x and SDXL UNet backbone: editkit's existing conditioning and DDIM arithmetic behind one interface.

Nothing is reimplemented: text goes through :func:`editkit.conditioning.encode_text` (SDXL's pooled
embeddings and size ids included), ``x0`` through :func:`editkit.inversion.predicted_x0` after
:func:`editkit.inversion.model_eps` (epsilon or v-prediction), noising through the DDIM formula.
"""

from __future__ import annotations

from typing import Any

import torch

from editkit.backbones.base import Backbone
from editkit.conditioning import TextConditioning, encode_text, is_sdxl_unet
from editkit.inversion import ddim_step, model_eps, predicted_x0

__all__ = ["UNetBackbone"]


class UNetBackbone(Backbone):
    """A Stable Diffusion 1.x/2.x or SDXL pipeline (``pipe.unet``, an alphas-cumprod scheduler)."""

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        self.family = "sdxl" if is_sdxl_unet(pipe.unet) else "sd"
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def encode_text(
        self, prompts: str | list[str], *, height: int | None = None, width: int | None = None
    ) -> TextConditioning:
        return encode_text(self.pipe, prompts, height=height, width=width)

    def denoise(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, conditioning: TextConditioning
    ) -> torch.Tensor:
        return self.pipe.unet(latents, timestep, **conditioning.unet_kwargs()).sample

    def alpha_prod(self, timestep: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
        """The scheduler's cumulative alpha at ``timestep`` (broadcast per sample)."""
        index = torch.as_tensor(timestep).long().cpu()
        alpha = self.pipe.scheduler.alphas_cumprod[index].to(device=like.device, dtype=torch.float32)
        return alpha.reshape(-1, *([1] * (like.ndim - 1))) if alpha.ndim == 1 else alpha

    def predicted_x0(
        self, latents: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor | float
    ) -> torch.Tensor:
        alpha = self.alpha_prod(timestep, latents)
        eps = model_eps(prediction.float(), latents.float(), alpha, self.prediction_type)
        return predicted_x0(latents.float(), eps, alpha).to(latents.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        return ddim_step(x0.float(), noise.float(), self.alpha_prod(timestep, x0)).to(x0.dtype)
