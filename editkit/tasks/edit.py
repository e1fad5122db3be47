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

__all__ = ["CONTRASTS", "EditInputs", "EditOptions", "EditResult", "check_prompts", "run"]

logger = logging.getLogger(__name__)

CONTRASTS = ("dual", "source", "target", "none")
FEATURES = ("output", "query", "key", "value")


@dataclass(frozen=True)
class EditOptions:
    """Contrastive editing knobs (the pipeline's names; DDS/CDS's defaults)."""

    num_inference_steps: int = knob(200, "optimisation steps: DDS iterations, one timestep each (CDS: 200)", low=1,
                                    integer=True, label="Steps (optimisation iterations)",
                                    slider=(1, 400, 1))  # fmt: skip
    guidance_scale: float = knob(7.5, "classifier-free guidance on both branches", low=1, label="Guidance scale",
                                 slider=(1, 20, 0.5))  # fmt: skip
    learning_rate: float = knob(0.1, "SGD step on the latent", low=0, low_open=True)
    contrast: str = knob(
        "dual",
        "PatchNCE anchor: source (CDS), target (CUT), dual (both) or none (plain DDS)",
        choices=CONTRASTS,
        label="Contrast: dual (both anchors), source (CDS), target (CUT) or none (plain DDS)",
    )
    contrast_weight: float = knob(3.0, "weight of the contrastive loss (CDS: 3)", low=0)
    feature: str = knob("output", "self-attention feature compared", choices=FEATURES)
    identity_branch: bool = knob(False, "also contrast with the identity branch (edited latent, source prompt)")
    gradient_checkpointing: bool = knob(False, "recompute UNet activations in the backward pass (less memory)")
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


def run(
    pipe: Any, inputs: EditInputs, options: EditOptions, *, attention_controllers: Sequence[Any] = ()
) -> EditResult:
    """Edit ``inputs.image`` at the processing size, with a CPU generator of the seed."""
    check_prompts(inputs.source_prompt, inputs.target_prompt)
    if inputs.source_prompt.strip() == inputs.target_prompt.strip():
        logger.warning("the source and target prompts are identical: the edit will change little")
    size = processing_size(pipe, options.size, inputs.image.size)
    mask = prepare_mask(inputs.mask, inputs.image.size, size) if inputs.mask is not None else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="source and target prompts are identical")
        result = pipe(
            resize_to(inputs.image, size),
            inputs.source_prompt,
            inputs.target_prompt,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            learning_rate=options.learning_rate,
            contrast=None if options.contrast == "none" else options.contrast,
            contrast_weight=options.contrast_weight,
            feature=options.feature,
            identity_branch=options.identity_branch,
            mask=mask,
            gradient_checkpointing=options.gradient_checkpointing,
            generator=make_generator(options.seed),
            attention_controllers=list(attention_controllers),
        )
    used = {"size": list(size), "num_inference_steps": options.num_inference_steps, "seed": options.seed,
            "sampler": "DDS", "guidance_scale": options.guidance_scale}  # fmt: skip
    texts = {"source_prompt": inputs.source_prompt, "target_prompt": inputs.target_prompt}
    record = run_record("edit", pipe, used, {**texts, **dataclasses.asdict(options)}, inputs.files)
    return EditResult(list(result.images), [record] * len(result.images))
