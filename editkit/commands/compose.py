"""``editkit compose``: text-to-image with compositional constraints, a verifier and noise refinement."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from editkit.cli import echo
from editkit.commands.common import (
    add_attention_option,
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    load_method_pipeline,
    non_negative_int,
    png_metadata,
    positive_int,
    ranged_float,
    read_text_lines,
)
from editkit.errors import InputError
from editkit.image import SAVE_FORMATS

logger = logging.getLogger(__name__)

EXAMPLE = """examples:
  editkit compose "a red car on the left of a blue bird" -o car.png --seed 0
  editkit compose --prompts prompts.txt --output-dir out/   (one prompt per line; resumable)"""
VERIFIER_CHOICES = ("auto", "attention", "shapes", "vqa", "detector")
LOSS_CHOICES = ("attend-excite", "paper")
VERIFIER_ABOUT = {
    "attention": "a heuristic on the model's own attention maps, not a check of the image",
    "shapes": "the shapes world's deterministic detector, on the image",
    "vqa": "BLIP VQA on the image and on each entity's attention crop",
    "detector": "OWL-ViT open-vocabulary detection on the image",
}


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
    parser.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    parser.add_argument(
        "--prompts", type=Path, default=None, help="batch mode: a text file with one prompt per line (# comments)"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="batch mode: folder for the images and manifest.json"
    )
    parser.add_argument("--constraints", type=Path, default=None, help="JSON constraints overriding the parser")
    parser.add_argument("--no-refine", action="store_true", help="stage 1 only: no verification or noise refinement")
    parser.add_argument(
        "--verifier",
        choices=VERIFIER_CHOICES,
        default="auto",
        help="constraint verifier (default: auto = shapes for a shapes-world model, attention otherwise)",
    )
    parser.add_argument(
        "--losses",
        choices=LOSS_CHOICES,
        default="attend-excite",
        help="loss formulation: attend-excite (default) or paper (the paper's own; see the pipeline docs)",
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
    parser.add_argument(
        "--attention-blocks",
        nargs="+",
        choices=("down", "mid", "up"),
        default=["down", "up"],
        help="UNet blocks whose cross-attention maps guide (default: down up, as the paper; 'down' alone "
        "makes guided steps much cheaper but deviates from the paper and was less accurate in our tests)",
    )
    parser.add_argument("--guidance-scale", type=ranged_float(0, 50), default=7.5, help="CFG scale (default: 7.5)")
    parser.add_argument("--negative-prompt", default=None, help="what to avoid")
    parser.add_argument("--height", type=positive_int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels (default: the model's)")
    add_model_options(parser)
    add_attention_option(parser)
    add_output_options(parser, required=False)
    parser.set_defaults(run=run)


def _check_mode(args: argparse.Namespace) -> None:
    """Either PROMPT -o FILE, or --prompts FILE --output-dir DIR."""
    if args.prompts is None and args.output_dir is None:
        if args.prompt is None or args.output is None:
            raise InputError("give a PROMPT and -o FILE (or --prompts FILE --output-dir DIR for a batch)")
    elif args.prompts is None or args.output_dir is None or args.prompt is not None or args.output is not None:
        raise InputError("batch mode takes --prompts FILE and --output-dir DIR, without PROMPT or -o")


def read_prompts(path: Path) -> list[str]:
    """The prompts of a batch file: one per line, blank lines and # comments skipped."""
    lines = read_text_lines(path, "prompt file")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"{path} holds no prompts (one per line)")
    return prompts


def _jobs(prompts: list[str], constraints: Path | None = None) -> list:
    """One job per prompt; its fingerprint covers the prompt and the bytes of the constraints file."""
    from editkit.commands.batch import Job, fingerprint

    def slug(text: str) -> str:
        return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:40] or "prompt"

    files = [constraints] if constraints is not None else []
    return [
        Job(f"{i:04d} {p}", f"{i:04d}-{slug(p)}.png", {"prompt": p}, fingerprint({"prompt": p}, files))
        for i, p in enumerate(prompts)
    ]


def _check_arguments(args: argparse.Namespace) -> None:
    """User mistakes caught before anything is loaded."""
    if args.prompt is not None and not args.prompt.strip():
        raise InputError("the prompt is empty; describe the image, e.g. 'a red car and a blue bird'")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value % 8:
            raise InputError(f"--{name} must be a multiple of 8, got {value}")
    if args.max_iter_to_alter is not None and args.max_iter_to_alter > args.steps:
        raise InputError(f"--max-iter-to-alter ({args.max_iter_to_alter}) exceeds --steps ({args.steps})")
    if args.verifier not in ("auto", "attention") and args.no_refine:
        logger.warning("--verifier has no effect with --no-refine")
    if args.constraints is not None and args.constraints.is_dir():
        raise InputError(f"constraints file {args.constraints} is a folder; give a JSON file")
    from editkit.image import SAVE_FORMATS

    if args.verifier in ("vqa", "detector") and not args.no_refine and not args.verifier_model:
        raise InputError(f"the {args.verifier} verifier needs weights: pass --verifier-model")
    if args.output is not None and args.output.suffix.lower() not in SAVE_FORMATS:
        raise InputError(f"cannot save {args.output}: use a .png, .jpg or .webp file name")
    if args.constraints is not None and not args.constraints.is_file():
        raise InputError(f"constraints file {args.constraints} does not exist")


def _verdict(status) -> str:
    threshold = "" if status.threshold is None else f" (threshold {status.threshold:.2f})"
    return f"{'ok  ' if status.satisfied else 'FAIL'} {status.score:6.2f}{threshold}"


def format_report(result, verifier=None, warnings: list[str] | tuple[str, ...] = ()) -> str:
    """The constraint report: each constraint's verdict, score and threshold before and after refinement,
    who judged it, the notes, the words the model probably does not know, and the chosen image."""
    before = result.report_before or []
    after = {s.description: s for s in result.report_after or []}
    name = getattr(verifier, "name", before[0].verifier if before else "")
    header = f"constraints ({result.constraints.source})"
    if before:
        header += f", judged by the {name} verifier ({VERIFIER_ABOUT.get(name, 'user-given')})"
    lines = [header + ":"]
    for status in before:
        row = f"  {status.kind:<9} {status.description:<30} stage 1: {_verdict(status)}"
        if status.description in after:
            row += f"  refined: {_verdict(after[status.description])}"
        lines.append(row + (f"  [{status.note}]" if status.note else ""))
    if not before:
        entities = ", ".join(e.text for e in result.constraints.entities) or "none"
        lines.append(f"  entities: {entities} (not verified)")
    lines.extend(f"  note: {note}" for note in result.warnings)
    lines.extend(f"  warning: {warning}" for warning in warnings)
    lines.append(f"chosen image: {result.chosen}")
    return "\n".join(lines)


def _verifier_name(args: argparse.Namespace) -> str:
    """--verifier, with ``auto`` resolved: the shapes detector for a shapes-world model, else attention."""
    from editkit.model_card import is_shapes_model

    if args.verifier != "auto":
        return args.verifier
    return "shapes" if is_shapes_model(args.model) else "attention"


def run(args: argparse.Namespace) -> int:
    from editkit.commands.batch import check_batch_outputs, run_batch
    from editkit.constraints import load_constraints
    from editkit.image import save_image
    from editkit.model_card import card_metadata, vocabulary_warnings
    from editkit.verifiers import make_verifier
    from pipelines.compose import ComposePipeline

    _check_mode(args)
    _check_arguments(args)
    if args.prompts is None:
        check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
        jobs, params = [], {}
    else:
        jobs = _jobs(read_prompts(args.prompts), args.constraints)
        params = command_params(args, skip=("prompts", "output_dir"))
        check_batch_outputs(jobs, args.output_dir, "compose", params, args.overwrite)
    constraints = load_constraints(args.constraints, args.prompt) if args.constraints and args.prompt else None
    pipe, extra = load_method_pipeline(ComposePipeline, args)
    name = "attention" if args.no_refine else _verifier_name(args)  # --no-refine verifies nothing
    verifier = make_verifier(name, model=args.verifier_model, device=pipe.device)
    vocabulary = card_metadata(args.model).get("vocabulary")
    vocabulary = {str(word).lower() for word in vocabulary} if isinstance(vocabulary, list) else None

    def generate(prompt: str, output: Path, prompt_constraints=None) -> str:
        result = pipe(
            prompt,
            constraints=prompt_constraints,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            max_iter_to_alter=args.max_iter_to_alter,
            attention_blocks=tuple(args.attention_blocks),
            refine=not args.no_refine,
            verifier=verifier,
            loss_preset=args.losses,
            noise_refiner=args.noise_refiner,
            attention_controllers=extra,
        )
        echo(format_report(result, verifier, vocabulary_warnings(prompt, pipe.tokenizer, vocabulary)))
        meta = {**command_params(args, skip=("prompts", "output_dir")), "prompt": prompt}
        meta.update(constraints_used=result.constraints.to_dict(), chosen=result.chosen)
        save_image(result.images[0], output, metadata=png_metadata("compose", meta), overwrite=args.overwrite)
        echo(f"wrote {output}")
        return result.chosen

    if args.prompts is None:
        generate(args.prompt, args.output, constraints)
        return 0

    def produce(task) -> dict:
        prompt_constraints = load_constraints(args.constraints, task.job.inputs["prompt"]) if args.constraints else None
        chosen = generate(task.job.inputs["prompt"], task.path(task.job.output), prompt_constraints)
        task.written(task.job.output)
        return {"chosen": chosen}

    echo(run_batch(jobs, args.output_dir, "compose", params, produce, overwrite=args.overwrite))
    return 0
