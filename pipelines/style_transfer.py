"""Training-free attention-swapping style transfer (AttenST, after StyleID) for SD 1.x/2.x and SDXL.

One file, one ``DiffusionPipeline`` subclass: it also works as a diffusers community pipeline
(``custom_pipeline="pipelines/style_transfer.py"``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import IPAdapterMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils import BaseOutput
from PIL import Image

from editkit.attention import AttentionController, AttentionKernelMixin, compose, exposed_ip_adapters
from editkit.backbones.pipeline_bases import UNetComponents
from editkit.conditioning import EMBEDDING_NAMES, classifier_free_guidance, guidance_conditioning
from editkit.errors import InputError
from editkit.image import check_mask_aspect
from editkit.inversion import (
    ddim_alphas,
    ddim_invert,
    ddim_step,
    generation_scheduler,
    model_eps,
    predicted_x0,
    replay_inverted_latents,
)
from editkit.ip_adapter import (
    clip_image_embeds,
    given_ip_embeds,
    ip_adapter_count,
    ip_embeds_list,
    ip_scales,
    restore_scales,
    scale_snapshot,
)
from editkit.models import model_family
from editkit.pipeline_io import (
    as_list,
    as_prompt_list,
    broadcast,
    callback_tensor_names,
    check_alpha_scheduler,
    check_generators,
    check_num_images,
    check_output_type,
    image_latents,
    is_latents,
    mask_batch_tensor,
    phase_label,
    pipeline_images,
    pixel_size,
    postprocess,
    split_image_batch,
    step_callback,
    unet_call_kwargs,
)
from editkit.style import (
    FeatureRecorder,
    StyleInjectionController,
    check_style_arguments,
    content_aware_adain,
    model_fingerprint,
    resolve_style_sites,
)
from editkit.style_file import FEATURE_TIMINGS, FEATURES_BY_KIND, StyleCache, check_feature_timing

logger = logging.getLogger(__name__)


@dataclass
class StyleTransferPipelineOutput(BaseOutput):
    """``images``: per content image, one stylized image per style (each ``num_images_per_prompt`` times).

    ``style_caches``: the styles' features (for the first prompt); ``content_caches``: one per content
    image; ``content_cache``: the first of them (one content image, the common case).
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    style_caches: list[StyleCache]
    content_cache: StyleCache
    content_caches: list[StyleCache] | None = None


class StyleTransferPipeline(AttentionKernelMixin, UNetComponents, DiffusionPipeline, IPAdapterMixin):
    r"""Stylize a content image with one or more style images by swapping self-attention features.

    AttenST's components (arXiv 2503.07307, building on StyleID, CVPR 2024):

    1. style-guided self-attention: at decoder self-attention ``sites`` the query is
       ``gamma * Q_content + (1 - gamma) * Q``, keys/values are the style's, logits scaled by ``tau / sqrt(d)``;
    2. style-preserving inversion: ``resample_steps`` fixed-point iterations per DDIM inversion step;
    3. content-aware AdaIN of the start latent with style strength ``adain_strength``;
    4. dual-feature cross-attention through IP-Adapter(s) when loaded (``load_ip_adapter``): with two
       adapters the content feeds the first (layout block) and the style the second (style blocks).

    Cost per new pair: style inversion N(1 + r) + content inversion N(1 + r) + generation N UNet passes;
    with a cached style (``output.style_caches``) N(1 + r) + N.

    Example:
        ```py
        >>> from PIL import Image
        >>> from pipelines.style_transfer import StyleTransferPipeline
        >>> pipe = StyleTransferPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
        >>> out = pipe(Image.open("content.png"), [Image.open("style.png")], gamma=0.75, tau=1.5)
        >>> out.images[0].save("stylized.png")
        >>> out.style_caches[0].save("style.safetensors")  # reuse: pipe(content2, style_cache=[cache])
        ```
    """

    _unused_components: ClassVar[tuple[str, ...]] = ("safety_checker",)  # IP-Adapter uses the other two
    _zeros_for_empty_prompt: ClassVar[bool] = False  # StyleID's empty prompt, encoded (SDXL too)

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(
        self, content_image, styles, caches, gamma, tau, adain_strength, steps, resample_steps, window,
        feature_timing="inversion_step",
    ):  # fmt: skip
        check_alpha_scheduler(self.scheduler, "style transfer (DDIM inversion)")
        if feature_timing not in FEATURE_TIMINGS:
            raise InputError(f"feature_timing must be one of {FEATURE_TIMINGS}, got {feature_timing!r}")
        check_style_arguments(content_image, styles, caches, gamma, tau, adain_strength, steps)
        if resample_steps < 0:
            raise InputError(f"resample_steps must be >= 0, got {resample_steps}")
        if window is not None and (len(window) != 2 or window[0] > window[1]):
            raise InputError(f"injection_timesteps must be (low, high) with low <= high, got {window}")

    def _prepare_image(self, image, size: tuple[int, int] | None, name: str = "content_image") -> torch.Tensor:
        """Any diffusers image input -> (B, 3, H, W) in [-1, 1] at ``size``, or (B, 4, h, w) latents as given."""
        width, height = size or (None, None)
        return pipeline_images(self, image, height=height, width=width, name=name)

    def _pixel_size(self, image: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of an image or latent batch."""
        height, width = pixel_size(image, self.vae, self.vae_scale_factor)
        return width, height

    # -- IP-Adapter (dual-feature cross-attention; helpers in editkit.ip_adapter) -----------------
    def set_ip_adapter_scale(self, scale) -> None:
        """diffusers' ``set_ip_adapter_scale``, also reaching adapters at sites where controllers are attached.

        While a controller (e.g. SoftREPA tokens) is attached at an IP-Adapter site, editkit's processor
        holds the adapter there and diffusers' type check would skip it; the adapters are put back for the call.
        """
        with exposed_ip_adapters(self.unet):
            super().set_ip_adapter_scale(scale)

    # -- the three phases ------------------------------------------------------------------------
    def _invert(self, image, kind, sites, timesteps, text, steps, inversion, offload, ip_count, extra, progress):
        """Invert one image, recording only what injection needs; ``inversion``: (resample_steps, feature_timing)."""
        resample_steps, feature_timing = inversion
        if ip_count and is_latents(image, self.vae):
            raise InputError("with an IP-Adapter loaded, give images (the image encoder needs pixels), not latents")
        latents = image_latents(self, image).to(self.unet.dtype)
        recorder = FeatureRecorder(sites, FEATURES_BY_KIND[kind], timesteps, offload=offload)
        stepper = compose(*extra, recorder)  # every attached controller learns the step
        added = dict(text.added_cond_kwargs or {})
        image_embeds = clip_image_embeds(self, image) if ip_count else None
        if image_embeds is not None:  # the UNet needs image embeds; the scales are 0 while inverting
            added["image_embeds"] = [torch.zeros_like(image_embeds)] * ip_count
        during = feature_timing == "inversion_step"
        with self.attach_controllers(recorder) if during else contextlib.nullcontext():
            result = ddim_invert(
                self.unet,
                self.scheduler,
                latents,
                text.prompt_embeds,
                num_inference_steps=steps,
                added_cond_kwargs=added or None,
                resample_steps=resample_steps,
                callback=lambda index, t, _: stepper.begin_step(index, t),
                progress=progress,
            )
        if not during:
            with self.attach_controllers(recorder):
                replay_inverted_latents(
                    self.unet, result, text.prompt_embeds, added_cond_kwargs=added or None, timesteps=timesteps,
                    callback=lambda index, t, _: stepper.begin_step(index, t),
                )  # fmt: skip
        size = self._pixel_size(image)
        return StyleCache.from_recorder(
            recorder,
            result.final,
            kind=kind,
            model=model_fingerprint(self.unet),
            model_name=str(getattr(self.config, "_name_or_path", "")),
            family=model_family(self.unet),
            size=size,
            num_inference_steps=steps,
            resample_steps=resample_steps,
            sites=tuple(sites),
            timesteps=tuple(sorted(recorder.timesteps, reverse=True)),
            image_embeds=image_embeds,
            extra={"feature_timing": feature_timing},
        )

    def _denoise(self, latents, controller, text, guidance, steps, callback, ip_embeds):
        """DDIM (eta 0) from the first timestep, the same arithmetic the inversion undoes."""
        scheduler = generation_scheduler(self.scheduler, steps)
        alpha_pair = ddim_alphas(scheduler, steps, latents.device)
        prediction_type = scheduler.config.prediction_type
        kwargs = text.unet_kwargs()
        if ip_embeds is not None:
            kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), "image_embeds": ip_embeds}
        z = latents.float()
        guidance_scale, guidance_rescale = guidance
        cfg = guidance_scale > 1.0
        for index, t in enumerate(self.progress_bar(scheduler.timesteps, desc="generating")):
            # the controller keys on the int; the UNet gets the tensor, so a compiled UNet does not
            # specialise (and recompile) on each timestep's Python int
            controller.begin_step(index, int(t))
            model_input = torch.cat([z, z]) if cfg else z
            output = self.unet(model_input.to(self.unet.dtype), t, **kwargs, return_dict=False)[0].float()
            if cfg:
                uncond, cond = output.chunk(2)
                output = classifier_free_guidance(uncond, cond, guidance_scale)
                if guidance_rescale > 0:  # Lin et al. 2024, eq. 16, as diffusers' pipelines
                    output = rescale_noise_cfg(output, cond, guidance_rescale=guidance_rescale)
            alpha_t, alpha_prev = alpha_pair(int(t))
            eps = model_eps(output, z, alpha_t, prediction_type)
            z = ddim_step(predicted_x0(z, eps, alpha_t), eps, alpha_prev)
            callback_on_step_end, names = callback
            z = step_callback(self, callback_on_step_end, index, t, {"latents": z}, names)["latents"]
            if self.interrupt:
                break
        return z.to(latents.dtype)

    # -- __call__ ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        content_image: PipelineImageInput | None = None,
        style_image: PipelineImageInput | Sequence[PipelineImageInput] | None = None,
        *,
        style_cache: StyleCache | Sequence[StyleCache] | None = None,
        content_cache: StyleCache | Sequence[StyleCache] | None = None,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] = "",
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        guidance_rescale: float = 0.0,
        cross_attention_kwargs: dict | None = None,
        gamma: float = 0.75,
        tau: float = 1.5,
        adain_strength: float | None = 0.6,
        resample_steps: int = 0,
        feature_timing: str = "inversion_step",
        injection_sites: str | Sequence[str] | None = None,
        injection_timesteps: tuple[int, int] | None = None,
        mask: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        style_size: tuple[int, int] | None = None,
        ip_adapter_scale: float | dict | list | None = None,
        ip_adapter_image: PipelineImageInput | list | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        offload_features: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        attention_controllers: Sequence[AttentionController] | None = None,
    ):
        r"""Stylize each content image with each style: images ordered by content, then style, then copy.

        Args:
            content_image: one content image or a batch, in diffusers' formats (PIL, path, numpy
                (H, W, C)/(B, H, W, C) in [0, 1], torch (C, H, W)/(B, C, H, W) in [0, 1], lists of
                these, or (B, 4, h, w) latents). Every item is stylized; a list is resized to the
                first item's size. Still needed for its size when ``content_cache`` is given.
            style_image: one or more style images (any size; keys need not match the content's size);
                a batched style tensor or list is several styles.
            style_cache / content_cache: features from an earlier run (``output.style_caches``,
                ``output.content_caches``, ``StyleCache.load``); one content cache per content image;
                validated against this model, sites and timesteps.
            prompt, negative_prompt, guidance_scale: optional text, one or one per content image;
                guidance 1 (default) runs one UNet pass per step. With CFG both branches are injected
                (as AttenST does). Each style is inverted with each distinct prompt.
            num_inference_steps: DDIM steps N, shared by inversion and generation.
            prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds:
                given text embeddings instead of ``prompt``/``negative_prompt`` (diffusers' names and
                ``encode_prompt``'s outputs; the pooled ones on SDXL), one row or one per content image.
            guidance_rescale: diffusers' CFG rescale (Lin et al. 2024, eq. 16; 0: off) with CFG.
            cross_attention_kwargs: passed to every UNet call (inversions included), e.g. a LoRA
                ``{"scale": 0.5}``. No ``eta``: generation is DDIM with eta 0, the inversion it undoes.
            num_images_per_prompt: copies of each output. The method is deterministic (DDIM, eta 0),
                so copies are identical: diffusers' argument is accepted so batch code works unchanged.
            gamma: query preservation (0: the stylized latent's own query, 1: the content's).
            tau: attention temperature, logits scaled by ``tau / sqrt(d)`` (1 = plain attention).
            adain_strength: a_s of the content-aware AdaIN (1: plain AdaIN, 0: content colours, None: off).
            resample_steps: style-preserving inversion iterations r per step (0: plain DDIM; AttenST: 5).
            feature_timing: the call whose Q/K/V are injected at step t: ``"inversion_step"``, the
                inversion's own UNet(z_{t-1}, t) (diffusers' inverse-scheduler convention; free; its last
                call when resampling), or ``"inverted_latent"``, UNet(z_t, t) as StyleID's original code
                records (one more call per injected step and image). Measured: ``benchmarks/RESULTS.md``.
            injection_sites: self-attention sites (names/patterns); None: the family's defaults.
            injection_timesteps: inject only at timesteps ``low <= t <= high`` (None: every step).
            mask: (1, 1, H, W) or (H, W) mask in {0, 1} of the content's aspect ratio (any resolution: it
                is area-resampled to each layer's grid): stylize only inside it (style at content size).
            height, width / style_size: processing sizes (default: the images' own, rounded to 8).
            ip_adapter_scale: with IP-Adapter(s) loaded, a float (InstantStyle blocks, AttenST 1.2) or
                ``set_ip_adapter_scale`` configs (content's first when two adapters are loaded).
            ip_adapter_image / ip_adapter_image_embeds: image prompts in place of the content and
                style images (AttenST's choice), one per loaded adapter, content's first: images, or
                ``(rows, num_images, dim)`` embeddings with the negative rows first when
                ``guidance_scale > 1`` (diffusers' ``IPAdapterMixin`` convention); shared by every output.
            offload_features: keep recorded features on the CPU, streaming them per step.
            generator: accepted for API symmetry (one or one per output image); the method is deterministic.
            output_type: ``"pil"``, ``"np"`` ((B, H, W, 3) in [0, 1]), ``"pt"`` ((B, 3, H, W) in [0, 1])
                or ``"latent"``.
            return_dict: ``False`` returns ``(images, style_caches, content_caches)``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each
                generation step; ``callback_kwargs`` holds the names in
                ``callback_on_step_end_tensor_inputs`` (of ``_callback_tensor_inputs``); a returned
                ``"latents"`` replaces the latent. Setting ``pipe._interrupt`` stops the loop.
            attention_controllers: extra controllers (e.g. SoftREPA tokens) attached for the whole run.
        """
        styles = [item for style in as_list(style_image) for item in split_image_batch(style)]
        given_caches = as_list(style_cache)
        self.check_inputs(
            content_image, styles, given_caches, gamma, tau, adain_strength, num_inference_steps, resample_steps,
            injection_timesteps, feature_timing,
        )  # fmt: skip
        check_output_type(output_type)
        check_num_images(num_images_per_prompt)
        names = callback_tensor_names(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        sites = resolve_style_sites(self.unet, injection_sites)
        offload = "cpu" if offload_features else None
        inversion = (resample_steps, feature_timing)

        # 1. Timesteps shared by inversion and generation, and the injection window.
        scheduler = generation_scheduler(self.scheduler, num_inference_steps)
        low, high = injection_timesteps or (0, scheduler.config.num_train_timesteps)
        window = [int(t) for t in scheduler.timesteps if low <= int(t) <= high]
        self._begin_run(guidance_scale, len(scheduler.timesteps))

        # 2. Contents (every batch item), prompts and (IP-Adapter) state at the processing size.
        contents = self._prepare_image(content_image, (width, height) if width and height else None)
        embeds = (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        embeds = {k: v for k, v in zip(EMBEDDING_NAMES, embeds, strict=True) if v is not None}
        texts = broadcast(
            {"prompt": as_prompt_list(prompt), "negative_prompt": as_prompt_list(negative_prompt, "negative_prompt")},
            {"content_image": len(contents), **{k: len(v) for k, v in embeds.items()}},
        )
        batch = len(texts["prompt"])
        contents = contents.expand(batch, -1, -1, -1) if len(contents) == 1 else contents
        # one text per batch item; styles are inverted once per distinct prompt (or embedding row)
        keys = list(range(batch)) if embeds else texts["prompt"]
        text = lambda i, size, cfg=False: guidance_conditioning(  # noqa: E731
            self, texts["prompt"][i], texts["negative_prompt"][i], width=size[0], height=size[1], cfg=cfg,
            embeds={k: v if len(v) == 1 else v[i : i + 1] for k, v in embeds.items()},
        )  # fmt: skip
        given_content = as_list(content_cache)
        if given_content and len(given_content) != batch:
            raise InputError(f"got {len(given_content)} content caches for {batch} content images")
        outputs = batch * (len(styles) + len(given_caches)) * num_images_per_prompt
        check_generators(generator, outputs)
        content_size = self._pixel_size(contents)
        if mask is not None:
            style_size = content_size  # a masked blend needs equal token counts per layer
            check_mask_aspect(tuple(torch.as_tensor(mask).shape[-2:])[::-1], content_size)  # any size, same aspect
        ip_count = ip_adapter_count(self.unet)
        ip_snapshot = scale_snapshot(self.unet) if ip_count else None
        ip_given = given_ip_embeds(self, ip_adapter_image, ip_adapter_image_embeds, ip_count, guidance_scale > 1.0)
        progress = lambda label: lambda steps: self.progress_bar(list(steps), desc=label)  # noqa: E731
        fingerprint, family = model_fingerprint(self.unet), model_family(self.unet)
        extra = list(attention_controllers or [])
        invert = lambda image, kind, text, label: self._invert(  # noqa: E731
            image, kind, sites if kind == "style" or gamma > 0 else [], window, text, num_inference_steps,
            inversion, offload, ip_count, extra, progress(label),
        )  # fmt: skip
        try:
            with (
                self.attach_controllers(extra) if extra else contextlib.nullcontext(),
                unet_call_kwargs(self.unet, cross_attention_kwargs),
            ):
                if ip_count:
                    self.set_ip_adapter_scale([0.0] * ip_count)  # inversion runs without the image prompt

                # 3. Content inversions (their queries), unless cached: one per batch item.
                content_label = lambda i: phase_label("inverting content", i, batch)  # noqa: E731
                content_caches = given_content or [
                    invert(contents[i : i + 1], "content", text(i, content_size)[0], content_label(i))
                    for i in range(batch)
                ]
                for cache in content_caches:
                    cache.validate(
                        kind="content", model=fingerprint, sites=sites if gamma > 0 else [], timesteps=window,
                        size=content_size, label="content cache", family=family,
                    )  # fmt: skip
                    if gamma > 0:
                        check_feature_timing(cache, feature_timing, "content cache")

                # 4. Style inversions (their keys and values), unless cached: once per distinct prompt.
                style_tensors = [self._prepare_image(style, style_size, "style_image") for style in styles]
                style_label = lambda j: phase_label("inverting style", j, len(style_tensors))  # noqa: E731
                caches_by_prompt = {}
                for index, key in enumerate(keys):
                    if key not in caches_by_prompt:
                        inverted = [
                            invert(s, "style", text(index, self._pixel_size(s))[0], style_label(j))
                            for j, s in enumerate(style_tensors)
                        ]
                        caches_by_prompt[key] = inverted + given_caches
                for cache in given_caches:
                    cache.validate(kind="style", model=fingerprint, sites=sites, timesteps=window, family=family)
                    check_feature_timing(cache, feature_timing, "style cache")

                # 5. Generation per content and style: AdaIN'd start latent, injected self-attention.
                if ip_count:
                    restore_scales(self.unet, ip_snapshot)
                    self.set_ip_adapter_scale(ip_scales(self.unet, ip_adapter_scale))
                injection = {
                    "sites": sites, "window": window, "gamma": gamma, "tau": tau, "adain_strength": adain_strength,
                    "mask": mask, "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
                    "steps": num_inference_steps, "callback": (callback_on_step_end, names),
                    "ip_count": ip_count, "ip_given": ip_given, "extra": extra,
                }  # fmt: skip
                latents = []
                for index, content_features in enumerate(content_caches):
                    cond, cfg = text(index, content_size, guidance_scale > 1.0)
                    for cache in caches_by_prompt[keys[index]]:
                        latents.append(self._generate(content_features, cache, cfg or cond, injection))
        finally:
            if ip_snapshot is not None:
                restore_scales(self.unet, ip_snapshot)

        # 6. Decode the final latents only (each repeated num_images_per_prompt times).
        latents = torch.cat(latents).repeat_interleave(num_images_per_prompt, dim=0)
        images = postprocess(self.vae, latents, output_type)
        self.maybe_free_model_hooks()
        style_caches = caches_by_prompt[keys[0]]
        if not return_dict:
            return images, style_caches, content_caches
        return StyleTransferPipelineOutput(
            images=images, style_caches=style_caches, content_cache=content_caches[0], content_caches=content_caches
        )

    def _generate(self, content_cache, cache, text, options: dict) -> torch.Tensor:
        """One stylized latent: the AdaIN'd content start latent denoised with injected self-attention."""
        device, gamma = self._execution_device, options["gamma"]
        start = content_cache.final_latent.to(device)
        if options["adain_strength"] is not None:
            start = content_aware_adain(start, cache.final_latent.to(device), options["adain_strength"])
        controller = StyleInjectionController(
            options["sites"], cache, content_cache if gamma > 0 else None,
            gamma=gamma, tau=options["tau"], timesteps=options["window"], mask=mask_batch_tensor(options["mask"]),
        )  # fmt: skip
        guidance, count = (options["guidance_scale"], options["guidance_rescale"]), options["ip_count"]
        ip = options["ip_given"]
        if ip is None and count:
            ip = ip_embeds_list(content_cache.image_embeds, cache.image_embeds, count, guidance[0] > 1)
        with self.attach_controllers(controller):
            controllers = compose(*options["extra"], controller)
            return self._denoise(start, controllers, text, guidance, options["steps"], options["callback"], ip)
