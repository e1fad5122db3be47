"""Tiny Stable Diffusion components built offline, for tests, examples and benchmarks.

Nothing here downloads anything. The tiny models have the real topologies (SD 1.5: 32 attention
processors with the real names; SDXL: two text encoders, ``text_time`` conditioning, attention in
the first two up blocks) with random weights. ``full_size_sd15_unet`` builds the real 860M-parameter
SD 1.5 UNet architecture with random weights: it costs exactly what the real model costs, so the
benchmarks use it. SD3 / SD3.5 / FLUX.1 builders live in :mod:`editkit.testing_mmdit` and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from editkit.testing_mmdit import (
    FLUX1_DEV_TRANSFORMER,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    flow_match_scheduler,
    full_width_transformer,
    tiny_flux_components,
    tiny_flux_pipeline,
    tiny_sd3_components,
    tiny_sd3_pipeline,
    tiny_t5,
    tiny_t5_tokenizer,
)

__all__ = [
    "FLUX1_DEV_TRANSFORMER",
    "SD35_LARGE_TRANSFORMER",
    "SD35_MEDIUM_TRANSFORMER",
    "flow_match_scheduler",
    "full_size_sd15_components",
    "full_size_sd15_unet",
    "full_width_transformer",
    "sd_ddim_scheduler",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "tiny_sd15_components",
    "tiny_sd15_pipeline",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "tiny_t5",
    "tiny_t5_tokenizer",
    "tiny_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def tiny_tokenizer(words: Iterable[str] = (), model_max_length: int = 77):
    """A byte-level ``CLIPTokenizer`` built in memory; ``words`` get merges so they are one token.

    Every string tokenizes (character level). Word-level tests pass the words they need whole.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for symbol in alphabet:
        vocab.setdefault(symbol, len(vocab))
    for symbol in alphabet:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word)
        pieces[-1] = pieces[-1] + "</w>"
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )


def _text_encoder(hidden_size: int, vocab_size: int, with_projection: bool = False, projection_dim: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=64,
    ).eval()


def sd_ddim_scheduler(prediction_type: str = "epsilon", timestep_spacing: str = "leading"):
    """The Stable Diffusion 1.x ``DDIMScheduler`` configuration (scaled-linear betas, eta 0 sampling)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )


def tiny_sd15_components(seed: int = 0, prediction_type: str = "epsilon", words: Iterable[str] = ()) -> dict:
    """Components of a tiny SD 1.5-topology pipeline (random weights, seeded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    return {
        "vae": _tiny_vae(),
        "text_encoder": _text_encoder(16, vocab_size=max(1000, len(tokenizer))),
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": sd_ddim_scheduler(prediction_type),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(seed: int = 0, words: Iterable[str] = ()) -> dict:
    """Components of a tiny SDXL-topology pipeline (two text encoders, ``text_time`` conditioning)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    addition_time_embed_dim = 8
    projection_dim = 16
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        transformer_layers_per_block=(1, 1, 2),
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()
    tokenizer = tiny_tokenizer(words)
    return {
        "vae": _tiny_vae(),
        "text_encoder": _text_encoder(16, vocab_size=max(1000, len(tokenizer))),
        "text_encoder_2": _text_encoder(
            16, vocab_size=max(1000, len(tokenizer)), with_projection=True, projection_dim=projection_dim
        ),
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(words),
        "unet": unet,
        "scheduler": sd_ddim_scheduler(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd15_pipeline(seed: int = 0, path: str | Path | None = None, **kwargs):
    """A tiny ``StableDiffusionPipeline``; saved to ``path`` (safetensors) when given."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_sd15_components(seed, **kwargs), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, path: str | Path | None = None, **kwargs):
    """A tiny ``StableDiffusionXLPipeline``; saved to ``path`` (safetensors) when given."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def full_size_sd15_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The real SD 1.5 UNet architecture (860M parameters) with random weights, for benchmarks."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


def full_size_sd15_components(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", words: Iterable[str] = ()
) -> dict:
    """Pipeline components for speed benchmarks: the full-size SD 1.5 UNet with random weights,
    a one-layer 768-wide text encoder (the UNet's context width), a tiny VAE, the SD DDIM scheduler.

    The UNet dominates every method's cost; the small text encoder and VAE keep the rest cheap
    while the shapes stay those of SD 1.5.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(words)
    config = CLIPTextConfig(
        vocab_size=max(1000, len(tokenizer)), hidden_size=768, intermediate_size=768, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    return {
        "vae": _tiny_vae().to(device=device, dtype=dtype),
        "text_encoder": CLIPTextModel(config).eval().to(device=device, dtype=dtype),
        "tokenizer": tokenizer,
        "unet": full_size_sd15_unet(dtype=dtype, device=device),
        "scheduler": sd_ddim_scheduler(),
    }
