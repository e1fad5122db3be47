"""The compose task: :class:`ComposeOptions` and ``run(pipe, inputs, options)`` (constraint guidance,
a verifier and noise refinement)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from editkit.errors import InputError
from editkit.tasks.common import Size, make_generator, processing_size, run_record
from editkit.tasks.options import OptionError, check_options, knob
from editkit.tasks.stylize import check_size

__all__ = ["ComposeInputs", "ComposeOptions", "ComposeResult", "make_task_verifier", "run", "verifier_name"]

VERIFIERS = ("auto", "attention", "shapes", "vqa", "detector")
LOSSES = ("attend-excite", "paper")
NOISE_REFINERS = ("single-step", "initno")
BLOCKS = ("down", "mid", "up")


@dataclass(frozen=True)
class ComposeOptions:
    """Compositional generation knobs (the pipeline's names; A&E's and the paper's defaults)."""

    num_inference_steps: int = knob(50, "denoising steps", low=1, integer=True, label="Steps", slider=(1, 100, 1))
    max_iter_to_alter: int | None = knob(None, "guided steps (unset: half of the steps, the paper's 25 of 50)",
                                         low=0, integer=True)  # fmt: skip
    guidance_scale: float = knob(7.5, "classifier-free guidance scale", low=0, high=50, label="Guidance scale",
                                 slider=(1, 20, 0.5))  # fmt: skip
    negative_prompt: str | None = knob(None, "what to avoid")
    refine: bool = knob(True, "verify and refine the initial noise (False: stage 1 only)",
                        label="Verify and refine the initial noise")  # fmt: skip
    verifier: str = knob("auto", "constraint verifier (auto: shapes for a shapes-world model, attention otherwise)",
                         choices=VERIFIERS)  # fmt: skip
    verifier_model: str | None = knob(None, "weights of the vqa (BLIP) or detector (OWL-ViT) verifier")
    losses: str = knob("attend-excite", "loss formulation: attend-excite or paper (the paper's own)", choices=LOSSES)
    noise_refiner: str = knob("single-step", "noise refinement: the paper's single step or InitNO",
                              choices=NOISE_REFINERS)  # fmt: skip
    attention_blocks: tuple[str, ...] = knob(
        ("down", "up"), "UNet blocks whose cross-attention maps guide (down up: the paper; down alone: cheaper)"
    )
    size: Size = knob(None, "image size: the side in pixels, or WIDTHxHEIGHT (unset: the model's size)")
    seed: int = knob(0, "random seed (a CPU generator)", low=0, integer=True, label="Seed")

    def __post_init__(self) -> None:
        check_options(self)
        check_size(self.size)
        if not self.attention_blocks or any(block not in BLOCKS for block in self.attention_blocks):
            raise InputError(f"attention_blocks must be some of {', '.join(BLOCKS)}, got {self.attention_blocks!r}")
        if self.max_iter_to_alter is not None and self.max_iter_to_alter > self.num_inference_steps:
            raise OptionError(
                "max_iter_to_alter", f"({self.max_iter_to_alter}) exceeds the steps ({self.num_inference_steps})"
            )
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


def run(
    pipe: Any,
    inputs: ComposeInputs,
    options: ComposeOptions,
    *,
    verifier: Any = None,
    attention_controllers: Sequence[Any] = (),
) -> ComposeResult:
    """Generate ``inputs.prompt`` at the processing size with its constraints, a CPU generator of the seed."""
    check_prompt(inputs.prompt)
    verifier = verifier if verifier is not None else make_task_verifier(pipe, options)
    width, height = processing_size(pipe, options.size)
    output = pipe(
        inputs.prompt,
        constraints=inputs.constraints,
        height=height,
        width=width,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        negative_prompt=options.negative_prompt,
        generator=make_generator(options.seed),
        max_iter_to_alter=options.max_iter_to_alter,
        attention_blocks=tuple(options.attention_blocks),
        refine=options.refine,
        verifier=verifier,
        loss_preset=options.losses,
        noise_refiner=options.noise_refiner,
        attention_controllers=list(attention_controllers),
    )
    used = {"size": [width, height], "num_inference_steps": options.num_inference_steps, "seed": options.seed,
            "sampler": "DDIM", "guidance_scale": options.guidance_scale,
            "verifier": getattr(verifier, "name", str(verifier))}  # fmt: skip
    record = run_record("compose", pipe, used, {"prompt": inputs.prompt, **dataclasses.asdict(options)}, inputs.files)
    record.update(constraints_used=output.constraints.to_dict(), chosen=output.chosen)
    return ComposeResult(list(output.images), [record], output, verifier)
