"""The stylize task: :class:`StylizeOptions` and ``run(pipe, inputs, options)`` (AttenST / StyleID)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from editkit.errors import InputError
from editkit.image import resize_to
from editkit.tasks.common import Size, make_generator, prepare_mask, processing_size, run_record
from editkit.tasks.options import OptionError, check_options, knob

__all__ = ["FEATURE_TIMINGS", "UNET_STEPS", "StylizeInputs", "StylizeOptions", "StylizeResult", "default_steps", "run"]

FEATURE_TIMINGS = ("inversion_step", "inverted_latent")
#: StyleID's DDIM steps, the default on SD / SDXL.
UNET_STEPS = 50


def check_size(size: Size) -> None:
    """``size``: None, a side >= 1 or (width, height) >= 1."""
    sides = size if isinstance(size, tuple) else (size,) if size is not None else ()
    if len(sides) not in (0, 1, 2) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise InputError(f"size must be a side >= 1 or (width, height), got {size!r}")


@dataclass(frozen=True)
class StylizeOptions:
    """Style transfer knobs (the pipeline's names and defaults, AttenST/StyleID's paper values)."""

    num_inference_steps: int | None = knob(None, "steps N, shared by inversion and generation (unset: 50 DDIM "
                                           "steps on SD/SDXL, StyleID's; SD3 / FLUX.1: the family's 28, schnell 4)",
                                           low=1, integer=True, label="Steps", slider=(1, 100, 1))  # fmt: skip
    gamma: float = knob(0.75, "content query preservation (0: the stylized query, 1: the content's)", low=0, high=1,
                        label="gamma: query preservation (1 keeps the content)", slider=(0, 1, 0.05))  # fmt: skip
    tau: float = knob(1.5, "attention temperature, logits x tau/sqrt(d) (1: plain; > 1 sharpens)", low=0,
                      low_open=True, label="tau: attention temperature (sharpens the style)",
                      slider=(0.5, 3, 0.1))  # fmt: skip
    adain_strength: float | None = knob(0.6, "content-aware AdaIN strength a_s (1: AdaIN, 0: the content's colours)",
                                        low=0, high=1, label="AdaIN style strength (0 keeps the content's colours)",
                                        slider=(0, 1, 0.05))  # fmt: skip
    resample_steps: int = knob(0, "style-preserving inversion resampling per step (0: plain DDIM; AttenST: 5)",
                               low=0, integer=True)  # fmt: skip
    feature_timing: str = knob("inversion_step", "injected Q/K/V of step t: UNet(z_{t-1}, t) or UNet(z_t, t) "
                               "(StyleID's original)", choices=FEATURE_TIMINGS)  # fmt: skip
    injection_sites: tuple[str, ...] | None = knob(None, "self-attention sites/patterns (unset: the model's)")
    prompt: str = knob("", "optional text prompt")
    guidance_scale: float = knob(1.0, "text guidance in generation (1: none, StyleID's; SD/SDXL/SD3 classifier-free "
                                 "guidance above 1; FLUX.1-dev its distilled guidance input)", low=0,
                                 label="Text guidance (1: none, StyleID's)", slider=(0, 10, 0.5))  # fmt: skip
    negative_prompt: str = knob("", "what to avoid, under classifier-free guidance (not on FLUX.1: distilled)")
    size: Size = knob(None, "processing size: the longer side in pixels, or WIDTHxHEIGHT (unset: the model's size)")
    seed: int = knob(0, "random seed (a CPU generator)", low=0, integer=True, label="Seed")

    def __post_init__(self) -> None:
        check_options(self)
        check_size(self.size)


@dataclass
class StylizeInputs:
    """A content image, styles as images and/or caches, an optional mask; ``files``: role -> path to hash."""

    content: Image.Image
    styles: Sequence[Image.Image] = ()
    style_caches: Sequence[Any] = ()
    mask: Any = None  # a path or an image (its alpha channel when it has one, else its luminance)
    files: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class StylizeResult:
    """One image per style (images first, then caches), the styles' caches, one record per image."""

    images: list[Image.Image]
    style_caches: list[Any]
    records: list[dict[str, Any]]


def check_inputs(pipe: Any, inputs: StylizeInputs, options: StylizeOptions) -> None:
    """Refuse what the pipeline would refuse later: no style, caches made at another size."""
    if not inputs.styles and not inputs.style_caches:
        raise InputError("no style given: pass style image(s) or a style cache")
    for index, cache in enumerate(inputs.style_caches):
        expected = processing_size(pipe, options.size, tuple(cache.size))
        if tuple(cache.size) != expected:
            raise InputError(
                f"style cache {index + 1} was made at {cache.size[0]}x{cache.size[1]} px; "
                f"this run uses {expected[0]}x{expected[1]}"
            )


#: UNet-only stylize options and their defaults: any other value is refused on an MM-DiT model.
UNET_ONLY_OPTIONS = {"resample_steps": 0, "feature_timing": "inversion_step"}


def check_family_options(family: str, options: StylizeOptions) -> None:
    """Refuse, before any model work, options of the other architecture (OptionError naming the option and the
    family; a site name of the other architecture: InputError naming the site)."""
    from editkit.backbones import MMDIT_FAMILIES, check_site_names

    if family in MMDIT_FAMILIES:
        for name, default in UNET_ONLY_OPTIONS.items():
            value = getattr(options, name)
            if value != default:
                raise OptionError(
                    name,
                    f"{value!r}: a UNet (SD/SDXL) style transfer option; this is a {family} (MM-DiT) model, whose "
                    f"style transfer inverts with the flow ODE (leave it at {default!r})",
                )
    if options.injection_sites:
        check_site_names(family, list(options.injection_sites), "injection_sites")
    if family == "flux" and options.negative_prompt:
        raise OptionError("negative_prompt", "needs classifier-free guidance, which FLUX runs without (distilled)")


def default_steps(pipe: Any, family: str) -> int:
    """Steps when unset: StyleID's 50 DDIM steps on UNets; on MM-DiT the family's text-to-image steps
    (the inversion follows the generation schedule, so the model's sampling default is the natural one)."""
    from editkit.backbones import MMDIT_FAMILIES
    from editkit.tasks.compose import family_defaults

    return family_defaults(pipe, family)[0] if family in MMDIT_FAMILIES else UNET_STEPS


def run(
    pipe: Any,
    inputs: StylizeInputs,
    options: StylizeOptions,
    *,
    attention_controllers: Sequence[Any] = (),
    offload_features: bool = False,
) -> StylizeResult:
    """Stylize ``inputs.content`` by every style at the processing size, with a CPU generator of the seed."""
    from editkit.backbones import MMDIT_FAMILIES
    from editkit.models import model_family

    family = model_family(pipe)
    check_family_options(family, options)
    check_inputs(pipe, inputs, options)
    steps = options.num_inference_steps or default_steps(pipe, family)
    width, height = processing_size(pipe, options.size, inputs.content.size)
    mask = None
    if inputs.mask is not None:
        mask = prepare_mask(inputs.mask, inputs.content.size, (width, height))[0, 0]
    # with a mask the pipeline takes the styles at the content's size; otherwise each at its own
    styles = [s if mask is not None else resize_to(s, processing_size(pipe, options.size, s.size))
              for s in inputs.styles]  # fmt: skip
    common = {
        "style_cache": list(inputs.style_caches), "prompt": options.prompt,
        "negative_prompt": options.negative_prompt,
        "num_inference_steps": steps, "gamma": options.gamma, "tau": options.tau,
        "adain_strength": options.adain_strength, "mask": mask, "width": width, "height": height,
        "injection_sites": list(options.injection_sites) if options.injection_sites else None,
        "offload_features": offload_features, "generator": make_generator(options.seed),
        "attention_controllers": list(attention_controllers),
    }  # fmt: skip
    used = {"size": [width, height], "num_inference_steps": steps, "seed": options.seed,
            "sampler": "DDIM", "guidance_scale": options.guidance_scale}  # fmt: skip
    if family in MMDIT_FAMILIES:
        from editkit.model_card import card_sequence_length

        sequence = card_sequence_length(pipe)  # e.g. 0 for a model trained without T5
        out = pipe(resize_to(inputs.content, (width, height)), styles or None, max_sequence_length=sequence,
                   guidance_scale=options.guidance_scale, **common)  # fmt: skip
        used.update(sampler="flow-matching Euler (inversion and generation)", family=family)
        if sequence is not None:
            used["max_sequence_length"] = sequence
    else:
        out = pipe(resize_to(inputs.content, (width, height)), styles or None, resample_steps=options.resample_steps,
                   feature_timing=options.feature_timing, guidance_scale=options.guidance_scale, **common)  # fmt: skip
    record = run_record("stylize", pipe, used, dataclasses.asdict(options), inputs.files)
    records = [{**record, "style_index": index} for index in range(len(out.images))]
    return StylizeResult(list(out.images), list(out.style_caches or []), records)
