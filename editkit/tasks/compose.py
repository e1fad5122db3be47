"""The compose task: :class:`ComposeOptions` and ``run(pipe, inputs, options)`` (constraint guidance,
a verifier and noise refinement)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from editkit.compose_choices import LOSS_PRESETS, NOISE_REFINERS
from editkit.errors import InputError
from editkit.tasks.common import Size, make_generator, processing_size, run_record
from editkit.tasks.options import OptionError, check_options, knob
from editkit.tasks.stylize import check_size

__all__ = [
    "FAMILY_DEFAULTS",
    "ComposeInputs",
    "ComposeOptions",
    "ComposeResult",
    "check_family_options",
    "family_defaults",
    "make_task_verifier",
    "run",
    "verifier_name",
]

VERIFIERS = ("auto", "attention", "shapes", "vqa", "detector")
BLOCKS = ("down", "mid", "up")
#: (steps, guidance scale) when unset, per family: SD/SDXL the UNet pipeline's (A&E's 50 steps), SD3 and
#: FLUX.1 diffusers' StableDiffusion3Pipeline / FluxPipeline defaults (FLUX.1-dev: distilled guidance 3.5).
FAMILY_DEFAULTS = {
    "sd": (50, 7.5), "sdxl": (50, 7.5), "sd3": (28, 7.0), "flux": (28, 3.5), "flux-schnell": (4, 0.0),
}  # fmt: skip
#: Options of one architecture only: refused on the other before any model work.
UNET_ONLY = ("attention_blocks",)
MMDIT_ONLY = ("map_sites", "map_text_encoders", "max_sequence_length")


@dataclass(frozen=True)
class ComposeOptions:
    """Compositional generation knobs (the pipeline's names; A&E's and the paper's defaults)."""

    num_inference_steps: int | None = knob(
        None, "denoising steps (unset: the model family's, see FAMILY_DEFAULTS: 50 SD/SDXL, 28 SD3 and FLUX.1-dev, "
        "4 FLUX.1-schnell)", low=1, integer=True, label="Steps", slider=(1, 100, 1),
    )  # fmt: skip
    max_iter_to_alter: int | None = knob(None, "guided steps (unset: half of the steps, the paper's 25 of 50)",
                                         low=0, integer=True)  # fmt: skip
    guidance_scale: float | None = knob(
        None, "classifier-free guidance scale; FLUX.1-dev: its distilled guidance (unset: the family's, 7.5 SD/SDXL, "
        "7.0 SD3, 3.5 FLUX.1-dev, none for FLUX.1-schnell)", low=0, high=50, label="Guidance scale",
        slider=(1, 20, 0.5),
    )  # fmt: skip
    negative_prompt: str | None = knob(None, "what to avoid")
    refine: bool = knob(True, "verify and refine the initial noise (False: stage 1 only)",
                        label="Verify and refine the initial noise")  # fmt: skip
    verifier: str = knob("auto", "constraint verifier (auto: shapes for a shapes-world model, attention otherwise)",
                         choices=VERIFIERS)  # fmt: skip
    verifier_model: str | None = knob(None, "weights of the vqa (BLIP) or detector (OWL-ViT) verifier")
    losses: str = knob("attend-excite", "loss formulation: attend-excite or paper (the paper's own)",
                       choices=LOSS_PRESETS)  # fmt: skip
    noise_refiner: str = knob("single-step", "noise refinement: the paper's single step or InitNO",
                              choices=NOISE_REFINERS, label="Noise refiner (stage 2)")  # fmt: skip
    noise_refinement_rounds: int = knob(
        1, "stage-2 rounds: 1 is the paper's; each further round refines the last round's noise on what still "
        "fails (editkit's extension; one more generation each; at most 10, so a request cannot run for hours)",
        low=1, high=10, integer=True,
        label="Refinement rounds (1: the paper's; each more: one more generation)", slider=(1, 5, 1),
    )  # fmt: skip
    attention_blocks: tuple[str, ...] | None = knob(
        None, "UNet only: blocks whose cross-attention maps guide (unset: down up, the paper; down alone: cheaper)"
    )
    map_sites: tuple[str, ...] | None = knob(
        None, "MM-DiT only: attention sites (or blocks, e.g. transformer_blocks.1) whose image-query x text-key "
        "attention makes the maps (unset: the middle half of the joint blocks)",
    )  # fmt: skip
    map_text_encoders: tuple[str, ...] | None = knob(
        None, "MM-DiT only: the text tokens the maps use, clip and/or t5 (unset: every encoder present)"
    )
    max_sequence_length: int | None = knob(
        None, "MM-DiT only: T5 tokens (unset: the model card's max_sequence_length, else 256 SD3, 512 FLUX)",
        low=0, integer=True,
    )  # fmt: skip
    size: Size = knob(None, "image size: the side in pixels, or WIDTHxHEIGHT (unset: the model's size)")
    seed: int = knob(0, "random seed (a CPU generator)", low=0, integer=True, label="Seed")

    def __post_init__(self) -> None:
        check_options(self)
        check_size(self.size)
        if self.attention_blocks is not None and (
            not self.attention_blocks or any(block not in BLOCKS for block in self.attention_blocks)
        ):
            raise InputError(f"attention_blocks must be some of {', '.join(BLOCKS)}, got {self.attention_blocks!r}")
        if self.map_text_encoders is not None and any(name not in ("clip", "t5") for name in self.map_text_encoders):
            raise OptionError("map_text_encoders", f"must be some of clip, t5, got {list(self.map_text_encoders)}")
        steps = self.num_inference_steps
        if self.max_iter_to_alter is not None and steps is not None and self.max_iter_to_alter > steps:
            raise OptionError("max_iter_to_alter", f"({self.max_iter_to_alter}) exceeds the steps ({steps})")
        if self.verifier in ("vqa", "detector") and self.refine and not self.verifier_model:
            raise OptionError("verifier_model", f"is required: the {self.verifier} verifier needs weights")


@dataclass
class ComposeInputs:
    """A prompt and optional constraints (a ``Constraints``, or a dict in its JSON schema); ``files`` to hash."""

    prompt: str
    constraints: Any = None
    files: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ComposeResult:
    images: list[Image.Image]
    records: list[dict[str, Any]]
    output: Any  # the pipeline's output: constraints, reports before/after refinement, chosen
    verifier: Any


def check_prompt(prompt: str | None) -> None:
    if prompt is not None and not str(prompt).strip():
        raise InputError("the prompt is empty; describe the image, e.g. 'a red car and a blue bird'")


def verifier_name(options: ComposeOptions, model: Any) -> str:
    """``options.verifier`` with ``auto`` resolved (shapes for a shapes-world model); attention without refinement."""
    from editkit.model_card import is_shapes_model

    if not options.refine:
        return "attention"  # nothing is verified
    if options.verifier != "auto":
        return options.verifier
    return "shapes" if model and is_shapes_model(model) else "attention"


def make_task_verifier(pipe: Any, options: ComposeOptions, model: Any = None) -> Any:
    """The verifier of ``options`` for ``model`` (default: the pipeline's ``name_or_path``), made once per batch."""
    from editkit.verifiers import make_verifier

    model = model if model is not None else getattr(pipe, "name_or_path", None)
    return make_verifier(verifier_name(options, model), model=options.verifier_model, device=pipe.device)


def family_defaults(pipe: Any, family: str) -> tuple[int, float]:
    """(steps, guidance scale) of ``family`` when unset (FLUX without a guidance embedding: schnell's)."""
    if family == "flux" and not pipe.transformer.config.get("guidance_embeds", False):
        return FAMILY_DEFAULTS["flux-schnell"]
    return FAMILY_DEFAULTS[family]


def check_family_options(options: ComposeOptions, family: str) -> None:
    """InputError for an option of the other architecture (named with the family), before model work."""
    mmdit = family in ("sd3", "flux")
    for name in UNET_ONLY if mmdit else MMDIT_ONLY:
        if getattr(options, name) is not None:
            kind, instead = ("a UNet (SD/SDXL)", " (use map_sites)") if mmdit else ("an MM-DiT (SD3/FLUX)", "")
            raise OptionError(name, f"is {kind} option; this is a {family} model{instead}")
    if family == "flux" and options.negative_prompt is not None:
        raise OptionError("negative_prompt", "needs classifier-free guidance, which FLUX runs without (distilled)")


def _method_arguments(pipe: Any, options: ComposeOptions, family: str) -> dict[str, Any]:
    """The pipeline arguments that differ between the UNet and the MM-DiT pipelines."""
    if family not in ("sd3", "flux"):
        from editkit.refine import GUIDANCE_BLOCKS

        return {"attention_blocks": tuple(options.attention_blocks or GUIDANCE_BLOCKS)}
    from editkit.model_card import card_sequence_length

    sequence = options.max_sequence_length
    if sequence is None:
        sequence = card_sequence_length(pipe)  # the model card's, e.g. 0 for shapes-sd3 (trained without T5)
    return {
        "map_sites": None if options.map_sites is None else list(options.map_sites),
        "map_text_encoders": None if options.map_text_encoders is None else list(options.map_text_encoders),
        "max_sequence_length": sequence,
    }


def _resolved_sites(pipe: Any, patterns: list[str] | None) -> list[str]:
    from editkit.flow_compose_maps import map_sites_for

    return map_sites_for(pipe.transformer, patterns)


def run(
    pipe: Any,
    inputs: ComposeInputs,
    options: ComposeOptions,
    *,
    verifier: Any = None,
    attention_controllers: Sequence[Any] = (),
) -> ComposeResult:
    """Generate ``inputs.prompt`` at the processing size with its constraints, a CPU generator of the seed."""
    from editkit.models import model_family

    check_prompt(inputs.prompt)
    family = model_family(pipe)
    check_family_options(options, family)
    steps, guidance = family_defaults(pipe, family)
    steps = steps if options.num_inference_steps is None else options.num_inference_steps
    guidance = guidance if options.guidance_scale is None else options.guidance_scale
    if options.max_iter_to_alter is not None and options.max_iter_to_alter > steps:
        raise OptionError("max_iter_to_alter", f"({options.max_iter_to_alter}) exceeds the steps ({steps})")
    verifier = verifier if verifier is not None else make_task_verifier(pipe, options)
    width, height = processing_size(pipe, options.size)
    output = pipe(
        inputs.prompt,
        constraints=inputs.constraints,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt=options.negative_prompt,
        generator=make_generator(options.seed),
        max_iter_to_alter=options.max_iter_to_alter,
        refine=options.refine,
        verifier=verifier,
        loss_preset=options.losses,
        noise_refiner=options.noise_refiner,
        noise_refinement_rounds=options.noise_refinement_rounds,
        attention_controllers=list(attention_controllers),
        **_method_arguments(pipe, options, family),
    )  # fmt: skip
    sampler = "flow-match Euler" if family in ("sd3", "flux") else "DDIM"
    used = {"size": [width, height], "num_inference_steps": steps, "seed": options.seed, "sampler": sampler,
            "guidance_scale": guidance, "verifier": getattr(verifier, "name", str(verifier))}  # fmt: skip
    method = _method_arguments(pipe, options, family)
    recorded = {"prompt": inputs.prompt, **dataclasses.asdict(options)}
    if "attention_blocks" in method:  # UNet: the blocks used (unset: the paper's down and up)
        recorded["attention_blocks"] = list(method["attention_blocks"])
    else:
        used["map_sites"] = _resolved_sites(pipe, method["map_sites"])
        used["max_sequence_length"] = method["max_sequence_length"]
    record = run_record("compose", pipe, used, recorded, inputs.files)
    record.update(constraints_used=output.constraints.to_dict(), chosen=output.chosen)
    return ComposeResult(list(output.images), [record], output, verifier)
