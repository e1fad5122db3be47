"""Tiny SD3 / SD3.5 / FLUX.1 components built offline, and full-width reduced-depth transformers.

Nothing here downloads anything. The tiny pipelines are stock diffusers classes
(``StableDiffusion3Pipeline``, ``FluxPipeline``) with random weights: CLIP text encoders on the
byte-level tokenizer of :mod:`editkit.testing`, a small ``T5EncoderModel`` with a ``T5Tokenizer``
(tokenizers' Unigram model) built from an in-code vocabulary, the transformers of
``shared/design/mmdit.md`` and ``FlowMatchEulerDiscreteScheduler``. They run at 32 px, 2 steps in
well under a second and round-trip through ``save_pretrained`` / ``from_pretrained``.

``SD35_MEDIUM_TRANSFORMER``, ``SD35_LARGE_TRANSFORMER`` and ``FLUX1_DEV_TRANSFORMER`` are the
``transformer/config.json`` values of the released models (stabilityai/stable-diffusion-3.5-medium,
stabilityai/stable-diffusion-3.5-large, black-forest-labs/FLUX.1-dev); :func:`full_width_transformer`
builds them with fewer blocks (random weights) for speed benchmarks, or on the meta device for memory
estimates.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

__all__ = [
    "FLUX1_DEV_TRANSFORMER",
    "SD35_LARGE_TRANSFORMER",
    "SD35_MEDIUM_TRANSFORMER",
    "flow_match_scheduler",
    "full_width_transformer",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "tiny_sd3_transformer",
    "tiny_t5",
    "tiny_t5_tokenizer",
]

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: attn2 in blocks 0-12).
SD35_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}  # fmt: skip
#: stabilityai/stable-diffusion-3.5-large transformer/config.json (38 joint blocks, 38 heads x 64).
SD35_LARGE_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "dual_attention_layers": (), "qk_norm": "rms_norm",
}  # fmt: skip
#: black-forest-labs/FLUX.1-dev transformer/config.json (19 double-stream + 38 single-stream blocks).
FLUX1_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip

#: The in-code T5 vocabulary: specials, then SentencePiece-style pieces ("▁" marks a word start).
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


def tiny_t5_tokenizer(words: tuple[str, ...] = (), model_max_length: int = 512):
    """A ``T5Tokenizer`` (tokenizers' Unigram model) from an in-code vocabulary; no SentencePiece file.

    Pieces: the three T5 specials (pad 0, eos 1, unk 2), ``▁`` and every printable ASCII character
    with and without the word-start mark, and ``▁word`` for each of ``words`` (scored higher, so a
    listed word is one token). Every ASCII string tokenizes.
    """
    from transformers import T5Tokenizer

    vocab = [(token, 0.0) for token in _T5_SPECIALS] + [("▁", -2.0)]
    vocab += [(piece, -5.0) for char in _T5_CHARACTERS for piece in ("▁" + char, char)]
    vocab += [("▁" + word, -1.0) for word in words if ("▁" + word) not in dict(vocab)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5(d_model: int = 32, vocab_size: int = 256):
    """A 2-layer ``T5EncoderModel`` (random weights) whose width is ``d_model``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def flow_match_scheduler(flux: bool = False):
    """``FlowMatchEulerDiscreteScheduler`` as configured by SD3/SD3.5 (shift 3) or FLUX.1-dev (dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not flux:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
    )  # fmt: skip


def _flow_vae(latent_channels: int, flux: bool):
    """A tiny ``AutoencoderKL`` (scale factor 8) in SD3's / FLUX's configuration: no quant convs, a shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=latent_channels, norm_num_groups=4,
        layers_per_block=1, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611 if flux else 1.5305, shift_factor=0.1159 if flux else 0.0609,
    ).eval()  # fmt: skip


def tiny_sd3_transformer(num_layers: int = 1, sd35: bool = False, sample_size: int = 4):
    """A tiny ``SD3Transformer2DModel`` (patch 1, 4 heads x 8, joint width 32, pooled 64; random weights
    from the global seed). ``sd35=True``: SD3.5-medium's image-only ``attn2`` in block 0 and RMS q/k norms.
    Positions up to ``max(16, sample_size)`` latent pixels a side."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=max(16, sample_size),
        dual_attention_layers=(0,) if sd35 else (), qk_norm="rms_norm" if sd35 else None,
    ).eval()  # fmt: skip


def tiny_flux_transformer(num_layers: int = 1, guidance_embeds: bool = True):
    """A tiny ``FluxTransformer2DModel``: ``num_layers`` double- and as many single-stream blocks, 2 heads x 16,
    rotary axes (4, 4, 8), joint width 32, pooled 32 (random weights from the global seed)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=num_layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()  # fmt: skip


def tiny_sd3_components(seed: int = 0, sd35: bool = False, words: tuple[str, ...] = ()) -> dict:
    """Components of a tiny ``StableDiffusion3Pipeline``: CLIP-L + CLIP-G (with projection) + T5.

    ``sd35=True`` gives the SD3.5-medium topology: an image-only ``attn2`` in block 0
    (``dual_attention_layers``) and RMS q/k norms. The CLIP hidden states (16 + 16) are padded to
    the T5 width 32 = ``joint_attention_dim``; the pooled embedding is the two projections (32 + 32).
    """
    from editkit.testing import _text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    transformer = tiny_sd3_transformer(num_layers=2 if sd35 else 1, sd35=sd35)
    tokenizer = tiny_tokenizer(words)
    vocab_size = max(1000, len(tokenizer))
    return {
        "transformer": transformer,
        "scheduler": flow_match_scheduler(),
        "vae": _flow_vae(4, flux=False),
        "text_encoder": _text_encoder(16, vocab_size, with_projection=True, projection_dim=32),
        "tokenizer": tokenizer,
        "text_encoder_2": _text_encoder(16, vocab_size, with_projection=True, projection_dim=32),
        "tokenizer_2": tiny_tokenizer(words),
        "text_encoder_3": tiny_t5(32),
        "tokenizer_3": tiny_t5_tokenizer(words),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True, words: tuple[str, ...] = ()) -> dict:
    """Components of a tiny ``FluxPipeline``: CLIP-L (pooled) + T5, one double and one single block.

    The VAE has 1 latent channel, so 2x2 packing gives the transformer's 4 input channels.
    ``guidance_embeds=True`` (the default) is FLUX.1-dev's distilled-guidance topology.
    """
    from editkit.testing import _text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    transformer = tiny_flux_transformer(num_layers=1, guidance_embeds=guidance_embeds)
    tokenizer = tiny_tokenizer(words)
    return {
        "scheduler": flow_match_scheduler(flux=True),
        "vae": _flow_vae(1, flux=True),
        "text_encoder": _text_encoder(32, max(1000, len(tokenizer))),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5(32),
        "tokenizer_2": tiny_t5_tokenizer(words),
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _finish(pipe, path: str | Path | None):
    pipe.set_progress_bar_config(disable=True)
    if path is not None:
        pipe.save_pretrained(path, safe_serialization=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, path: str | Path | None = None, sd35: bool = False, **kwargs):
    """A tiny ``StableDiffusion3Pipeline`` (SD3.5 topology with ``sd35=True``); saved to ``path`` when given."""
    from diffusers import StableDiffusion3Pipeline

    return _finish(StableDiffusion3Pipeline(**tiny_sd3_components(seed, sd35=sd35, **kwargs)), path)


def tiny_flux_pipeline(seed: int = 0, path: str | Path | None = None, **kwargs):
    """A tiny ``FluxPipeline`` (guidance-distilled topology); saved to ``path`` when given."""
    from diffusers import FluxPipeline

    return _finish(FluxPipeline(**tiny_flux_components(seed, **kwargs)), path)


def full_width_transformer(
    config: dict,
    num_blocks: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
):
    """A released model's transformer at full width with ``num_blocks`` blocks (random weights).

    ``config`` is one of the ``*_TRANSFORMER`` dicts. SD3: ``num_blocks`` joint blocks (SD3.5-medium
    keeps ``attn2`` in those of them it has it in). FLUX: ``num_blocks`` double-stream and
    ``num_blocks`` single-stream blocks. ``device="meta"`` builds shapes only (memory estimates);
    ``num_blocks=None`` keeps the real depth.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = dict(config)
    is_flux = "num_single_layers" in config
    if num_blocks is not None:
        if is_flux:
            config.update(num_layers=num_blocks, num_single_layers=num_blocks)
        else:
            config["num_layers"] = num_blocks
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < num_blocks)
    torch.manual_seed(seed)
    model_class = FluxTransformer2DModel if is_flux else SD3Transformer2DModel
    with torch.device(device):
        model = model_class(**config)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.eval().requires_grad_(False)
