"""Training-free attention-swapping style transfer (AttenST, after StyleID) on SD3 / SD3.5 and FLUX.1.

Two thin classes, one per family (``SD3StyleTransferPipeline``, ``FluxStyleTransferPipeline``), with
the components of ``StableDiffusion3Pipeline`` / ``FluxPipeline``; the method is
:mod:`editkit.flow_style` and its loop :mod:`editkit.flow_style_loop`, shared by both.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import BaseOutput
from PIL import Image

from editkit.attention import AttentionController, AttentionKernelMixin, attach, compose
from editkit.backbones import FlowConditioning, backbone_for
from editkit.backbones.pipeline_bases import FluxPipelineBase, SD3PipelineBase
from editkit.conditioning import as_prompt_list
from editkit.errors import InputError
from editkit.flow_style import (
    FlowStyleInjectionController,
    default_num_inference_steps,
    flow_model_fingerprint,
    resolve_flow_style_sites,
)
from editkit.flow_style_loop import (
    flow_generation_schedule,
    flow_injection_keys,
    generate_stylized,
    invert_recording,
    schedule_extra,
)
from editkit.image import check_mask_aspect
from editkit.pipeline_io import (
    as_list,
    broadcast,
    callback_tensor_names,
    check_output_type,
    image_latents,
    mask_batch_tensor,
    phase_label,
    pipeline_images,
    pixel_size,
    postprocess,
    split_image_batch,
    step_callback,
)
from editkit.style import StyleCache, check_style_arguments, content_aware_adain
from editkit.style_file import check_flow_schedule

logger = logging.getLogger(__name__)


@dataclass
class FlowStyleTransferPipelineOutput(BaseOutput):
    """``images``: per content image, one stylized image per style (ordered by content, then style).

    ``style_caches``: the styles' features (for the first content's text); ``content_caches``: one per
    content image; ``content_cache``: the first of them (one content image, the common case).
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    style_caches: list[StyleCache]
    content_cache: StyleCache
    content_caches: list[StyleCache] | None = None


class _FlowStyleTransfer(AttentionKernelMixin):
    r"""The shared ``__call__`` of the MM-DiT style transfer pipelines (a mixin, not a pipeline).

    AttenST's components on joint attention: style-guided attention at ``injection_sites`` (image-token
    keys/values of the style, image-token queries ``gamma``-mixed with the content's, logits against
    the style keys times ``tau``; text tokens the content's) and content-aware AdaIN of the start latent.
    Inversion and generation are Euler steps along the family pipeline's schedule. Cost per new pair:
    style inversion N + content inversion N + generation N transformer calls (N + N with a cached style).
    A batch of B content images with S styles costs B N (contents) + S N per distinct text (styles) + B S N
    (generations): items run one after another, as in ``StyleTransferPipeline`` (the features are per image).
    Not available here (UNet only): ``resample_steps``, ``feature_timing``, IP-Adapter, CFG.
    """

    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    _interrupt: bool = False

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _attach(self, controller: AttentionController):
        kernel = self.attention_kernel
        return attach(self.transformer, controller, backend=kernel.backend, sdpa_backends=kernel.sdpa_backends,
                      chunk_size=kernel.chunk_size)  # fmt: skip

    def check_inputs(self, content_image, styles, caches, gamma, tau, adain_strength, steps, window, unet_only):
        if not isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            raise InputError(f"style transfer on {self.family} needs a FlowMatchEulerDiscreteScheduler")
        for name, (value, default) in unet_only.items():
            if value != default:
                raise InputError(f"{name}={value!r} is a UNet (SD/SDXL) style transfer option; not available "
                                 f"on this {self.family} (MM-DiT) model")  # fmt: skip
        check_style_arguments(content_image, styles, caches, gamma, tau, adain_strength, steps)
        if window is not None and (len(window) != 2 or not 0 <= window[0] <= window[1] <= 1):
            raise InputError(f"injection_sigmas must be (low, high) with 0 <= low <= high <= 1, got {window}")

    def _latents(self, image, size: tuple[int, int] | None, name: str) -> torch.Tensor:
        """An image input -> the transformer's latents (a (B, latent channels, h, w) tensor is taken as latents)."""
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == self.vae.config.latent_channels:
            return image.to(self._execution_device, self.transformer.dtype)  # editkit's image reader knows 4 only
        width, height = size or (None, None)
        batch = pipeline_images(self, image, height=height, width=width, name=name)
        return image_latents(self, batch).to(self.transformer.dtype)

    @torch.no_grad()
    def __call__(
        self,
        content_image: PipelineImageInput | None = None,
        style_image: PipelineImageInput | Sequence[PipelineImageInput] | None = None,
        *,
        style_cache: StyleCache | Sequence[StyleCache] | None = None,
        content_cache: StyleCache | Sequence[StyleCache] | None = None,
        prompt: str | Sequence[str] = "",
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | Sequence[str] = "",
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        gamma: float = 0.75,
        tau: float = 1.5,
        adain_strength: float | None = 0.6,
        injection_sites: str | Sequence[str] | None = None,
        injection_sigmas: tuple[float, float] | None = None,
        mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        style_size: tuple[int, int] | None = None,
        max_sequence_length: int | None = None,
        offload_features: bool = False,
        resample_steps: int = 0,
        feature_timing: str = "inversion_step",
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_controllers: Sequence[AttentionController] | None = None,
    ):
        r"""Stylize each content image with each style: images ordered by content, then style (style images
        first, then caches).

        Args:
            content_image: one content image or a batch in diffusers' formats (PIL, path, array, tensor in
                [0, 1], a list), or their (B, C, h, w) latents; a batch is processed at its first item's size.
                Needed for its size when ``content_cache`` is given.
            style_image: one or more style images (any size: keys need not match the content's).
            style_cache / content_cache: features of an earlier run (``output.style_caches``,
                ``output.content_caches``, ``StyleCache.load``), validated against this model's family,
                fingerprint, sites and schedule; one content cache per content image.
            prompt: optional text for inversion and generation (empty: the StyleID setting), one or one per
                content image; the styles are inverted once per distinct text.
            prompt_embeds, pooled_prompt_embeds: given text embeddings instead of ``prompt`` (diffusers'
                names and ``encode_prompt``'s outputs: ``(rows, tokens, joint_attention_dim)``, ``(rows,
                pooled)``), one row or one per content image.
            guidance_scale: None or 1.0 (the default): the StyleID no-guidance setting, one transformer pass
                per step. FLUX.1-dev: the distilled guidance input, in inversion and generation alike. SD3 /
                SD3.5: classifier-free guidance in generation when above 1 (as ``StableDiffusion3Pipeline``),
                both branches injected (as AttenST does on UNets), twice the generation's batch; the
                inversions run the prompt alone (guidance 1), as on UNets.
            negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional text of
                SD3's classifier-free guidance (default ``""``), one or one per content image; unused without
                it (as in diffusers). FLUX.1 has no CFG: a negative prompt is refused there.
            num_inference_steps: Euler steps N shared by inversion and generation (None: the family
                pipeline's default: SD3 28, FLUX.1-dev 28, FLUX.1-schnell 4).
            gamma: image-token query preservation (0: the stylized latent's query, 1: the content's).
            tau: temperature: logits against the injected style keys multiplied by ``tau`` (1: plain).
            adain_strength: a_s of the content-aware AdaIN of the start latent (1: AdaIN, 0 / None: off).
            injection_sites: site names or patterns (joint ``transformer_blocks.{i}.attn``, FLUX
                ``single_transformer_blocks.{i}.attn``, SD3.5 ``transformer_blocks.{i}.attn2``); None: the
                family's defaults (``editkit.flow_style.default_flow_style_sites``).
            injection_sigmas: inject only at steps with ``low <= sigma <= high`` (None: every step but the first,
                AttenST's every-step setting). Lower ``high`` keeps more of the content's layout and moves
                less colour (measured on shapes-sd3: ``benchmarks/RESULTS.md``, issue 23).
            mask: (1, 1, H, W) or (H, W) {0, 1} mask of the content's aspect ratio: stylize only inside it.
            height, width / style_size: processing sizes (default: the images' own).
            max_sequence_length: T5 tokens (None: the family's default; 0 for models trained without T5).
            offload_features: keep recorded features on the CPU, streamed to the device per step (the
                default sites at 1024 px and 28 steps record about 4 GB of style keys/values on SD3.5-medium
                and 24 GB on FLUX.1: pass it, or fewer sites / a narrower window, on FLUX).
            resample_steps, feature_timing: UNet-only options, accepted so shared calling code works;
                anything but their defaults is refused.
            generator: accepted for API symmetry; the method is deterministic.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: ``False`` returns ``(images, style_caches, content_caches)``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each
                generation step; a returned ``"latents"`` replaces the latent; ``pipe._interrupt`` stops.
            attention_controllers: extra controllers attached for the whole run.
        """
        styles = [item for style in as_list(style_image) for item in split_image_batch(style)]
        given_caches = as_list(style_cache)
        steps = num_inference_steps or default_num_inference_steps(self.family, self.transformer)
        unet_only = {"resample_steps": (resample_steps, 0), "feature_timing": (feature_timing, "inversion_step")}
        self.check_inputs(content_image, styles, given_caches, gamma, tau, adain_strength, steps, injection_sigmas,
                          unet_only)  # fmt: skip
        check_output_type(output_type)
        backbone = self._backbone(guidance_scale, max_sequence_length)
        negative_embeds = (negative_prompt_embeds, negative_pooled_prompt_embeds)
        negative_given = any(as_prompt_list(negative_prompt, "negative_prompt")) or any(
            rows is not None for rows in negative_embeds
        )
        if self.family == "flux" and negative_given:
            raise InputError("negative_prompt: FLUX.1 runs without classifier-free guidance (distilled); give none")
        cfg = self.family == "sd3" and guidance_scale is not None and guidance_scale > 1.0
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        sites = resolve_flow_style_sites(self.transformer, injection_sites)
        extra = list(attention_controllers or [])
        self._interrupt = False

        # 1. Contents (every batch item), one text per item, the shared schedule and the injection window.
        contents = self._latents(content_image, (width, height) if width and height else None, "content_image")
        given = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds,
                 "negative_prompt_embeds": negative_prompt_embeds,
                 "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds}  # fmt: skip
        embeds = {name: rows for name, rows in given.items() if rows is not None and (cfg or "negative" not in name)}
        texts_by_role = broadcast(
            {"prompt": as_prompt_list(prompt), "negative_prompt": as_prompt_list(negative_prompt, "negative_prompt")},
            {"content_image": len(contents), **{name: len(rows) for name, rows in embeds.items()}},
        )
        prompts = texts_by_role["prompt"]
        batch = len(prompts)
        contents = contents.expand(batch, -1, -1, -1) if len(contents) == 1 else contents
        given_content = as_list(content_cache)
        if given_content and len(given_content) != batch:
            raise InputError(f"got {len(given_content)} content caches for {batch} content images")
        schedule = flow_generation_schedule(backbone, steps, tuple(contents.shape[-2:]))
        keys = flow_injection_keys(schedule, injection_sigmas)
        # one text per item, encoded (and the styles inverted) once per distinct prompt or embedding row
        text_keys = _text_keys(prompts, embeds, "prompt_embeds", "pooled_prompt_embeds")
        texts = self._encode_once(backbone, prompts, text_keys, prompt_embeds, pooled_prompt_embeds)
        uncond = [None] * batch  # SD3's CFG: the unconditional text per item
        if cfg:
            negatives = texts_by_role["negative_prompt"]
            negative_keys = _text_keys(negatives, embeds, "negative_prompt_embeds", "negative_pooled_prompt_embeds")
            uncond = self._encode_once(backbone, negatives, negative_keys, *negative_embeds)
        size = _pixel_size(self, contents)
        if mask is not None:
            style_size = size
            check_mask_aspect(tuple(torch.as_tensor(mask).shape[-2:])[::-1], size)
        header = {"model_name": str(getattr(self.config, "_name_or_path", ""))}
        invert = lambda latents, kind, text, label: invert_recording(  # noqa: E731
            backbone, latents, text, schedule, kind=kind, sites=sites if kind == "style" or gamma > 0 else [],
            keys=keys, attach_to=self._attach, offload="cpu" if offload_features else None, extra=extra,
            header={**header, "size": _pixel_size(self, latents)},
        )  # fmt: skip
        expected = {"model": flow_model_fingerprint(self.transformer), "family": self.family, "timesteps": keys}
        with self._attach(compose(*extra)) if extra else contextlib.nullcontext():
            # 2. Content inversions (their image-token queries), unless cached: one per batch item.
            content_caches = given_content or [
                invert(contents[i : i + 1], "content", texts[i], phase_label("inverting content", i, batch))
                for i in range(batch)
            ]
            for cache in content_caches:
                self._validate(cache, "content", sites if gamma > 0 else [], expected, schedule, size)

            # 3. Style inversions (their image-token keys and values), unless cached: once per distinct text.
            style_latents = [self._latents(s, style_size, "style_image") for s in styles]
            for cache in given_caches:
                self._validate(cache, "style", sites, expected, schedule, None)
            caches_by_text = {}
            for index, key in enumerate(text_keys):
                if key not in caches_by_text:
                    caches_by_text[key] = [
                        invert(s, "style", texts[index], phase_label("inverting style", j, len(styles)))
                        for j, s in enumerate(style_latents)
                    ] + given_caches

            # 4. Generation per content and style: AdaIN'd start latent, injected attention.
            options = {"sites": sites, "keys": keys, "gamma": gamma, "tau": tau, "adain_strength": adain_strength,
                       "mask": mask_batch_tensor(mask), "callback": (callback_on_step_end, names),
                       "extra": extra, "guidance_scale": guidance_scale}  # fmt: skip
            latents = [
                self._generate(backbone, content_features, cache, (texts[index], uncond[index]), schedule, options)
                for index, content_features in enumerate(content_caches)
                for cache in caches_by_text[text_keys[index]]
            ]

        # 5. Decode the final latents.
        images = postprocess(self.vae, torch.cat(latents), output_type)
        self.maybe_free_model_hooks()
        caches = caches_by_text[text_keys[0]]
        if not return_dict:
            return images, caches, content_caches
        return FlowStyleTransferPipelineOutput(images, caches, content_caches[0], content_caches)

    def _backbone(self, guidance_scale: float | None, max_sequence_length: int | None):
        options = {} if max_sequence_length is None else {"max_sequence_length": int(max_sequence_length)}
        if self.family == "flux":
            options["guidance_scale"] = 1.0 if guidance_scale is None else float(guidance_scale)
        elif guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
        return backbone_for(self, **options)

    def _encode_once(self, backbone, prompts, keys, prompt_embeds, pooled_prompt_embeds) -> list[FlowConditioning]:
        """One text per item, encoded once per distinct key (a prompt, or an item's embedding row)."""
        encoded = {}
        for i, key in enumerate(keys):
            if key not in encoded:
                encoded[key] = self._conditioning(backbone, prompts[i], _row(prompt_embeds, i),
                                                  _row(pooled_prompt_embeds, i))  # fmt: skip
        return [encoded[key] for key in keys]

    def _conditioning(self, backbone, prompt, prompt_embeds, pooled_prompt_embeds) -> FlowConditioning:
        if prompt_embeds is None and pooled_prompt_embeds is None:
            return backbone.encode_text(prompt)
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise InputError("give both prompt_embeds and pooled_prompt_embeds (or neither)")
        if prompt:
            raise InputError("give prompt or prompt_embeds, not both")
        dtype, device = self.transformer.dtype, self._execution_device
        text_ids = None
        if self.family == "flux":  # FluxPipeline.encode_prompt's text ids: all zero
            text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        return FlowConditioning(prompt_embeds.to(device, dtype), pooled_prompt_embeds.to(device, dtype), text_ids)

    def _validate(self, cache, kind, sites, expected, schedule, size) -> None:
        label = f"{kind} cache"
        timesteps = expected["timesteps"] if sites else []
        cache.validate(kind=kind, model=expected["model"], sites=sites, timesteps=timesteps, size=size, label=label,
                       family=expected["family"])  # fmt: skip
        check_flow_schedule(cache.extra, schedule_extra(schedule), label)

    def _generate(self, backbone, content_cache, cache, texts, schedule, options) -> torch.Tensor:
        """One stylized latent: the AdaIN'd content start latent, Euler steps with injected attention
        (``texts``: the conditional text and the unconditional one of SD3's CFG, or None)."""
        conditioning, uncond = texts
        device, gamma = self._execution_device, options["gamma"]
        start = content_cache.final_latent.to(device, self.transformer.dtype)
        if options["adain_strength"] is not None:
            start = content_aware_adain(start, cache.final_latent.to(device), options["adain_strength"])
        controller = FlowStyleInjectionController(
            options["sites"], cache, content_cache if gamma > 0 else None, gamma=gamma, tau=options["tau"],
            keys=options["keys"], mask=options["mask"],
        )  # fmt: skip
        callback, names = options["callback"]

        def hook(index: int, timestep: float, latents: torch.Tensor) -> torch.Tensor:
            return step_callback(self, callback, index, timestep, {"latents": latents}, names)["latents"]

        progress = lambda steps: self.progress_bar(list(steps))  # noqa: E731
        with self._attach(controller):
            return generate_stylized(
                backbone, start, conditioning, schedule, compose(*options["extra"], controller), uncond=uncond,
                guidance_scale=options["guidance_scale"] or 1.0, step_hook=hook if callback is not None else None,
                progress=progress, interrupted=lambda: self.interrupt,
            )  # fmt: skip


class SD3StyleTransferPipeline(_FlowStyleTransfer, SD3PipelineBase):
    """Style transfer on SD3 / SD3.5 (``StableDiffusion3Pipeline``'s components; see ``_FlowStyleTransfer``).

    Example:
        ```py
        >>> pipe = SD3StyleTransferPipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium")
        >>> out = pipe(Image.open("content.png"), [Image.open("style.png")], gamma=0.75, tau=1.5)
        ```
    """


class FluxStyleTransferPipeline(_FlowStyleTransfer, FluxPipelineBase):
    """Style transfer on FLUX.1 dev / schnell (``FluxPipeline``'s components; see ``_FlowStyleTransfer``)."""


def _text_keys(prompts: list[str], embeds: dict, *names: str) -> list:
    """What tells the items' texts apart: their prompts, or their indices when embeddings have a row per item."""
    per_item = any(len(embeds.get(name, ())) > 1 for name in names)
    return list(range(len(prompts))) if per_item else list(prompts)


def _row(rows: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Item ``index``'s row of given embeddings (one row: shared by every item)."""
    return None if rows is None else rows[index : index + 1] if len(rows) > 1 else rows


def _pixel_size(pipe, latents: torch.Tensor) -> tuple[int, int]:
    """(width, height) in pixels of a latent batch."""
    height, width = pixel_size(latents, pipe.vae, pipe.vae_scale_factor)
    return width, height
