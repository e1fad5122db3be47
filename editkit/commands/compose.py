"""``editkit compose``: text-to-image with compositional constraints, a verifier and noise refinement."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from editkit.commands.common import (
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    non_negative_int,
    png_metadata,
    positive_int,
    ranged_float,
)
from editkit.errors import InputError

logger = logging.getLogger(__name__)

EXAMPLE = 'example: editkit compose "a red car on the left of a blue bird" -o car.png --seed 0'
VERIFIER_CHOICES = ("attention", "vqa", "detector")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compose",
        help="text-to-image that enforces entities, colours/attributes and spatial relations",
        description=(
            "Generate an image for PROMPT with its constraints (entities, attribute bindings, left/right/"
            "above/below relations) enforced through cross-attention losses, checked by a verifier, and "
            "refined through the initial noise when they fail. Prints a report of each constraint."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("--constraints", type=Path, default=None, help="JSON constraints overriding the parser")
    parser.add_argument("--no-refine", action="store_true", help="stage 1 only: no verification or noise refinement")
    parser.add_argument(
        "--verifier", choices=VERIFIER_CHOICES, default="attention", help="constraint verifier (default: attention)"
    )
    parser.add_argument(
        "--verifier-model", default=None, help="weights of the vqa (BLIP) or detector (OWL-ViT) verifier"
    )
    parser.add_argument(
        "--noise-refiner", choices=("single-step", "initno"), default="single-step", help="(default: single-step)"
    )
    parser.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default: 50)")
    parser.add_argument(
        "--max-iter-to-alter", type=non_negative_int, default=None, help="guided steps (default: half of --steps)"
    )
    parser.add_argument("--guidance-scale", type=ranged_float(0, 50), default=7.5, help="CFG scale (default: 7.5)")
    parser.add_argument("--negative-prompt", default=None, help="what to avoid")
    parser.add_argument("--height", type=positive_int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels (default: the model's)")
    add_model_options(parser)
    add_output_options(parser)
    parser.set_defaults(run=run)


def _check_arguments(args: argparse.Namespace) -> None:
    """User mistakes caught before anything is loaded."""
    if not args.prompt.strip():
        raise InputError("the prompt is empty; describe the image, e.g. 'a red car and a blue bird'")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise InputError(f"--{name} must be a multiple of 8, got {value}")
    if args.max_iter_to_alter is not None and args.max_iter_to_alter > args.steps:
        raise InputError(f"--max-iter-to-alter ({args.max_iter_to_alter}) exceeds --steps ({args.steps})")
    if args.verifier != "attention" and args.no_refine:
        logger.warning("--verifier has no effect with --no-refine")
    if args.constraints is not None and not args.constraints.is_file():
        raise InputError(f"constraints file {args.constraints} does not exist")


def format_report(result) -> str:
    """The constraint report: one line per constraint, before and after refinement, and the choice."""
    lines = [f"constraints ({result.constraints.source}):"]
    before = result.report_before or []
    after = {s.description: s for s in result.report_after or []}
    for status in before:
        row = f"  {status.kind:<9} {status.description:<30} stage 1: {'ok ' if status.satisfied else 'FAIL'}"
        if status.description in after:
            row += f"  refined: {'ok ' if after[status.description].satisfied else 'FAIL'}"
        lines.append(row)
    if not before:
        entities = ", ".join(e.text for e in result.constraints.entities) or "none"
        lines.append(f"  entities: {entities} (not verified)")
    lines.extend(f"  note: {note}" for note in result.warnings)
    lines.append(f"chosen image: {result.chosen}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from editkit.constraints import load_constraints
    from editkit.image import save_image
    from editkit.models import load_pipeline
    from editkit.verifiers import make_verifier
    from pipelines.compose import ComposePipeline

    check_output_path(args.output, args.overwrite)
    _check_arguments(args)
    constraints = load_constraints(args.constraints, args.prompt) if args.constraints else None
    pipe = load_pipeline(ComposePipeline, args.model, device=args.device, dtype=args.dtype)
    verifier = "attention"
    if not args.no_refine and args.verifier != "attention":
        verifier = make_verifier(args.verifier, model=args.verifier_model, device=pipe.device)
    extra = []
    if args.soft_tokens:
        from editkit.softrepa import load_soft_tokens

        extra = [load_soft_tokens(args.soft_tokens, unet=pipe.unet, strength=args.soft_token_strength)]
    result = pipe(
        args.prompt,
        constraints=constraints,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        max_iter_to_alter=args.max_iter_to_alter,
        refine=not args.no_refine,
        verifier=verifier,
        noise_refiner=args.noise_refiner,
        attention_controllers=extra,
    )
    print(format_report(result))
    params = command_params(args)
    params["constraints_used"] = result.constraints.to_dict()
    params["chosen"] = result.chosen
    save_image(result.images[0], args.output, metadata=png_metadata("compose", params), overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0
