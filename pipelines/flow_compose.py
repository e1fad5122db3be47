"""Compositional text-to-image on MM-DiT models: SD3 / SD3.5 (``SD3ComposePipeline``) and FLUX.1
(``FluxComposePipeline``).

"Fine-Grained Alignment and Noise Refinement for Compositional Text-to-Image Generation" (arXiv
2503.06506) with Attend-and-Excite's guided latent updates, on the image-query x text-key attention
of chosen joint blocks. Both classes are thin: they take the family's diffusers components under
``StableDiffusion3Pipeline``'s / ``FluxPipeline``'s names and run the loop of
``editkit.flow_compose`` through the family's backbone (``editkit.backbones``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.utils import BaseOutput

from editkit.acceleration import frozen_weights
from editkit.attention import AttentionController, attach, compose
from editkit.attention.pipeline_mixin import AttentionKernelMixin
from editkit.backbones import FluxBackbone, SD3Backbone, check_site_names
from editkit.backbones.pipeline_bases import FluxPipelineBase, SD3PipelineBase
from editkit.compose_choices import check_compose_choices
from editkit.constraints import Constraints, constraints_from_dict, parse_prompt
from editkit.errors import InputError
from editkit.flow_compose import FlowComposeRun, compose_one, with_tokens
from editkit.flow_compose_maps import FlowMapStore, align_prompt, map_sites_for, text_streams
from editkit.flow_inversion import flow_schedule, flux_mu
from editkit.loss_presets import preset_weights
from editkit.pipeline_io import (
    as_list,
    as_prompt_list,
    callback_tensor_names,
    check_generators,
    check_num_images,
    check_output_type,
    postprocess,
    prepare_noise,
    step_callback,
)
from editkit.refine import loss_plan, step_sizes
from editkit.verifiers import ConstraintStatus, Verifier, make_verifier


@dataclass
class FlowComposePipelineOutput(BaseOutput):
    """Images and the constraint report (fields as ``ComposePipelineOutput``; lists with several images).

    ``report_before``/``report_after``: each constraint's status after stage 1 and after noise
    refinement (``None`` when not run); ``chosen``: ``"stage1"`` or ``"refined"``;
    ``initial_noise``/``refined_noise``: stage 1's and stage 2's z_T (spatial latents).
    """

    images: Any
    constraints: Constraints
    report_before: list[ConstraintStatus] | None
    report_after: list[ConstraintStatus] | None
    chosen: str
    initial_noise: torch.Tensor
    refined_noise: torch.Tensor | None
    warnings: list[str]


class _FlowCompose(AttentionKernelMixin):
    """The ``__call__`` both families share (not a pipeline by itself).

    A callback may set ``pipe._interrupt = True`` to stop after the current step, as in diffusers.
    """

    family: ClassVar[str]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    _guidance_scale: float = 1.0
    _num_timesteps: int = 0
    _interrupt: bool = False

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.family == "sd3" and self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- per-family answers -------------------------------------------------------------------
    def stock_pipeline(self) -> DiffusionPipeline:
        """diffusers' own pipeline on the same modules (the backbone encodes text and packs latents with it)."""
        raise NotImplementedError

    def default_steps(self) -> int:
        return 28  # StableDiffusion3Pipeline / FluxPipeline (FLUX.1-dev)

    def default_guidance(self) -> float:
        raise NotImplementedError

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        raise NotImplementedError

    # -- inputs -------------------------------------------------------------------------------
    def check_inputs(self, prompt, height, width, num_inference_steps, max_iter_to_alter, verifier):
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("prompt must be a non-empty string (constraints are parsed from it)")
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise InputError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not 0 <= max_iter_to_alter <= num_inference_steps:
            raise InputError(f"max_iter_to_alter must be in 0..num_inference_steps, got {max_iter_to_alter}")
        if not (isinstance(verifier, Verifier) or verifier in ("attention", "shapes")):
            raise InputError(f"verifier must be 'attention', 'shapes' or a Verifier instance, got {verifier!r}")

    @property
    def size_multiple(self) -> int:
        """Pixels each side is a multiple of: SD3 ``vae_scale_factor x patch_size``; FLUX: x 2 (latent packing)."""
        patch = 2 if self.family == "flux" else int(self.transformer.config.patch_size)
        return self.vae_scale_factor * patch

    def constraints_for(self, prompt: str, constraints, parser: str) -> Constraints:
        if isinstance(constraints, dict):
            return constraints_from_dict(constraints, prompt)
        if constraints is None:
            return parse_prompt(prompt, parser)
        if constraints.prompt != prompt:
            raise InputError("the constraints were made for another prompt")
        return constraints

    # -- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        constraints: Constraints | dict | list | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        max_iter_to_alter: int | None = None,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        refinement_thresholds: dict[int, float] | None = None,
        max_refinement_steps: int = 20,
        loss_preset: str = "attend-excite",
        missing_weight: float | None = None,
        mixing_weight: float | None = None,
        binding_weight: float | None = None,
        spatial_weight: float | None = None,
        spatial_margin: float = 0.1,
        token_softmax_scale: float = 100.0,
        smooth_attention: bool = True,
        smoothing_kernel_size: int = 3,
        smoothing_sigma: float = 0.5,
        map_sites: Sequence[str] | None = None,
        map_text_encoders: Sequence[str] | None = None,
        refine: bool = True,
        verifier: str | Verifier = "attention",
        noise_refiner: str = "single-step",
        noise_step_size: float = 20.0,
        initno_steps: int = 10,
        noise_refinement_rounds: int = 1,
        constraint_parser: str = "auto",
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_controllers: Sequence[AttentionController] | None = None,
    ):
        r"""Generate ``prompt`` with its constraints (entities, attribute bindings, relations) enforced.

        Args:
            num_inference_steps: None = the family's default (28; FLUX.1-schnell 4).
            guidance_scale: SD3: the classifier-free guidance scale (None: 7.0, diffusers' default;
                <= 1 turns CFG off). FLUX: the distilled guidance input of FLUX.1-dev (None: 3.5), ignored
                by FLUX.1-schnell (no guidance embedding); FLUX runs without CFG.
            negative_prompt: SD3 only (the CFG branch); FLUX has no CFG here.
            max_sequence_length: T5 tokens (None: 256 on SD3, 512 on FLUX, as diffusers); 0 on SD3
                drops the T5 part (``assets/models/shapes-sd3`` was trained so).
            max_iter_to_alter: steps with a guided latent update (None: half of the steps, the paper's 25
                of 50; at FLUX.1-schnell's 4 steps that is steps 0 and 1, sigma 1 and 0.75, where the
                layout forms: later steps only refine detail, and a guided update there cannot move objects).
            scale_factor, scale_range, refinement_thresholds, max_refinement_steps, loss_preset, *_weight,
                spatial_margin, token_softmax_scale, smooth_attention, smoothing_kernel_size,
                smoothing_sigma, refine, verifier, noise_refiner, noise_step_size, initno_steps,
                noise_refinement_rounds, constraint_parser, attention_controllers: as in ``ComposePipeline``
                (A&E's step sizes, the two loss presets, the verifiers and noise refiners, unchanged).
            map_sites: the text-attending attention sites whose image-query x text-key attention is
                averaged into the maps (names or block prefixes such as ``transformer_blocks.1``;
                FLUX single blocks ``single_transformer_blocks.N``). None: the middle half of the
                joint / double-stream blocks (``editkit.flow_compose_maps.DEFAULT_MAP_SPAN``, chosen by
                measurement on shapes-sd3); the guided pass stops after the last of them (early exit).
            map_text_encoders: which tokens of the text sequence the maps use: ``"clip"``, ``"t5"`` or
                both (None: every stream present; FLUX has T5 only).
            num_images_per_prompt, generator (one or one per image), latents, output_type,
                callback_on_step_end(_tensor_inputs): as in diffusers' pipelines.
        """
        # 0. Defaults and checks; one initial noise per output, drawn at once as diffusers does
        prompts = as_prompt_list(prompt)
        per_prompt = as_list(constraints) or [None]
        if len(per_prompt) not in (1, len(prompts)):
            raise InputError(f"got {len(per_prompt)} constraints for {len(prompts)} prompts")
        per_prompt = per_prompt * len(prompts) if len(per_prompt) == 1 else per_prompt
        check_num_images(num_images_per_prompt)
        side = self.default_sample_size * self.vae_scale_factor
        height, width = height or side, width or side
        steps = self.default_steps() if num_inference_steps is None else int(num_inference_steps)
        guided = steps // 2 if max_iter_to_alter is None else max_iter_to_alter
        for text in prompts:
            self.check_inputs(text, height, width, steps, guided, verifier)
        check_compose_choices(loss_preset, noise_refiner, noise_refinement_rounds)
        if negative_prompt is not None and self.family == "flux":
            raise InputError("negative_prompt: FLUX runs without classifier-free guidance here (distilled guidance)")
        if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        check_output_type(output_type)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        total = len(prompts) * num_images_per_prompt
        check_generators(generator, total)
        scale = self.default_guidance() if guidance_scale is None else float(guidance_scale)
        sequence = self.default_sequence_length if max_sequence_length is None else int(max_sequence_length)
        check_site_names(self.family, [map_sites] if isinstance(map_sites, str) else list(map_sites or []), "map_sites")
        sites = map_sites_for(self.transformer, map_sites)
        device = self._execution_device
        shape = (total, *self.latent_shape(height, width))
        latents = prepare_noise(shape, generator, device, self.transformer.dtype, latents)

        # 1. Backbone, text conditioning and schedule (shared by every output)
        backbone = self.backbone(sequence)
        cfg = self.family == "sd3" and scale > 1.0
        self._guidance_scale, self._num_timesteps, self._interrupt = scale, steps, False
        schedule = self.schedule(steps, shape[-2:])
        weights = preset_weights(
            loss_preset, missing=missing_weight, mixing=mixing_weight, binding=binding_weight, spatial=spatial_weight
        )
        weights.spatial_margin = spatial_margin
        store = FlowMapStore(sites)
        controller = compose(store, *(attention_controllers or []))

        def on_step(i, t, step_latents):
            return step_callback(self, callback_on_step_end, i, t, {"latents": step_latents}, names)["latents"]

        uncond = backbone.encode_text([negative_prompt or ""]) if cfg else None
        template = FlowComposeRun(
            backbone=backbone, cond=None, uncond=uncond, guidance_scale=scale, tokens=None, weights=weights,
            loss_preset=loss_preset, store=store, controller=controller, schedule=schedule, guided_steps=0,
            capture_steps=0, pipe=self, step_callback=on_step if callback_on_step_end is not None else None,
            map_kwargs={"token_softmax_scale": token_softmax_scale, "smooth": smooth_attention,
                        "kernel_size": smoothing_kernel_size, "sigma": smoothing_sigma},
            step_sizes=torch.tensor(step_sizes(steps, scale_factor, scale_range), device=device),
            thresholds=dict(refinement_thresholds or {}), max_refinement_steps=max_refinement_steps,
        )  # fmt: skip
        options = {"refine": refine, "noise_refiner": noise_refiner, "noise_step_size": noise_step_size,
                   "initno_steps": initno_steps, "noise_refinement_rounds": noise_refinement_rounds}  # fmt: skip
        streams = text_streams(self, self.family, sequence, map_text_encoders)
        verifier = make_verifier(verifier)

        # 2.-5. Each output: constraints -> tokens, stage 1, verification, stage 2 (prompt-major)
        outputs = []
        # the weights out of autograd while guiding: a loaded model's requires_grad=True would keep every
        # layer's input for a weight gradient nobody asks for (twice the guided pass's activation memory)
        with attach(self.transformer, controller, **self._kernel_options()), frozen_weights(self.transformer):
            for index in range(total):
                item = index // num_images_per_prompt
                notes: list[str] = []
                found = self.constraints_for(prompts[item], per_prompt[item], constraint_parser)
                tokens = align_prompt(found, streams, self.family)
                notes.extend(f"not constrained: {part}" for part in found.unparsed + tokens.aligned.dropped)
                if tokens.aligned.empty:
                    notes.append("no entity found in the prompt; generating without constraint guidance")
                run = with_tokens(template, tokens, device)
                run.cond = backbone.encode_text([prompts[item]])
                run.guided_steps = 0 if tokens.aligned.empty or not weights.any else guided
                needs_maps = refine and not tokens.aligned.empty and verifier.needs_maps
                run.capture_steps = max(guided, 1) if needs_maps else 0
                maps_shape = (tokens.aligned.last_token, *self.token_grid(shape[-2:]))
                run.loss_plan = loss_plan(tokens.aligned, weights, maps_shape, device=device)
                result = compose_one(run, latents[index : index + 1], verifier, options)
                outputs.append({**result, "constraints": found, "warnings": notes})
                if self.interrupt:
                    break

        # 6. Decode the chosen latents
        final = torch.cat([out.pop("final") for out in outputs]).to(self.vae.dtype)
        images = postprocess(self.vae, final, output_type)
        self.maybe_free_model_hooks()
        fields = outputs[0] if total == 1 else {key: [out[key] for out in outputs] for key in outputs[0]}
        output = FlowComposePipelineOutput(images=images, **fields)
        return output if return_dict else (images,)

    def _kernel_options(self) -> dict:
        kernel = self.attention_kernel
        return {"backend": kernel.backend, "sdpa_backends": kernel.sdpa_backends, "chunk_size": kernel.chunk_size}


class SD3ComposePipeline(_FlowCompose, SD3PipelineBase):
    r"""Compositional text-to-image on SD3 / SD3.5 (``StableDiffusion3Pipeline``'s components).

    Example:
        ```py
        >>> from pipelines.flow_compose import SD3ComposePipeline
        >>> pipe = SD3ComposePipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium").to("cuda")
        >>> out = pipe("a red car on the left of a blue bird", generator=torch.Generator().manual_seed(0))
        ```
    """

    default_sequence_length = 256

    def stock_pipeline(self) -> StableDiffusion3Pipeline:
        return StableDiffusion3Pipeline(**self.components)

    def backbone(self, max_sequence_length: int) -> SD3Backbone:
        return SD3Backbone(self.stock_pipeline(), max_sequence_length=max_sequence_length)

    def default_guidance(self) -> float:
        return 7.0  # StableDiffusion3Pipeline

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return int(self.transformer.config.in_channels), height // self.vae_scale_factor, width // self.vae_scale_factor

    def token_grid(self, latent_hw) -> tuple[int, int]:
        patch = int(self.transformer.config.patch_size)
        return latent_hw[0] // patch, latent_hw[1] // patch

    def schedule(self, steps: int, latent_hw):
        return flow_schedule(self.scheduler, steps)


class FluxComposePipeline(_FlowCompose, FluxPipelineBase):
    r"""Compositional text-to-image on FLUX.1-dev / FLUX.1-schnell (``FluxPipeline``'s components).

    FLUX.1-dev takes its distilled guidance (``guidance_scale``) in every pass, guided ones included;
    FLUX.1-schnell (no guidance embedding) runs 4 steps by default, of which 2 are guided.
    """

    default_sequence_length = 512

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))

    def stock_pipeline(self) -> FluxPipeline:
        return FluxPipeline(**self.components)

    def backbone(self, max_sequence_length: int) -> FluxBackbone:
        return FluxBackbone(self.stock_pipeline(), max_sequence_length=max_sequence_length)

    def default_steps(self) -> int:
        return 28 if self.guidance_distilled else 4  # FLUX.1-dev's card; FLUX.1-schnell's

    def default_guidance(self) -> float:
        return 3.5 if self.guidance_distilled else 0.0

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        step = self.vae_scale_factor * 2  # FluxPipeline.prepare_latents: 2 * (side // (vae_scale_factor * 2))
        return int(self.transformer.config.in_channels) // 4, 2 * (height // step), 2 * (width // step)

    def token_grid(self, latent_hw) -> tuple[int, int]:
        return latent_hw[0] // 2, latent_hw[1] // 2

    def schedule(self, steps: int, latent_hw):
        sigmas = np.linspace(1.0, 1 / steps, steps).tolist()  # as FluxPipeline
        mu = flux_mu(self.token_grid(latent_hw)[0] * self.token_grid(latent_hw)[1], self.scheduler)
        return flow_schedule(self.scheduler, steps, sigmas=sigmas, mu=mu)
