"""Per-family backbones: the small interface method code is written against (``shared/design/mmdit.md``).

``backbone_for(pipe)`` gives the family's :class:`Backbone`: :class:`UNetBackbone` (SD 1.x/2.x,
SDXL), :class:`SD3Backbone` (SD3 / SD3.5), :class:`FluxBackbone` (FLUX.1). Each encodes text,
runs one denoiser call with the family's conditioning on spatial latents, and knows its
prediction arithmetic (:mod:`editkit.backbones.flow_matching` for the flow families).
:mod:`editkit.backbones.families` recognises families from models, folders and checkpoints.
"""

from __future__ import annotations

from typing import Any

from editkit.backbones.base import (
    Backbone,
    FlowBackbone,
    FlowConditioning,
    check_site_names,
)
from editkit.backbones.families import FAMILIES, MMDIT_FAMILIES, UNET_FAMILIES, family_of_model, supported_families
from editkit.backbones.flow_matching import (
    euler_step,
    flow_noise,
    flow_noisy,
    flow_velocity,
    flow_x0,
    shift_sigmas,
    sigma_from_timestep,
)
from editkit.backbones.flux import FluxBackbone
from editkit.backbones.sd3 import SD3Backbone
from editkit.backbones.unet import UNetBackbone

__all__ = [
    "FAMILIES",
    "MMDIT_FAMILIES",
    "UNET_FAMILIES",
    "Backbone",
    "FlowBackbone",
    "FlowConditioning",
    "FluxBackbone",
    "SD3Backbone",
    "UNetBackbone",
    "backbone_for",
    "check_site_names",
    "euler_step",
    "family_of_model",
    "flow_noise",
    "flow_noisy",
    "flow_velocity",
    "flow_x0",
    "shift_sigmas",
    "sigma_from_timestep",
    "supported_families",
]


def backbone_for(pipe: Any, **options: Any) -> Backbone:
    """The backbone of ``pipe``'s family; ``options`` go to its constructor (e.g. FLUX's ``guidance_scale``)."""
    family = family_of_model(pipe)
    if family == "sd3":
        return SD3Backbone(pipe, **options)
    if family == "flux":
        return FluxBackbone(pipe, **options)
    return UNetBackbone(pipe, **options)
