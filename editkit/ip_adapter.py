"""IP-Adapter helpers of the style-transfer pipeline: adapter count, image embeds, InstantStyle scales.

AttenST's dual-feature cross-attention feeds the content image to a first adapter (layout block)
and the style image to a second (style blocks), with InstantStyle's per-block scales (method note).
"""

from __future__ import annotations

import torch

from editkit.attention import ip_adapter_processors
from editkit.errors import InputError
from editkit.image import tensor_to_pil
from editkit.models import model_family

__all__ = [
    "IP_ADAPTER_BLOCKS",
    "clip_image_embeds",
    "given_ip_embeds",
    "ip_adapter_count",
    "ip_embeds_list",
    "ip_scales",
    "restore_scales",
    "scale_snapshot",
]

# AttenST's blocks (method note; InstantStyle's layout block): the content in down_blocks.2.attentions.1,
# the style in up_blocks.0.attentions.1 and .2 (AttenST's release: {"up": {"block_0": [0.0, s, s]}}).
IP_ADAPTER_BLOCKS = {
    "sdxl": ({"down": {"block_2": [0.0, 1.0]}}, {"up": {"block_0": [0.0, 1.0, 1.0]}}),
    "sd": ({"down": {"block_2": [1.0, 1.0]}}, {"up": {"block_1": [1.0, 1.0, 1.0]}}),
}


def ip_adapter_count(unet) -> int:
    """How many IP-Adapters ``load_ip_adapter`` put on ``unet`` (0 when none)."""
    projection = getattr(unet, "encoder_hid_proj", None)
    if unet.config.get("encoder_hid_dim_type") != "ip_image_proj" or projection is None:
        return 0
    return len(getattr(projection, "image_projection_layers", [projection]))


def clip_image_embeds(pipe, image: torch.Tensor) -> torch.Tensor:
    """CLIP image embedding of a (1, 3, H, W) [-1, 1] image with ``pipe``'s image encoder: (1, 1, dim)."""
    return _encode_image_prompt(pipe, tensor_to_pil(image))


def ip_scales(unet, scale):
    """InstantStyle-style per-block scale configs, content first, then style (``set_ip_adapter_scale``)."""
    if scale is None or isinstance(scale, int | float):
        value = 1.2 if scale is None else float(scale)  # AttenST: 1.2 for both adapters
        content, style = IP_ADAPTER_BLOCKS[model_family(unet)]
        scaled = [_scale_config(content, value), _scale_config(style, value)]
        return scaled if ip_adapter_count(unet) == 2 else scaled[1:]
    return scale


def scale_snapshot(unet) -> dict:
    """The IP-Adapter processors' current scales, by site name (also those under attached controllers)."""
    return {name: list(processor.scale) for name, processor in ip_adapter_processors(unet).items()}


def restore_scales(unet, snapshot: dict) -> None:
    for name, processor in ip_adapter_processors(unet).items():
        if name in snapshot:
            processor.scale[:] = snapshot[name]


def _scale_config(config: dict, value: float) -> dict:
    """Multiply every per-block scale of an InstantStyle config by ``value``."""
    return {
        part: {block: [s * value for s in scales] for block, scales in blocks.items()}
        for part, blocks in config.items()
    }


def ip_embeds_list(content_embeds, style_embeds, count: int, cfg: bool = False) -> list[torch.Tensor]:
    """Image embeds per adapter: [content, style] for two adapters, [style] for one (zeros first with CFG)."""
    if content_embeds is None or style_embeds is None:
        raise InputError("a cache made without the IP-Adapter lacks the image embedding; recompute it")
    embeds = [content_embeds, style_embeds][-count:]
    if cfg:
        embeds = [torch.cat([torch.zeros_like(e), e]) for e in embeds]
    return embeds


def given_ip_embeds(
    pipe, ip_adapter_image, ip_adapter_image_embeds, count: int, cfg: bool
) -> list[torch.Tensor] | None:
    """The image prompts a caller chose (diffusers' ``ip_adapter_image`` / ``ip_adapter_image_embeds``), per adapter.

    ``ip_adapter_image``: one image per loaded adapter (content's first with two), PIL/numpy through the
    feature extractor, a tensor taken as its ``pixel_values`` (as ``IPAdapterMixin`` pipelines do).
    ``ip_adapter_image_embeds``: one ``(rows, num_images, dim)`` tensor per adapter, the negative rows
    first when ``cfg`` (diffusers' convention); one image prompt serves every output.
    """
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        return None
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise InputError("give ip_adapter_image or ip_adapter_image_embeds, not both")
    if count == 0:
        raise InputError("ip_adapter_image(_embeds) needs an IP-Adapter: load one with pipe.load_ip_adapter(...)")
    given = ip_adapter_image if ip_adapter_image is not None else ip_adapter_image_embeds
    given = list(given) if isinstance(given, list | tuple) else [given]
    name = "ip_adapter_image" if ip_adapter_image is not None else "ip_adapter_image_embeds"
    if len(given) != count:
        raise InputError(f"{name} needs one entry per loaded IP-Adapter ({count}, content's first), got {len(given)}")
    if ip_adapter_image is not None:
        embeds = [_encode_image_prompt(pipe, image) for image in given]
        return [torch.cat([torch.zeros_like(e), e]) if cfg else e for e in embeds]
    for embeds in given:
        rows = 2 if cfg else 1
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != rows:
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise InputError(
                f"each ip_adapter_image_embeds entry must be ({rows}, num_images, dim)"
                + (" (negative first, as with guidance_scale > 1)" if cfg else "")
                + f", got {shape}"
            )
    return [e.to(device=pipe._execution_device, dtype=pipe.unet.dtype) for e in given]


def _encode_image_prompt(pipe, image) -> torch.Tensor:
    """(1, 1, dim) image embedding of one image prompt with ``pipe``'s image encoder."""
    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise InputError("an IP-Adapter is loaded but the pipeline has no image_encoder/feature_extractor")
    if not isinstance(image, torch.Tensor):
        image = pipe.feature_extractor(image, return_tensors="pt").pixel_values
    encoder = pipe.image_encoder
    return encoder(image.to(device=encoder.device, dtype=encoder.dtype)).image_embeds[:, None]
