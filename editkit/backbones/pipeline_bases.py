"""The component sets of diffusers' pipelines, shared by editkit's method pipelines.

:class:`UNetComponents` holds the components of diffusers' SD 1.x / 2.x and SDXL pipelines (the
UNet method pipelines build on it). On MM-DiT every method has one thin class per family
(``SD3StyleTransferPipeline``, ``FluxComposePipeline``, ...): the method's loop is a mixin, the
family's components come from here. A class built on :class:`SD3PipelineBase` takes exactly
``StableDiffusion3Pipeline``'s components (so ``from_pretrained`` of an SD3 / SD3.5 repo or folder
loads all of them, and ``from_pipe`` moves modules between it, the stock pipeline and the other
methods), and encodes text with diffusers' own ``encode_prompt`` (borrowed by reference, not
copied). :class:`FluxPipelineBase` does the same for ``FluxPipeline``, latent packing included.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
    T5EncoderModel,
    T5TokenizerFast,
)

from editkit.pipeline_io import DiffusersPipelineMixin

__all__ = ["FluxPipelineBase", "SD3PipelineBase", "UNetComponents"]

#: diffusers' default latent side of SD3 / FLUX pipelines without a transformer config (1024 px).
DEFAULT_SAMPLE_SIZE = 128


def _set_family_attributes(pipe: DiffusionPipeline, patch_multiple: int) -> None:
    """The attributes ``StableDiffusion3Pipeline`` / ``FluxPipeline`` set and their text encoding reads."""
    vae = getattr(pipe, "vae", None)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    pipe.image_processor = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * patch_multiple)
    tokenizer = getattr(pipe, "tokenizer", None)
    pipe.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77


class UNetComponents(DiffusersPipelineMixin):
    """The components of diffusers' SD 1.x / 2.x and SDXL pipelines (``text_encoder_2`` / ``tokenizer_2`` for SDXL),
    as a mixin put before ``DiffusionPipeline``: a pipeline file then holds one ``DiffusionPipeline``
    subclass, which diffusers' ``custom_pipeline`` loading requires.

    Every component of ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` is accepted, so
    ``from_pretrained`` of any SD / SDXL repo or folder and ``from_pipe`` both ways work. What a method
    never runs is listed in ``_unused_components``: registered as None whatever is given, and never
    loaded (the safety checker always; the image encoder and feature extractor unless the method
    uses IP-Adapter). ``force_zeros_for_empty_prompt`` (diffusers' SDXL flag, default True: empty SDXL
    texts encode to zeros, see ``editkit.conditioning``) is registered where ``_zeros_for_empty_prompt``
    is True; a pipeline that encodes the empty prompt as the text encoders give it (StyleID's) sets it False.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    _optional_components: ClassVar[list[str]] = [
        "text_encoder_2", "tokenizer_2", "image_encoder", "feature_extractor", "safety_checker",
    ]  # fmt: skip
    _unused_components: ClassVar[tuple[str, ...]] = ("safety_checker", "image_encoder", "feature_extractor")
    _callback_tensor_inputs: ClassVar[list[str]] = ["latents"]
    _zeros_for_empty_prompt: ClassVar[bool] = True

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
        safety_checker: torch.nn.Module | None = None,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__()
        optional = {"image_encoder": image_encoder, "feature_extractor": feature_extractor,
                    "safety_checker": safety_checker}  # fmt: skip
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
            **{name: None if name in self._unused_components else module for name, module in optional.items()},
        )  # fmt: skip
        if self._zeros_for_empty_prompt:
            self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)


class SD3PipelineBase(DiffusionPipeline):
    """``StableDiffusion3Pipeline``'s components (T5 optional, as in diffusers) and text encoding.

    ``image_encoder`` / ``feature_extractor`` (SD3.5's IP-Adapter parts) are accepted so that a
    folder listing them loads, and registered as given.
    """

    family = "sd3"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->image_encoder->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"]
    encode_prompt = StableDiffusion3Pipeline.encode_prompt
    _get_t5_prompt_embeds = StableDiffusion3Pipeline._get_t5_prompt_embeds
    _get_clip_prompt_embeds = StableDiffusion3Pipeline._get_clip_prompt_embeds

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3, image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip
        _set_family_attributes(self, patch_multiple=1)
        config = getattr(transformer, "config", None)
        self.default_sample_size = int(config.sample_size) if config is not None else DEFAULT_SAMPLE_SIZE
        self.patch_size = int(config.patch_size) if config is not None else 2


class FluxPipelineBase(DiffusionPipeline):
    """``FluxPipeline``'s components, text encoding and 2x2 latent packing (sides multiples of 16 px)."""

    family = "flux"
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["image_encoder", "feature_extractor"]
    encode_prompt = FluxPipeline.encode_prompt
    _get_t5_prompt_embeds = FluxPipeline._get_t5_prompt_embeds
    _get_clip_prompt_embeds = FluxPipeline._get_clip_prompt_embeds
    _pack_latents = staticmethod(FluxPipeline._pack_latents)
    _unpack_latents = staticmethod(FluxPipeline._unpack_latents)
    _prepare_latent_image_ids = staticmethod(FluxPipeline._prepare_latent_image_ids)

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        transformer: FluxTransformer2DModel,
        image_encoder: Any = None,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
        )  # fmt: skip
        _set_family_attributes(self, patch_multiple=2)
        self.default_sample_size = DEFAULT_SAMPLE_SIZE  # FluxPipeline's: 1024 px whatever the transformer
