"""The edit task: :class:`EditOptions` and ``run(pipe, inputs, options)`` (DDS / CDS / dual contrastive)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from editkit.errors import InputError
from editkit.image import resize_to
from editkit.tasks.common import Size, make_generator, prepare_mask, processing_size, run_record
from editkit.tasks.options import check_options, knob
from editkit.tasks.stylize import check_size

__all__ = [
    "CONTRASTS",
    "FAMILY_DEFAULTS",
    "EditInputs",
    "EditOptions",
    "EditResult",
    "check_family_options",
    "check_prompts",
    "run",
]

logger = logging.getLogger(__name__)

CONTRASTS = ("dual", "source", "target", "none")
FEATURES = ("output", "query", "key", "value")
FLOW_METHODS = ("flowedit", "dds")


@dataclass(frozen=True)
class FamilyEditDefaults:
    """The edit defaults that differ per model family (what ``None`` resolves to)."""

    num_inference_steps: int
    guidance_scale: float
    method: str | None = None  # MM-DiT only
    source_guidance_scale: float | None = None  # MM-DiT only


#: UNets: DDS/CDS (200 iterations, CFG 7.5 on both branches). MM-DiT: FlowEdit's published settings
#: (SD3: T = 50, CFG source 3.5 / target 13.5; FLUX.1-dev: T = 28, distilled guidance 1.5 / 5.5).
FAMILY_DEFAULTS = {
    "sd": FamilyEditDefaults(200, 7.5),
    "sdxl": FamilyEditDefaults(200, 7.5),
    "sd3": FamilyEditDefaults(50, 13.5, "flowedit", 3.5),
    "flux": FamilyEditDefaults(28, 5.5, "flowedit", 1.5),
}
#: Options only one kind of model has: (field, the kinds it works on); given for the other kind, they are refused.
UNET_ONLY = ("identity_branch",)
MMDIT_ONLY = ("method", "source_guidance_scale", "n_max")


@dataclass(frozen=True)
class EditOptions:
    """Contrastive editing knobs (the pipeline's names; DDS/CDS's defaults on UNets, FlowEdit's on MM-DiT).

    ``None`` is the model family's default (:data:`FAMILY_DEFAULTS`); the run record holds the value used.
    """

    num_inference_steps: int | None = knob(None, "steps: DDS iterations (UNet: 200), FlowEdit's schedule T (SD3 50, "
                                           "FLUX 28) or flow DDS iterations (200); unset: the model's", low=1,
                                           integer=True, label="Steps", slider=(1, 400, 1))  # fmt: skip
    guidance_scale: float | None = knob(None, "guidance: UNet CFG on both branches (7.5); MM-DiT the target's "
                                        "(SD3 CFG 13.5, FLUX distilled 5.5); unset: the model's", low=1,
                                        label="Guidance scale", slider=(1, 20, 0.5))  # fmt: skip
    learning_rate: float = knob(0.1, "SGD step on the latent (DDS; FlowEdit: the contrastive correction's)", low=0,
                                low_open=True)  # fmt: skip
    contrast: str = knob(
        "dual",
        "PatchNCE anchor: source (CDS), target (CUT), dual (both) or none (plain DDS / FlowEdit)",
        choices=CONTRASTS,
        label="Contrast: dual (both anchors), source (CDS), target (CUT) or none (plain DDS)",
    )
    contrast_weight: float = knob(3.0, "weight of the contrastive loss (CDS: 3)", low=0)
    feature: str = knob("output", "self-attention feature compared", choices=FEATURES)
    identity_branch: bool = knob(False, "also contrast with the identity branch (edited latent, source prompt); UNet")
    method: str | None = knob(None, "MM-DiT: flowedit (inversion-free, the default) or dds", choices=FLOW_METHODS)
    source_guidance_scale: float | None = knob(None, "MM-DiT: the source branch's guidance (SD3 3.5, FLUX 1.5)", low=1)
    n_max: int | None = knob(None, "MM-DiT FlowEdit: steps run, the last n_max of T (SD3 33/50, FLUX 24/28)", low=1,
                             integer=True)  # fmt: skip
    gradient_checkpointing: bool = knob(False, "recompute denoiser activations in the backward pass (less memory)")
    size: Size = knob(None, "processing size: the longer side in pixels, or WIDTHxHEIGHT (unset: the model's size)")
    seed: int = knob(0, "random seed (a CPU generator)", low=0, integer=True, label="Seed")

    def __post_init__(self) -> None:
        check_options(self)
        check_size(self.size)


@dataclass
class EditInputs:
    """An image, what it shows (``source_prompt``) and what it should show, an optional mask; ``files`` to hash."""

    image: Image.Image
    source_prompt: str
    target_prompt: str
    mask: Any = None  # a path or an image (its alpha channel when it has one, else its luminance)
    files: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class EditResult:
    images: list[Image.Image]
    records: list[dict[str, Any]]


def check_prompts(
    source_prompt: str | None, target_prompt: str | None, names: tuple[str, str] = ("source_prompt", "target_prompt")
) -> None:
    """Given prompts are not empty (``names``: how the caller calls them); identical ones only warn in :func:`run`."""
    for name, prompt in zip(names, (source_prompt, target_prompt)):
        if prompt is not None and not str(prompt).strip():
            raise InputError(f"{name} is empty; describe the image in a few words")


def check_family_options(options: EditOptions, family: str, names: Mapping[str, str] | None = None) -> None:
    """InputError naming the option (``names``: field -> how the caller calls it) and the family for an
    option the family's models do not have."""
    from editkit.backbones.families import FAMILIES, MMDIT_FAMILIES

    mmdit = family in MMDIT_FAMILIES
    foreign = UNET_ONLY if mmdit else MMDIT_ONLY
    for name in foreign:
        if getattr(options, name) not in (None, False):
            kind = "UNet (SD 1.x/2.x, SDXL)" if mmdit else "MM-DiT (SD3 / SD3.5, FLUX.1)"
            shown = (names or {}).get(name, name)
            raise InputError(f"{shown} applies to {kind} models only; this is a {FAMILIES[family].label} model")


def resolved(options: EditOptions, family: str) -> dict[str, Any]:
    """The pipeline arguments of ``options`` on ``family``, family defaults filled in."""
    defaults = FAMILY_DEFAULTS[family]
    values = {
        "num_inference_steps": options.num_inference_steps or defaults.num_inference_steps,
        "guidance_scale": options.guidance_scale if options.guidance_scale is not None else defaults.guidance_scale,
        "learning_rate": options.learning_rate,
        "contrast": None if options.contrast == "none" else options.contrast,
        "contrast_weight": options.contrast_weight,
        "feature": options.feature,
        "gradient_checkpointing": options.gradient_checkpointing,
    }
    if defaults.method is None:
        return values | {"identity_branch": options.identity_branch}
    method = options.method or defaults.method
    if method == "dds" and options.num_inference_steps is None:
        values["num_inference_steps"] = FAMILY_DEFAULTS["sd"].num_inference_steps
    source = options.source_guidance_scale
    n_max = options.n_max
    if method == "flowedit" and n_max is None:
        from editkit.flow_edit import scaled_n_max

        n_max = scaled_n_max(family, values["num_inference_steps"])
    return values | {
        "method": method,
        "source_guidance_scale": defaults.source_guidance_scale if source is None else source,
        "n_max": n_max,
    }


def _native_size(pipe: Any, size: Size) -> Size:
    """MM-DiT pipelines without a UNet: their default side (``default_sample_size`` x the VAE factor)."""
    if size is not None or getattr(pipe, "unet", None) is not None:
        return size
    return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)


def run(
    pipe: Any, inputs: EditInputs, options: EditOptions, *, attention_controllers: Sequence[Any] = ()
) -> EditResult:
    """Edit ``inputs.image`` at the processing size, with a CPU generator of the seed."""
    from editkit.models import model_family

    family = model_family(pipe)
    check_family_options(options, family)
    check_prompts(inputs.source_prompt, inputs.target_prompt)
    if inputs.source_prompt.strip() == inputs.target_prompt.strip():
        logger.warning("the source and target prompts are identical: the edit will change little")
    size = processing_size(pipe, _native_size(pipe, options.size), inputs.image.size)
    mask = prepare_mask(inputs.mask, inputs.image.size, size) if inputs.mask is not None else None
    arguments = resolved(options, family)
    if family in ("sd3", "flux"):
        from editkit.model_card import card_sequence_length

        if (sequence := card_sequence_length(pipe)) is not None:  # e.g. 0 for a model trained without T5
            arguments["max_sequence_length"] = sequence
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="source and target prompts are identical")
        result = pipe(
            resize_to(inputs.image, size), inputs.source_prompt, inputs.target_prompt, mask=mask,
            generator=make_generator(options.seed), attention_controllers=list(attention_controllers), **arguments,
        )  # fmt: skip
    sampler = {"flowedit": "FlowEdit", "dds": "flow DDS"}.get(arguments.get("method"), "DDS")
    used = {"size": list(size), "seed": options.seed, "sampler": sampler,
            **{k: v for k, v in arguments.items() if k in USED}}  # fmt: skip
    texts = {"source_prompt": inputs.source_prompt, "target_prompt": inputs.target_prompt}
    record = run_record("edit", pipe, used, {**texts, **dataclasses.asdict(options)}, inputs.files)
    return EditResult(list(result.images), [record] * len(result.images))


#: The resolved arguments a run record lists under ``used``.
USED = ("num_inference_steps", "guidance_scale", "method", "source_guidance_scale", "n_max", "max_sequence_length")
