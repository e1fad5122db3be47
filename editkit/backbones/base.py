"""The backbone interface the method code is written against, and the MM-DiT text conditioning.

A backbone wraps one loaded diffusers pipeline and answers, for its family, the questions every
method asks: encode these prompts, run the denoiser once on these latents at this timestep, turn
a prediction into ``x0``, noise ``x0`` to a timestep, encode an image and decode latents.
Latents are always spatial ``(batch, channels, height, width)`` at the interface (FLUX packs and
unpacks inside its ``denoise``), and timesteps are the scheduler's own values.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from editkit.backbones.flow_matching import flow_noisy, flow_x0, sigma_from_timestep
from editkit.conditioning import clean_prompt
from editkit.errors import InputError

__all__ = [
    "Backbone",
    "FlowBackbone",
    "FlowConditioning",
    "check_site_names",
    "prompt_list",
]

#: First name components of attention sites per architecture (``attn_processors`` names).
UNET_SITE_ROOTS = ("down_blocks", "mid_block", "up_blocks")
MMDIT_SITE_ROOTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class FlowConditioning:
    """An MM-DiT's text inputs for a batch of prompts.

    ``prompt_embeds``: ``(batch, text tokens, joint_attention_dim)`` (SD3: CLIP-L + CLIP-G hidden
    states padded to the T5 width, then T5's; FLUX: T5's). ``pooled_prompt_embeds``: ``(batch,
    pooled dim)`` (SD3: both CLIP projections; FLUX: CLIP-L's pooled output). ``text_ids``: FLUX's
    ``(text tokens, 3)`` rotary position ids (shared by the batch), ``None`` for SD3.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor | None = None

    @staticmethod
    def cat(parts: list[FlowConditioning]) -> FlowConditioning:
        """Concatenate along the batch (e.g. ``[uncond, cond]`` for classifier-free guidance)."""
        return FlowConditioning(
            torch.cat([p.prompt_embeds for p in parts]),
            torch.cat([p.pooled_prompt_embeds for p in parts]),
            parts[0].text_ids,
        )

    def repeat(self, times: int) -> FlowConditioning:
        """Each row repeated ``times`` times (for several images per prompt)."""
        return FlowConditioning(
            self.prompt_embeds.repeat_interleave(times, dim=0),
            self.pooled_prompt_embeds.repeat_interleave(times, dim=0),
            self.text_ids,
        )


class Backbone(abc.ABC):
    """One family's view of a loaded pipeline (see :func:`editkit.backbones.backbone_for`).

    ``family`` is ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``; ``prediction_type`` what the
    denoiser predicts: ``"epsilon"``, ``"v_prediction"`` (UNets) or ``"flow"`` (velocity
    ``noise - x0``, MM-DiTs).
    """

    family: str
    prediction_type: str

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    @abc.abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The UNet or transformer."""

    @abc.abstractmethod
    def encode_text(self, prompts: str | list[str], *, height: int | None = None, width: int | None = None) -> Any:
        """The denoiser's text conditioning for ``prompts`` (``height``/``width``: SDXL's size ids)."""

    @abc.abstractmethod
    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor | float, conditioning: Any) -> torch.Tensor:
        """One denoiser call: the prediction for spatial ``latents`` at the scheduler's ``timestep``."""

    @abc.abstractmethod
    def predicted_x0(
        self, latents: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor | float
    ) -> torch.Tensor:
        """The clean latent implied by ``prediction`` at ``timestep``."""

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        """``x0`` noised to ``timestep`` with ``noise`` (the family's forward process)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    def encode_image(
        self, image: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Image in [-1, 1] -> the denoiser's latents: ``(z - shift_factor) * scaling_factor`` (SD3 / FLUX
        VAEs have a shift, SD's none), via :func:`editkit.inversion.encode_image_latents`."""
        from editkit.inversion import encode_image_latents

        return encode_image_latents(self.pipe.vae, image, generator=generator, sample=sample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's latents -> image in [-1, 1], float32 (:func:`editkit.inversion.decode_latents`)."""
        from editkit.inversion import decode_latents

        return decode_latents(self.pipe.vae, latents)

    def check_sites(self, names: list[str] | tuple[str, ...], option: str = "sites") -> None:
        """InputError when ``names`` (site names or patterns) belong to the other architecture."""
        check_site_names(self.family, names, option)


def prompt_list(prompts: str | list[str]) -> list[str]:
    """Prompts cleaned as editkit cleans every prompt (NFC, no control characters)."""
    return [clean_prompt(p) for p in ([prompts] if isinstance(prompts, str) else list(prompts))]


class FlowBackbone(Backbone):
    """Shared by SD3 and FLUX: velocity predictions and ``sigma = timestep / num_train_timesteps``."""

    prediction_type = "flow"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """The noise level of a scheduler timestep."""
        return sigma_from_timestep(timestep, self.pipe.scheduler.config.num_train_timesteps)

    def predicted_x0(
        self, latents: torch.Tensor, prediction: torch.Tensor, timestep: torch.Tensor | float
    ) -> torch.Tensor:
        return flow_x0(latents, prediction, self.sigma(timestep))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        return flow_noisy(x0, noise, self.sigma(timestep))

    @staticmethod
    def _timesteps(timestep: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        """One timestep per sample, as diffusers' flow pipelines pass it."""
        timestep = torch.as_tensor(timestep, device=latents.device)
        return timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep


def check_site_names(family: str, names: list[str] | tuple[str, ...], option: str = "sites") -> None:
    """Refuse UNet site names for an MM-DiT family and MM-DiT names for a UNet (InputError naming the cause)."""
    mmdit = family in ("sd3", "flux")
    foreign, own = (UNET_SITE_ROOTS, MMDIT_SITE_ROOTS) if mmdit else (MMDIT_SITE_ROOTS, UNET_SITE_ROOTS)
    for name in names:
        root = str(name).split(".", 1)[0]
        if root in foreign:
            kind, other = ("a UNet", "MM-DiT") if mmdit else ("an MM-DiT", "UNet")
            raise InputError(
                f"{option}: {name!r} is {kind} attention site name, but this is a {family} ({other}) model; "
                f"its sites start with {' or '.join(own)}"
            )
