"""Text conditioning for SD 1.x/2.x and SDXL UNets, shared by every editkit pipeline (and the
classifier-free guidance combination every UNet and flow loop uses).

``encode_text`` returns what one UNet call needs for a list of prompts: the cross-attention
context and, for SDXL, ``added_cond_kwargs`` (pooled text embeddings and size/crop time ids),
computed the way diffusers' own Stable Diffusion pipelines do.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from editkit.errors import InputError

__all__ = [
    "EMBEDDING_NAMES",
    "PromptEncodingMixin",
    "TextConditioning",
    "classifier_free_guidance",
    "clean_prompt",
    "conditioning_from_embeds",
    "encode_text",
    "guidance_conditioning",
    "is_sdxl_unet",
]

#: diffusers' names of given text embeddings (``encode_prompt``'s outputs, SDXL's pooled ones last).
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

#: Longest prompt accepted at all (characters); CLIP reads 77 tokens, the rest is truncated with a warning.
MAX_PROMPT_CHARS = 10_000


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """out = u + w (c - u)  (classifier-free guidance, Ho & Salimans 2022, eq. 6)."""
    return uncond + guidance_scale * (cond - uncond)


@dataclass
class TextConditioning:
    """The UNet's text inputs for a batch of prompts.

    ``prompt_embeds``: ``(batch, tokens, cross_attention_dim)``; ``added_cond_kwargs``: SDXL's
    ``{"text_embeds", "time_ids"}`` or ``None`` for SD 1.x/2.x.
    """

    prompt_embeds: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        """Concatenate along the batch (e.g. ``[uncond, cond]`` for classifier-free guidance)."""
        embeds = torch.cat([p.prompt_embeds for p in parts])
        if parts[0].added_cond_kwargs is None:
            return TextConditioning(embeds)
        added = {key: torch.cat([p.added_cond_kwargs[key] for p in parts]) for key in parts[0].added_cond_kwargs}
        return TextConditioning(embeds, added)

    def repeat(self, times: int) -> TextConditioning:
        """Each row repeated ``times`` times (for several images per prompt)."""
        embeds = self.prompt_embeds.repeat_interleave(times, dim=0)
        if self.added_cond_kwargs is None:
            return TextConditioning(embeds)
        return TextConditioning(
            embeds, {k: v.repeat_interleave(times, dim=0) for k, v in self.added_cond_kwargs.items()}
        )

    def unet_kwargs(self) -> dict:
        """Keyword arguments for ``unet(sample, t, **kwargs)``."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs


def is_sdxl_unet(unet) -> bool:
    """SDXL-style UNets take pooled text embeddings and size/crop ids (``text_time``)."""
    return unet.config.get("addition_embed_type") == "text_time"


def clean_prompt(prompt: str) -> str:
    """NFC-normalise ``prompt`` and replace control characters (NUL, ESC, newlines, ...) by spaces.

    Non-ASCII text is kept. A non-string or absurdly long prompt raises InputError; a changed
    prompt warns once.
    """
    if not isinstance(prompt, str):
        raise InputError(f"a prompt must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"the prompt has {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
    text = unicodedata.normalize("NFC", prompt)
    cleaned = "".join(" " if unicodedata.category(char) == "Cc" else char for char in text)
    if any(unicodedata.category(char) == "Cc" and char not in "\t\n\r" for char in text):
        warnings.warn("control characters in the prompt were replaced by spaces", stacklevel=3)
    return cleaned


def _warn_if_truncated(tokenizer, prompts: list[str]) -> None:
    """Warn when a prompt is longer than the text encoder reads (CLIP: 77 tokens, start/end included)."""
    limit = tokenizer.model_max_length - 2
    for prompt in prompts:
        count = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if count > limit:
            warnings.warn(
                f"prompt has {count} tokens; truncated to the text encoder's {tokenizer.model_max_length}",
                stacklevel=4,
            )


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def _encode_sd(pipe, prompts: list[str], device, dtype) -> TextConditioning:
    ids = _tokenize(pipe.tokenizer, prompts, device)
    mask = None
    if getattr(pipe.text_encoder.config, "use_attention_mask", False):
        mask = (ids != pipe.tokenizer.pad_token_id).long()
    embeds = pipe.text_encoder(ids, attention_mask=mask)[0]
    return TextConditioning(embeds.to(dtype))


def _encode_sdxl(pipe, prompts: list[str], device, dtype, height: int, width: int, zeros: bool) -> TextConditioning:
    embeds, pooled = _encode_sdxl_text(pipe, prompts, device)
    if zeros:
        embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(prompts), device=device, dtype=dtype)
    return TextConditioning(embeds.to(dtype), {"text_embeds": pooled.to(dtype), "time_ids": time_ids})


def _encode_sdxl_text(pipe, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    for tokenizer, encoder in encoders:
        if tokenizer is None or encoder is None:
            continue
        output = encoder(_tokenize(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the projected pooled output of the last (projection) encoder
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_text(
    pipe,
    prompts: str | list[str],
    *,
    height: int | None = None,
    width: int | None = None,
    default_negative: bool = False,
) -> TextConditioning:
    """Encode ``prompts`` with ``pipe``'s tokenizer(s) and text encoder(s) for its UNet.

    ``height``/``width`` (pixels) fill SDXL's size conditioning (original = target size, no crop,
    as diffusers' defaults); they default to the UNet's native size. Every prompt is encoded, ``""``
    included, as diffusers encodes its ``prompt``. ``default_negative``: these are the empty negatives
    that stand in for a ``negative_prompt`` the user did not give; on SDXL with the pipeline's
    ``force_zeros_for_empty_prompt`` they become zeros (diffusers' ``negative_prompt is None`` rule).
    """
    prompts = [clean_prompt(p) for p in ([prompts] if isinstance(prompts, str) else list(prompts))]
    _warn_if_truncated(pipe.tokenizer, prompts)
    device = pipe._execution_device
    dtype = pipe.unet.dtype
    if not is_sdxl_unet(pipe.unet):
        return _encode_sd(pipe, prompts, device, dtype)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    zeros = default_negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    return _encode_sdxl(pipe, prompts, device, dtype, height or native, width or native, zeros)


def conditioning_from_embeds(
    pipe, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor | None = None, *, height=None, width=None
) -> TextConditioning:
    """UNet text inputs from given embeddings (``prompt_embeds``; SDXL also ``pooled_prompt_embeds``)."""
    dtype, device = pipe.unet.dtype, pipe._execution_device
    embeds = prompt_embeds.to(device=device, dtype=dtype)
    if not is_sdxl_unet(pipe.unet):
        return TextConditioning(embeds)
    if pooled_prompt_embeds is None:
        raise InputError("an SDXL model needs pooled_prompt_embeds with prompt_embeds (see encode_prompt)")
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or native, width or native
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * len(embeds), device=device, dtype=dtype)
    return TextConditioning(
        embeds, {"text_embeds": pooled_prompt_embeds.to(device=device, dtype=dtype), "time_ids": time_ids}
    )


def as_prompt_list(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """A prompt or a list of prompts as a list (an empty list is refused)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list | tuple) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{name} must be a string or a non-empty list of strings")
    return prompts


def role_conditioning(
    pipe, name: str, prompt, prompt_embeds=None, pooled_prompt_embeds=None, *, height: int, width: int
) -> TextConditioning:
    """One text role (``source_prompt``, ``target_prompt``, ``negative_prompt``): encoded text or given embeddings.

    ``prompt`` is a string or a list (one per batch item); ``prompt_embeds`` (``(rows, tokens, dim)``,
    SDXL also ``pooled_prompt_embeds``) replace it, one row per item, as diffusers' ``prompt_embeds`` do.
    ``negative_prompt`` given neither way is diffusers' default negative: ``""``, zeros on SDXL with
    ``force_zeros_for_empty_prompt`` (see :func:`encode_text`).
    """
    if prompt_embeds is None:
        if pooled_prompt_embeds is not None:
            raise InputError(f"{name}: pooled embeddings were given without {name}_embeds")
        if prompt is None and name == "negative_prompt":
            return encode_text(pipe, [""], height=height, width=width, default_negative=True)
        if prompt is None:
            raise InputError(f"give {name} or {name}_embeds")
        return encode_text(pipe, as_prompt_list(prompt, name), height=height, width=width)
    if prompt is not None:
        raise InputError(f"give {name} or {name}_embeds, not both")
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        raise InputError(f"{name}_embeds must be a (batch, tokens, dim) tensor (see encode_prompt)")
    return conditioning_from_embeds(pipe, prompt_embeds, pooled_prompt_embeds, height=height, width=width)


def guidance_conditioning(
    pipe, prompt, negative_prompt, *, height: int, width: int, cfg: bool, embeds: dict | None = None
) -> tuple[TextConditioning, TextConditioning | None]:
    """(conditional, CFG batch [uncond, cond] or None), from text or given ``embeds`` (``encode_prompt``'s names)."""
    embeds = dict(embeds or {})
    given = embeds.get("prompt_embeds") is not None
    encoded = pipe.encode_prompt(None if given else prompt, None, 1, cfg, negative_prompt, **embeds)
    pooled = encoded[2:] if is_sdxl_unet(pipe.unet) else (None, None)
    cond = conditioning_from_embeds(pipe, encoded[0], pooled[0], height=height, width=width)
    if not cfg:
        return cond, None
    uncond = conditioning_from_embeds(pipe, encoded[1], pooled[1], height=height, width=width)
    return cond, TextConditioning.cat([uncond, cond])


class PromptEncodingMixin:
    """diffusers' ``encode_prompt`` for pipelines serving both SD 1.x/2.x and SDXL UNets."""

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple:
        """As ``StableDiffusionPipeline.encode_prompt`` (SD UNet): ``(prompt_embeds, negative_prompt_embeds)``;
        as ``StableDiffusionXLPipeline.encode_prompt`` (SDXL UNet): those two and the two pooled ones.

        ``negative_*`` is ``None`` without classifier-free guidance. SDXL with ``negative_prompt=None``
        and ``force_zeros_for_empty_prompt`` gives zero negatives, as diffusers does. ``device`` is
        accepted for signature compatibility; the text encoders run where they are.
        """
        sdxl = is_sdxl_unet(self.unet)
        pooled, negative_pooled = pooled_prompt_embeds, negative_pooled_prompt_embeds
        if prompt_embeds is None:
            prompt_embeds, pooled = self._embed_text(_prompt_list(prompt), sdxl)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            zero = sdxl and negative_prompt is None and getattr(self.config, "force_zeros_for_empty_prompt", False)
            if zero:
                negative_prompt_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
            else:
                negatives = _prompt_list(negative_prompt or "")
                negatives = negatives * len(prompt_embeds) if len(negatives) == 1 else negatives
                negative_prompt_embeds, negative_pooled = self._embed_text(negatives, sdxl)
        outputs = [prompt_embeds, negative_prompt_embeds] + ([pooled, negative_pooled] if sdxl else [])
        dtype = self.unet.dtype
        return tuple(
            None if x is None else x.to(dtype).repeat_interleave(num_images_per_prompt, dim=0) for x in outputs
        )

    def _embed_text(self, prompts: list[str], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        _warn_if_truncated(self.tokenizer, prompts)
        device = self._execution_device
        if sdxl:
            return _encode_sdxl_text(self, prompts, device)
        return _encode_sd(self, prompts, device, self.unet.dtype).prompt_embeds, None


def _prompt_list(prompt: str | list[str] | None) -> list[str]:
    if prompt is None:
        raise InputError("give a prompt or prompt_embeds")
    return [clean_prompt(p) for p in ([prompt] if isinstance(prompt, str) else list(prompt))]
