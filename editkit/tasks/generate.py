"""The soft-token generation task (``editkit softrepa generate``, the app's Soft tokens tab): the
model family's plain text-to-image pipeline with SoftREPA tokens in both CFG branches."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from editkit.errors import InputError
from editkit.tasks.common import Size, make_generator, processing_size, run_record
from editkit.tasks.compose import family_defaults
from editkit.tasks.options import check_options, is_finite_number, knob
from editkit.tasks.stylize import check_size

__all__ = ["GenerateInputs", "GenerateOptions", "GenerateResult", "run"]


@dataclass(frozen=True)
class GenerateOptions:
    """Text-to-image knobs (diffusers' pipeline names; unset steps and guidance: the family's text-to-image
    defaults, :data:`editkit.tasks.compose.FAMILY_DEFAULTS`) and the token strength."""

    num_inference_steps: int | None = knob(None, "denoising steps (unset: the model family's default)", low=1,
                                           integer=True, label="Steps", slider=(1, 100, 1))  # fmt: skip
    guidance_scale: float | None = knob(None, "classifier-free guidance scale; FLUX.1-dev: its distilled guidance "
                                        "(unset: the family's default)", low=0, high=50, label="Guidance scale",
                                        slider=(0, 20, 0.5))  # fmt: skip
    negative_prompt: str | None = knob(None, "what to avoid")
    soft_token_strength: float = knob(1.0, "scale of the soft tokens (0: the model without them)",
                                      label="Token strength (0: the model without tokens)",
                                      slider=(0, 2, 0.05))  # fmt: skip
    size: Size = knob(None, "image size: the side in pixels, or WIDTHxHEIGHT (unset: the model's size)")
    max_sequence_length: int | None = knob(None, "MM-DiT models: T5 tokens of the prompt (unset: the pipeline's "
                                           "default; 0: none)", low=0, integer=True)  # fmt: skip
    seed: int = knob(0, "random seed (a CPU generator)", low=0, integer=True, label="Seed")

    def __post_init__(self) -> None:
        check_options(self)
        check_size(self.size)
        strength = self.soft_token_strength
        if not is_finite_number(strength):
            raise InputError(f"soft_token_strength must be a finite number, got {strength!r}")


@dataclass
class GenerateInputs:
    """A prompt and a SoftREPA token file (``.safetensors``); ``files`` to hash (the token file by default)."""

    prompt: str
    soft_tokens: str | os.PathLike
    files: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class GenerateResult:
    images: list[Image.Image]
    records: list[dict[str, Any]]


def run(pipe: Any, inputs: GenerateInputs, options: GenerateOptions) -> GenerateResult:
    """Generate ``inputs.prompt`` with the tokens at the processing size, a CPU generator of the seed.

    UNet pipelines (SD 1.x/2.x, SDXL) and MM-DiT ones (``StableDiffusion3Pipeline``, ``FluxPipeline``:
    the tokens of :mod:`editkit.softrepa.mmdit_tokens`; FLUX's ``guidance_scale`` is its distilled
    guidance input). ``max_sequence_length`` is refused on UNet models, before any model work.
    """
    from editkit.models import model_family
    from editkit.softrepa import load_soft_tokens, use_soft_tokens

    if not str(inputs.prompt).strip():
        raise InputError("the prompt is empty; describe the image")
    family = model_family(pipe)
    mmdit = family in ("sd3", "flux")
    extra = {}
    if options.max_sequence_length is not None:
        if not mmdit:
            raise InputError(f"max_sequence_length (T5 tokens) is an MM-DiT option; this is a {family} model")
        extra["max_sequence_length"] = options.max_sequence_length
    elif mmdit:
        from editkit.model_card import card_sequence_length

        if (sequence := card_sequence_length(pipe)) is not None:  # the model card's, e.g. 0 without T5
            extra["max_sequence_length"] = sequence
    denoiser = pipe.transformer if mmdit else pipe.unet
    controller = load_soft_tokens(inputs.soft_tokens, model=denoiser, strength=options.soft_token_strength)
    native = int(pipe.default_sample_size) * int(pipe.vae_scale_factor) if mmdit else None
    width, height = processing_size(pipe, options.size or native)
    default_steps, default_guidance = family_defaults(pipe, family)
    steps = options.num_inference_steps or default_steps
    guidance = default_guidance if options.guidance_scale is None else options.guidance_scale
    with use_soft_tokens(denoiser, controller):
        images = pipe(
            inputs.prompt,
            negative_prompt=options.negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=make_generator(options.seed),
            **extra,
        ).images
    used = {"size": [width, height], "num_inference_steps": steps, "seed": options.seed,
            "sampler": type(pipe.scheduler).__name__, "guidance_scale": guidance, **extra}  # fmt: skip
    files = inputs.files or {"soft_tokens": inputs.soft_tokens}
    record = run_record(
        "softrepa generate", pipe, used, {"prompt": inputs.prompt, **dataclasses.asdict(options)}, files
    )
    return GenerateResult(list(images), [record] * len(images))
