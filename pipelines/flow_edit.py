"""Text-driven editing of a real image on SD3 / SD3.5 and FLUX.1: FlowEdit or flow DDS, with PatchNCE.

Two thin per-family classes (``SD3ContrastiveEditPipeline``, ``FluxContrastiveEditPipeline``) take
the components of ``StableDiffusion3Pipeline`` / ``FluxPipeline`` under the same names, so
``from_pretrained`` of an SD3 or FLUX folder, ``from_pipe`` and ``save_pretrained`` work. The
method (one ``__call__``, shared) is :mod:`editkit.flow_edit`, written against the backbone
interface (:mod:`editkit.backbones`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import BaseOutput

from editkit.acceleration import frozen_for_backward
from editkit.attention import AttentionController, AttentionKernelMixin, attach, attention_sites, compose, select_sites
from editkit.backbones import backbone_for
from editkit.backbones.pipeline_bases import FluxPipelineBase, SD3PipelineBase
from editkit.contrastive import DIRECTIONS, FEATURES
from editkit.errors import InputError
from editkit.flow_edit import (
    FLOW_EDIT_DEFAULTS,
    FLOW_EDIT_METHODS,
    FlowContrastFeatureRecorder,
    FlowEditSettings,
    FlowEditText,
    FlowVelocities,
    contrast_sites_of,
    flow_dds_loop,
    flowedit_loop,
    scaled_n_max,
)
from editkit.flow_inversion import flow_schedule, flux_mu
from editkit.image import latent_edit_region
from editkit.pipeline_io import (
    callback_tensor_names,
    check_output_type,
    image_latents,
    pipeline_images,
    pixel_size,
    postprocess,
    step_callback,
)

#: Latent pixels of SD 1.x at 512 px, where DDS's surrogate scale 2000 / (H_lat * W_lat) was tuned.
REFERENCE_LATENT_PIXELS = 64 * 64


@dataclass
class FlowEditPipelineOutput(BaseOutput):
    """Edited images, the edited latent, the timesteps used and each step's contrastive loss (empty without one)."""

    images: list[PIL.Image.Image] | torch.Tensor | np.ndarray
    latents: torch.Tensor
    timesteps: list[float]
    contrastive_losses: list[float]


def _or(value, default):
    return default if value is None else value


class _FlowEditMethod(AttentionKernelMixin):
    """The ``__call__`` both family classes share (not a pipeline itself)."""

    family: ClassVar[str]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def _check_inputs(self, prompts: dict, numbers: dict, method: str, contrast, feature, patch_sizes, num_patches):
        """Short, specific InputErrors before any heavy work; a warning for identical prompts."""
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise InputError(
                f"flow editing needs a FlowMatchEulerDiscreteScheduler, got {type(self.scheduler).__name__}"
            )
        for name, prompt in prompts.items():
            items = [prompt] if isinstance(prompt, str) else prompt
            if (
                not isinstance(items, list | tuple)
                or not items
                or not all(isinstance(p, str) and p.strip() for p in items)
            ):
                raise InputError(f"{name} must be a non-empty string or a list of them")
        if prompts["source_prompt"] == prompts["target_prompt"]:
            warnings.warn("source and target prompts are identical: the edit will change little", stacklevel=3)
        if method not in FLOW_EDIT_METHODS:
            raise InputError(f"method must be one of {FLOW_EDIT_METHODS}, got {method!r}")
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if numbers["learning_rate"] <= 0 or numbers["tau"] <= 0 or numbers["contrast_weight"] < 0:
            raise InputError("learning_rate and tau must be > 0, contrast_weight >= 0")
        if contrast is not None and contrast not in DIRECTIONS:
            raise InputError(f"contrast must be one of {DIRECTIONS} or None, got {contrast!r}")
        if feature not in FEATURES:
            raise InputError(f"feature must be one of {FEATURES}, got {feature!r}")
        if not patch_sizes or any(int(p) != p or p < 1 for p in patch_sizes) or num_patches < 2:
            raise InputError("patch_sizes must be positive integers and num_patches at least 2")

    def _steps(self, method, num_inference_steps, n_max, n_min, n_avg, min_timestep, max_timestep) -> tuple[int, int]:
        """(steps, n_max) resolved from the family's defaults, checked."""
        defaults = FLOW_EDIT_DEFAULTS[self.family]
        steps = num_inference_steps or (defaults.num_inference_steps if method == "flowedit" else 200)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        n_max = scaled_n_max(self.family, steps) if n_max is None else n_max
        if method == "flowedit" and not (0 <= n_min <= n_max <= steps and n_avg >= 1):
            raise InputError(f"need 0 <= n_min <= n_max <= num_inference_steps ({steps}) and n_avg >= 1, "
                             f"got n_min={n_min}, n_max={n_max}, n_avg={n_avg}")  # fmt: skip
        timesteps = self.scheduler.config.num_train_timesteps
        if method == "dds" and not 0 <= min_timestep < max_timestep <= timesteps:
            raise InputError(
                f"need 0 <= min_timestep < max_timestep <= {timesteps}, got {min_timestep}, {max_timestep}"
            )
        return steps, n_max

    def _schedule(self, steps: int, latents: torch.Tensor):
        """The generation schedule FlowEdit integrates along (FLUX: its sigmas and resolution shift ``mu``)."""
        if self.family != "flux":
            return flow_schedule(self.scheduler, steps)
        tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
        return flow_schedule(self.scheduler, steps, sigmas=sigmas, mu=flux_mu(tokens, self.scheduler))

    def _text(self, backbone, prompts: dict, negative_prompt, batch: int, distilled: bool) -> FlowEditText:
        def encode(prompt):
            conditioning = backbone.encode_text(prompt)
            rows = conditioning.prompt_embeds.shape[0]
            if batch % rows:
                raise InputError(f"{rows} prompts for {batch} images: give one prompt or one per image")
            return conditioning.repeat(batch // rows)

        negative = None if distilled else encode("" if negative_prompt is None else negative_prompt)
        return FlowEditText(encode(prompts["source_prompt"]), encode(prompts["target_prompt"]), negative)

    def _recorder(self, contrast, contrast_sites, feature) -> FlowContrastFeatureRecorder | None:
        if contrast is None:
            return None
        sites = contrast_sites_of(self.family, contrast_sites)
        image_sites = [s for s in attention_sites(self.transformer) if s.kind in ("joint", "image_self", "single")]
        try:
            select_sites(image_sites, sites)
        except ValueError as error:
            raise InputError(f"contrast_sites: {error}") from None
        return FlowContrastFeatureRecorder(sites, feature=feature)

    @torch.no_grad()
    def __call__(
        self,
        image: PipelineImageInput,
        source_prompt: str | list[str] | None = None,
        target_prompt: str | list[str] | None = None,
        *,
        method: str = "flowedit",
        num_inference_steps: int | None = None,
        n_max: int | None = None,
        n_min: int = 0,
        n_avg: int = 1,
        guidance_scale: float | None = None,
        source_guidance_scale: float | None = None,
        learning_rate: float = 0.1,
        min_timestep: int = 50,
        max_timestep: int = 950,
        contrast: str | None = "dual",
        contrast_weight: float = 3.0,
        dds_weight: float = 1.0,
        num_patches: int = 256,
        patch_sizes: Sequence[int] = (1, 2),
        tau: float = 0.07,
        feature: str = "output",
        contrast_sites: str | Sequence[str] | None = None,
        mask: torch.Tensor | PIL.Image.Image | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        loss_scale: float = 2000.0,
        reference_latent_pixels: int = REFERENCE_LATENT_PIXELS,
        gradient_checkpointing: bool = False,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_controllers: Sequence[AttentionController] | None = None,
        callback_on_step_end: Callable[[DiffusionPipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ):
        r"""Edit ``image`` from ``source_prompt`` (what it shows) towards ``target_prompt``.

        Args:
            image: one image or a batch in diffusers' formats (PIL, path, numpy, torch in [0, 1]) or latents.
            source_prompt / target_prompt: what the input shows / what the result should show (one, or one per image).
            method: ``"flowedit"`` (inversion-free delta-velocity ODE, Kulikov et al. 2025; the default) or
                ``"dds"`` (delta denoising score with velocities, optimised by SGD); see :mod:`editkit.flow_edit`.
            num_inference_steps: FlowEdit: the schedule's steps ``T`` (None: SD3 50, FLUX 28, the paper's);
                DDS: optimisation iterations (None: 200).
            n_max: FlowEdit: steps run, the last ``n_max`` of ``T`` (None: SD3 33, FLUX 24 at the paper's ``T``,
                the same share of another ``T``). n_min: the last ``n_min`` of them are plain target sampling
                (0). n_avg: noise draws averaged per step (1).
            guidance_scale: the TARGET branch's guidance (None: SD3 13.5, FLUX 5.5; FlowEdit's ``tar_guidance_scale``):
                classifier-free on SD3 and FLUX without distilled guidance, FLUX.1-dev's distilled input otherwise.
            source_guidance_scale: the source branch's (None: SD3 3.5, FLUX 1.5).
            learning_rate: DDS's SGD step (0.1), and on FlowEdit the step of the contrastive correction.
            min_timestep / max_timestep: DDS: each iteration's timestep is uniform in [min, max) ([50, 950);
                sigma = t / 1000).
            contrast: PatchNCE direction ``"source"`` (CDS), ``"target"`` (CUT), ``"dual"`` (both, editkit's
                reading of DCDS) or None (plain FlowEdit / DDS). On FlowEdit the term is editkit's extension (the
                paper has none).
            contrast_weight: the contrastive loss's weight (CDS: 3.0). dds_weight: the DDS term's (1.0).
            num_patches, patch_sizes, tau: PatchNCE's locations per site and patch size (256), pooled patch
                sides (1, 2) and temperature (0.07).
            feature: the image-token attention feature compared: ``"output"`` (after ``to_out``), ``"query"``,
                ``"key"`` or ``"value"``.
            contrast_sites: site patterns (None: every ``transformer_blocks`` layer: SD3 joint blocks and SD3.5's
                ``attn2``, FLUX's double-stream blocks).
            mask: optional {0, 1} mask at the image's size or aspect ratio: updates (and patches) stay inside it.
            negative_prompt: the unconditional prompt of classifier-free guidance (``""``); unused by distilled FLUX.
            height, width: processing size (default: the image's, rounded to the VAE factor; FLUX: multiples of 16).
            max_sequence_length: T5 tokens (None: the backbone's, SD3 256, FLUX 512; 0 for a model without T5).
            loss_scale, reference_latent_pixels: DDS's surrogate scale 2000 / 4096, as on UNets.
            gradient_checkpointing: recompute transformer activations in the contrastive backward pass.
            generator: the only source of randomness (noise, DDS timesteps, patch locations).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``. return_dict: ``False`` returns ``(images,)``.
            attention_controllers: extra controllers attached for the run (e.g. SoftREPA tokens).
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` after each step; a returned
                ``"latents"`` replaces the edited latent; ``pipe._interrupt = True`` stops.
        """
        # 1. Check inputs
        prompts = {"source_prompt": source_prompt, "target_prompt": target_prompt}
        numbers = {"learning_rate": learning_rate, "tau": tau, "contrast_weight": contrast_weight,
                   "dds_weight": dds_weight, "loss_scale": loss_scale}  # fmt: skip
        defaults = FLOW_EDIT_DEFAULTS[self.family]
        scales = {
            "source_guidance_scale": _or(source_guidance_scale, defaults.source_guidance_scale),
            "guidance_scale": _or(guidance_scale, defaults.target_guidance_scale),
        }
        self._check_inputs(prompts, numbers | scales, method, contrast, feature, patch_sizes, num_patches)
        steps, n_max = self._steps(method, num_inference_steps, n_max, n_min, n_avg, min_timestep, max_timestep)
        if mask is not None and method == "flowedit" and n_min > 0:
            raise InputError("mask with n_min > 0 is not supported (the sampling steps would leave noise outside it)")
        if isinstance(generator, list):
            raise InputError("flow editing takes one generator (the batch shares each step's noise draw)")
        check_output_type(output_type)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        recorder = self._recorder(contrast, contrast_sites, feature)
        self._interrupt = False
        options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        backbone = backbone_for(self, **options)
        distilled = bool(getattr(backbone, "guidance_distilled", False))

        # 2. Encode the image (posterior mean) and the prompts
        pixels = pipeline_images(self, image, height=height, width=width)
        size = pixel_size(pixels, self.vae, self.vae_scale_factor)
        if self.family == "flux" and (size[0] % 16 or size[1] % 16):
            raise InputError(f"FLUX needs a height and width that are multiples of 16, got {size[1]}x{size[0]}")
        source_latents = image_latents(self, pixels).float()
        region = latent_edit_region(mask, size, source_latents)
        text = self._text(backbone, prompts, negative_prompt, source_latents.shape[0], distilled)

        # 3. Controllers: extra ones (SoftREPA) first, then the feature recorder
        controller = compose(*(attention_controllers or ()), recorder)
        velocities = FlowVelocities(
            backbone, text, scales["source_guidance_scale"], scales["guidance_scale"], controller
        )
        settings = FlowEditSettings(
            method=method, n_max=n_max, n_min=n_min, n_avg=n_avg, num_iterations=steps, min_timestep=min_timestep,
            max_timestep=max_timestep, learning_rate=learning_rate, dds_weight=dds_weight,
            dds_scale=loss_scale / reference_latent_pixels, contrast_weight=contrast_weight, region=region,
            contrast_options={"direction": contrast, "patch_sizes": tuple(int(p) for p in patch_sizes),
                              "num_patches": num_patches, "tau": tau},
        )  # fmt: skip

        # 4. Edit
        kernel = self.attention_kernel
        total = n_max if method == "flowedit" else steps
        with (
            attach(self.transformer, controller, backend=kernel.backend, sdpa_backends=kernel.sdpa_backends,
                   chunk_size=kernel.chunk_size),
            frozen_for_backward(self.transformer, gradient_checkpointing and recorder is not None),
            self.progress_bar(total=total) as progress,
        ):  # fmt: skip

            def on_step(i: int, t: float, latents: torch.Tensor) -> tuple[torch.Tensor, bool]:
                latents = step_callback(self, callback_on_step_end, i, t, {"latents": latents}, names)["latents"]
                progress.update()
                return latents, bool(self._interrupt)

            if method == "flowedit":
                schedule = self._schedule(steps, source_latents)
                loop = flowedit_loop(velocities, source_latents, schedule, settings, generator, recorder, on_step)
            else:
                loop = flow_dds_loop(velocities, source_latents, settings, generator, recorder, on_step)
        latents, used, losses = loop

        # 5. Decode
        images = postprocess(self.vae, latents.to(self.vae.dtype), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return FlowEditPipelineOutput(images=images, latents=latents, timesteps=used, contrastive_losses=losses)


class SD3ContrastiveEditPipeline(_FlowEditMethod, SD3PipelineBase):
    r"""FlowEdit / flow DDS with the (dual) contrastive term on SD3 / SD3.5 (``StableDiffusion3Pipeline``'s components).

    Example:
        >>> from pipelines.flow_edit import SD3ContrastiveEditPipeline
        >>> pipe = SD3ContrastiveEditPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
        >>> edited = pipe(image, "a photo of a cat", "a photo of a dog", generator=torch.Generator().manual_seed(0))
    """


class FluxContrastiveEditPipeline(_FlowEditMethod, FluxPipelineBase):
    r"""FlowEdit / flow DDS with the (dual) contrastive term on FLUX.1 (``FluxPipeline``'s components).

    Example:
        >>> from pipelines.flow_edit import FluxContrastiveEditPipeline
        >>> pipe = FluxContrastiveEditPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")
        >>> edited = pipe(image, "a photo of a cat", "a photo of a dog", generator=torch.Generator().manual_seed(0))
    """
