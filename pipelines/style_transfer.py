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

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import IPAdapterMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from editkit.attention import (
    AttentionController,
    AttentionKernelMixin,
    compose,
    exposed_ip_adapters,
    ip_adapter_processors,
)
from editkit.conditioning import TextConditioning, encode_text
from editkit.errors import InputError
from editkit.image import fit_size, pil_to_tensor, resize_to, tensor_to_pil
from editkit.inversion import (
    ddim_alphas,
    ddim_invert,
    ddim_step,
    decode_latents,
    encode_image_latents,
    generation_scheduler,
    model_eps,
    predicted_x0,
    replay_inverted_latents,
)
from editkit.models import model_family
from editkit.style import (
    FEATURES_BY_KIND,
    FeatureRecorder,
    StyleCache,
    StyleInjectionController,
    content_aware_adain,
    model_fingerprint,
    resolve_style_sites,
)

logger = logging.getLogger(__name__)

ImageInput = Image.Image | torch.Tensor
#: Where the features of step t are recorded: the inversion's own call UNet(z_{t-1}, t), or UNet(z_t, t).
FEATURE_TIMINGS = ("inversion_step", "inverted_latent")
# AttenST's blocks (method note; InstantStyle's layout block): the content in down_blocks.2.attentions.1,
# the style in up_blocks.0.attentions.1 and .2 (AttenST's release: {"up": {"block_0": [0.0, s, s]}}).
IP_ADAPTER_BLOCKS = {
    "sdxl": ({"down": {"block_2": [0.0, 1.0]}}, {"up": {"block_0": [0.0, 1.0, 1.0]}}),
    "sd": ({"down": {"block_2": [1.0, 1.0]}}, {"up": {"block_1": [1.0, 1.0, 1.0]}}),
}


@dataclass
class StyleTransferPipelineOutput(BaseOutput):
    """``images``: one stylized image per style; ``style_caches``/``content_cache``: reusable features."""

    images: list[Image.Image] | torch.Tensor
    style_caches: list[StyleCache]
    content_cache: StyleCache


class StyleTransferPipeline(AttentionKernelMixin, DiffusionPipeline, IPAdapterMixin):
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

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8

    # -- inputs ----------------------------------------------------------------------------------
    def check_inputs(
        self, content_image, styles, caches, gamma, tau, adain_strength, steps, resample_steps, window,
        feature_timing="inversion_step",
    ):  # fmt: skip
        if feature_timing not in FEATURE_TIMINGS:
            raise InputError(f"feature_timing must be one of {FEATURE_TIMINGS}, got {feature_timing!r}")
        if content_image is None:
            raise InputError("a content image is needed")
        if not styles and not caches:
            raise InputError("at least one style image or style cache is needed")
        if not 0.0 <= gamma <= 1.0:
            raise InputError(f"gamma must be in [0, 1], got {gamma}")
        if not tau > 0:
            raise InputError(f"tau must be > 0, got {tau}")
        if adain_strength is not None and not 0.0 <= adain_strength <= 1.0:
            raise InputError(f"adain_strength must be in [0, 1] (or None to skip AdaIN), got {adain_strength}")
        if steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {steps}")
        if resample_steps < 0:
            raise InputError(f"resample_steps must be >= 0, got {resample_steps}")
        if window is not None and (len(window) != 2 or window[0] > window[1]):
            raise InputError(f"injection_timesteps must be (low, high) with low <= high, got {window}")

    def _prepare_image(self, image: ImageInput, size: tuple[int, int] | None) -> torch.Tensor:
        """PIL image or (1, 3, H, W) tensor in [-1, 1] -> (1, 3, H, W) at ``size`` (a multiple of 8)."""
        if isinstance(image, torch.Tensor):
            tensor = image if image.ndim == 4 else image[None]
            image = tensor_to_pil(tensor)[0]
        width, height = size or fit_size(*image.size, multiple=self.vae_scale_factor)
        if width % self.vae_scale_factor or height % self.vae_scale_factor:
            raise InputError(f"image size {width}x{height} must be a multiple of {self.vae_scale_factor}")
        return pil_to_tensor(resize_to(image.convert("RGB"), (width, height)))

    def _text(self, prompt: str, size: tuple[int, int]) -> TextConditioning:
        return encode_text(self, [prompt], width=size[0], height=size[1])

    # -- IP-Adapter (dual-feature cross-attention) ------------------------------------------------
    def _ip_adapter_count(self) -> int:
        projection = getattr(self.unet, "encoder_hid_proj", None)
        if self.unet.config.get("encoder_hid_dim_type") != "ip_image_proj" or projection is None:
            return 0
        return len(getattr(projection, "image_projection_layers", [projection]))

    def _image_embeds(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding of a (1, 3, H, W) [-1, 1] image: (1, 1, dim)."""
        if self.image_encoder is None or self.feature_extractor is None:
            raise InputError("an IP-Adapter is loaded but the pipeline has no image_encoder/feature_extractor")
        pixels = self.feature_extractor(tensor_to_pil(image), return_tensors="pt").pixel_values
        encoder = self.image_encoder
        return encoder(pixels.to(device=encoder.device, dtype=encoder.dtype)).image_embeds[:, None]

    def _ip_scales(self, scale):
        """InstantStyle-style per-block scale configs, content first, then style (set_ip_adapter_scale)."""
        if scale is None or isinstance(scale, int | float):
            value = 1.2 if scale is None else float(scale)  # AttenST: 1.2 for both adapters
            content, style = IP_ADAPTER_BLOCKS[model_family(self.unet)]
            scaled = [_scale_config(content, value), _scale_config(style, value)]
            return scaled if self._ip_adapter_count() == 2 else scaled[1:]
        return scale

    def set_ip_adapter_scale(self, scale) -> None:
        """diffusers' ``set_ip_adapter_scale``, also reaching adapters at sites where controllers are attached.

        While a controller (e.g. SoftREPA tokens) is attached at an IP-Adapter site, editkit's processor
        holds the adapter there and diffusers' type check would skip it; the adapters are put back for the call.
        """
        with exposed_ip_adapters(self.unet):
            super().set_ip_adapter_scale(scale)

    def _ip_snapshot(self) -> dict:
        return {name: list(processor.scale) for name, processor in ip_adapter_processors(self.unet).items()}

    def _ip_restore(self, snapshot: dict) -> None:
        for name, processor in ip_adapter_processors(self.unet).items():
            if name in snapshot:
                processor.scale[:] = snapshot[name]

    # -- the three phases ------------------------------------------------------------------------
    def _invert(self, image, kind, sites, timesteps, text, steps, inversion, offload, ip_count, extra, progress):
        """Invert one image, recording only what injection needs; ``inversion``: (resample_steps, feature_timing)."""
        resample_steps, feature_timing = inversion
        latents = encode_image_latents(self.vae, image.to(self._execution_device)).to(self.unet.dtype)
        recorder = FeatureRecorder(sites, FEATURES_BY_KIND[kind], timesteps, offload=offload)
        stepper = compose(*extra, recorder)  # every attached controller learns the step
        added = dict(text.added_cond_kwargs or {})
        image_embeds = self._image_embeds(image) if ip_count else None
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
        size = (image.shape[-1], image.shape[-2])
        return StyleCache.from_recorder(
            recorder,
            result.final,
            kind=kind,
            model=model_fingerprint(self.unet),
            model_name=str(getattr(self.config, "_name_or_path", "")),
            size=size,
            num_inference_steps=steps,
            resample_steps=resample_steps,
            sites=tuple(sites),
            timesteps=tuple(sorted(recorder.timesteps, reverse=True)),
            image_embeds=image_embeds,
            extra={"feature_timing": feature_timing},
        )

    def _denoise(self, latents, controller, text, guidance_scale, steps, callback_on_step_end, ip_embeds):
        """DDIM (eta 0) from the first timestep, the same arithmetic the inversion undoes."""
        scheduler = generation_scheduler(self.scheduler, steps)
        alpha_pair = ddim_alphas(scheduler, steps, latents.device)
        prediction_type = scheduler.config.prediction_type
        kwargs = text.unet_kwargs()
        if ip_embeds is not None:
            kwargs["added_cond_kwargs"] = {**kwargs.get("added_cond_kwargs", {}), "image_embeds": ip_embeds}
        z = latents.float()
        cfg = guidance_scale > 1.0
        for index, t in enumerate(self.progress_bar(scheduler.timesteps)):
            # the controller keys on the int; the UNet gets the tensor, so a compiled UNet does not
            # specialise (and recompile) on each timestep's Python int
            controller.begin_step(index, int(t))
            model_input = torch.cat([z, z]) if cfg else z
            output = self.unet(model_input.to(self.unet.dtype), t, **kwargs, return_dict=False)[0].float()
            if cfg:
                uncond, cond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            alpha_t, alpha_prev = alpha_pair(int(t))
            eps = model_eps(output, z, alpha_t, prediction_type)
            z = ddim_step(predicted_x0(z, eps, alpha_t), eps, alpha_prev)
            if callback_on_step_end is not None:
                z = callback_on_step_end(self, index, t, {"latents": z}).get("latents", z)
        return z.to(latents.dtype)

    # -- __call__ ----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        content_image: ImageInput | None = None,
        style_image: ImageInput | Sequence[ImageInput] | None = None,
        *,
        style_cache: StyleCache | Sequence[StyleCache] | None = None,
        content_cache: StyleCache | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
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
        offload_features: bool = False,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        attention_controllers: Sequence[AttentionController] | None = None,
    ):
        r"""Stylize ``content_image`` with each style; one output per style image, then one per style cache.

        Args:
            content_image: PIL image or (1, 3, H, W) tensor in [-1, 1] (ignored pixels-wise when
                ``content_cache`` is given, but still needed for its size unless ``height``/``width``).
            style_image: one or more style images (any size; keys need not match the content's size).
            style_cache / content_cache: features from an earlier run (``output.style_caches``,
                ``StyleCache.load``); validated against this model, sites and timesteps.
            prompt, negative_prompt, guidance_scale: optional text; guidance 1 (default) runs one UNet
                pass per step. With CFG both branches are injected (as AttenST does).
            num_inference_steps: DDIM steps N, shared by inversion and generation.
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
            mask: (1, 1, H, W) or (H, W) mask in {0, 1}: stylize only inside it (style at content size).
            height, width / style_size: processing sizes (default: the images' own, rounded to 8).
            ip_adapter_scale: with IP-Adapter(s) loaded, a float (InstantStyle blocks, AttenST 1.2) or
                ``set_ip_adapter_scale`` configs (content's first when two adapters are loaded).
            offload_features: keep recorded features on the CPU, streaming them per step.
            generator: accepted for API symmetry; the method is deterministic (DDIM, eta 0).
            output_type: ``"pil"``, ``"pt"`` ((B, 3, H, W) in [0, 1]) or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": z}) -> dict`` after each step.
            attention_controllers: extra controllers (e.g. SoftREPA tokens) attached for the whole run.
        """
        styles = _as_list(style_image)
        given_caches = _as_list(style_cache)
        self.check_inputs(
            content_image, styles, given_caches, gamma, tau, adain_strength, num_inference_steps, resample_steps,
            injection_timesteps, feature_timing,
        )  # fmt: skip
        if output_type not in ("pil", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        sites = resolve_style_sites(self.unet, injection_sites)
        offload = "cpu" if offload_features else None
        inversion = (resample_steps, feature_timing)

        # 1. Timesteps shared by inversion and generation, and the injection window.
        scheduler = generation_scheduler(self.scheduler, num_inference_steps)
        low, high = injection_timesteps or (0, scheduler.config.num_train_timesteps)
        window = [int(t) for t in scheduler.timesteps if low <= int(t) <= high]

        # 2. Content (and IP-Adapter features) at its processing size.
        content = self._prepare_image(content_image, (width, height) if width and height else None)
        content_size = (content.shape[-1], content.shape[-2])
        if mask is not None:
            style_size = content_size  # a masked blend needs equal token counts per layer
        ip_count = self._ip_adapter_count()
        ip_snapshot = self._ip_snapshot() if ip_count else None
        progress = lambda steps: self.progress_bar(list(steps))  # noqa: E731
        fingerprint = model_fingerprint(self.unet)
        extra = list(attention_controllers or [])
        try:
            with self.attach_controllers(extra) if extra else contextlib.nullcontext():
                if ip_count:
                    self.set_ip_adapter_scale([0.0] * ip_count)  # inversion runs without the image prompt

                # 3. Content inversion (its queries), unless cached.
                if content_cache is None:
                    content_cache = self._invert(
                        content, "content", sites if gamma > 0 else [], window, self._text(prompt, content_size),
                        num_inference_steps, inversion, offload, ip_count, extra, progress,
                    )  # fmt: skip
                content_cache.validate(
                    kind="content", model=fingerprint, sites=sites if gamma > 0 else [], timesteps=window,
                    size=content_size, label="content cache",
                )  # fmt: skip
                if gamma > 0:
                    _check_feature_timing(content_cache, feature_timing, "content cache")

                # 4. Style inversions (their keys and values), unless cached.
                caches = []  # one per style image (in order), then the given caches
                for style in styles:
                    style_tensor = self._prepare_image(style, style_size)
                    style_px = (style_tensor.shape[-1], style_tensor.shape[-2])
                    caches.append(
                        self._invert(
                            style_tensor, "style", sites, window, self._text(prompt, style_px),
                            num_inference_steps, inversion, offload, ip_count, extra, progress,
                        )
                    )  # fmt: skip
                caches += given_caches
                for cache in caches:
                    cache.validate(kind="style", model=fingerprint, sites=sites, timesteps=window)
                    _check_feature_timing(cache, feature_timing, "style cache")

                # 5. Generation per style: AdaIN'd start latent, injected self-attention.
                text = self._text(prompt, content_size)
                cfg = guidance_scale > 1.0
                if cfg:
                    text = TextConditioning.cat([self._text(negative_prompt, content_size), text])
                if ip_count:
                    self._ip_restore(ip_snapshot)
                    self.set_ip_adapter_scale(self._ip_scales(ip_adapter_scale))
                latents = []
                for cache in caches:
                    start = content_cache.final_latent.to(device)
                    if adain_strength is not None:
                        start = content_aware_adain(start, cache.final_latent.to(device), adain_strength)
                    controller = StyleInjectionController(
                        sites, cache, content_cache if gamma > 0 else None,
                        gamma=gamma, tau=tau, timesteps=window, mask=_mask_tensor(mask),
                    )  # fmt: skip
                    ip = _ip_list(content_cache.image_embeds, cache.image_embeds, ip_count, cfg) if ip_count else None
                    with self.attach_controllers(controller):
                        latents.append(
                            self._denoise(
                                start, compose(*extra, controller), text, guidance_scale, num_inference_steps,
                                callback_on_step_end, ip,
                            )
                        )  # fmt: skip
        finally:
            if ip_snapshot is not None:
                self._ip_restore(ip_snapshot)

        # 6. Decode the final latents only.
        images = self._output(torch.cat(latents), output_type)
        self.maybe_free_model_hooks()
        style_caches = caches
        if not return_dict:
            return images, style_caches, content_cache
        return StyleTransferPipelineOutput(images=images, style_caches=style_caches, content_cache=content_cache)

    def _output(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        image = decode_latents(self.vae, latents)
        if output_type == "pt":
            return (image + 1) / 2
        return tensor_to_pil(image)


def _check_feature_timing(cache: StyleCache, feature_timing: str, label: str) -> None:
    """Refuse a cache recorded with the other ``feature_timing`` (older caches: inversion_step)."""
    recorded = cache.extra.get("feature_timing", "inversion_step")
    if recorded != feature_timing:
        raise InputError(f"{label} was recorded with feature_timing={recorded!r}, this run uses {feature_timing!r}")


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def _scale_config(config: dict, value: float) -> dict:
    """Multiply every per-block scale of an InstantStyle config by ``value``."""
    return {
        part: {block: [s * value for s in scales] for block, scales in blocks.items()}
        for part, blocks in config.items()
    }


def _ip_list(content_embeds, style_embeds, count: int, cfg: bool = False) -> list[torch.Tensor]:
    """Image embeds per adapter: [content, style] for two adapters, [style] for one."""
    if content_embeds is None or style_embeds is None:
        raise InputError("a cache made without the IP-Adapter lacks the image embedding; recompute it")
    embeds = [content_embeds, style_embeds][-count:]
    if cfg:
        embeds = [torch.cat([torch.zeros_like(e), e]) for e in embeds]
    return embeds


def _mask_tensor(mask) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.float32)
    while mask.ndim < 4:
        mask = mask[None]
    return mask
