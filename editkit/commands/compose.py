"""``editkit compose``: text-to-image with compositional constraints, a verifier and noise refinement."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from editkit.cli import echo
from editkit.commands.common import (
    add_attention_option,
    add_knob,
    add_model_options,
    add_output_options,
    add_seed_option,
    add_size_option,
    check_output_path,
    command_params,
    load_method_pipeline,
    make_options,
    read_text_lines,
    run_settings,
)
from editkit.errors import InputError
from editkit.image import SAVE_FORMATS
from editkit.tasks.compose import ComposeOptions, check_prompt

logger = logging.getLogger(__name__)

#: Option field -> flag (an invalid value is reported with its flag).
FLAGS = {
    "num_inference_steps": "--steps", "max_iter_to_alter": "--max-iter-to-alter", "guidance_scale": "--guidance-scale",
    "negative_prompt": "--negative-prompt", "refine": "--no-refine", "verifier": "--verifier",
    "verifier_model": "--verifier-model", "losses": "--losses", "noise_refiner": "--noise-refiner",
    "noise_refinement_rounds": "--noise-refinement-rounds",
    "attention_blocks": "--attention-blocks", "map_sites": "--map-sites", "map_text_encoders": "--map-text-encoders",
    "max_sequence_length": "--max-sequence-length", "size": "--size", "seed": "--seed",
}  # fmt: skip
EXAMPLE = """examples:
  editkit compose "a red car on the left of a blue bird" -o car.png --seed 0
  editkit compose --prompts prompts.txt --output-dir out/   (one prompt per line; resumable)"""
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
    )
    parser.add_argument("prompt", nargs="?", default=None, help="the text prompt")
    parser.add_argument(
        "--prompts", type=Path, default=None, help="batch mode: a text file with one prompt per line (# comments)"
    )
    parser.add_argument("--constraints", type=Path, default=None, help="JSON constraints overriding the parser")
    method = parser.add_argument_group("method")
    method.add_argument("--no-refine", dest="refine", action="store_false",
                        help="stage 1 only: no verification or noise refinement")  # fmt: skip
    add_knob(method, "--verifier", ComposeOptions, "verifier")
    add_knob(method, "--losses", ComposeOptions, "losses")
    add_knob(method, "--verifier-model", ComposeOptions, "verifier_model", type=str)
    add_knob(method, "--noise-refiner", ComposeOptions, "noise_refiner")
    add_knob(method, "--noise-refinement-rounds", ComposeOptions, "noise_refinement_rounds")
    add_knob(method, "--steps", ComposeOptions, "num_inference_steps")
    add_knob(method, "--max-iter-to-alter", ComposeOptions, "max_iter_to_alter")
    add_knob(method, "--attention-blocks", ComposeOptions, "attention_blocks", nargs="+", choices=("down", "mid", "up"))
    add_knob(method, "--map-sites", ComposeOptions, "map_sites", nargs="+", type=str)
    add_knob(method, "--map-text-encoders", ComposeOptions, "map_text_encoders", nargs="+", choices=("clip", "t5"))
    add_knob(method, "--max-sequence-length", ComposeOptions, "max_sequence_length")
    add_knob(method, "--guidance-scale", ComposeOptions, "guidance_scale")
    add_knob(method, "--negative-prompt", ComposeOptions, "negative_prompt", type=str)
    add_size_option(method, ComposeOptions)
    add_seed_option(method, ComposeOptions)
    add_model_options(parser)
    add_attention_option(parser)
    add_output_options(parser, required=False, batch=True)
    parser.set_defaults(run=run)


def options_from_args(args: argparse.Namespace) -> ComposeOptions:
    """The task options of the parsed arguments (checked: an invalid value names its flag)."""
    lists = {name: None if getattr(args, name) is None else tuple(getattr(args, name))
             for name in ("attention_blocks", "map_sites", "map_text_encoders")}  # fmt: skip
    return make_options(ComposeOptions, FLAGS, args, **lists)


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


def _check_arguments(args: argparse.Namespace, options: ComposeOptions) -> None:
    """User mistakes caught before anything is loaded."""
    check_prompt(args.prompt)
    if options.verifier not in ("auto", "attention") and not options.refine:
        logger.warning("--verifier has no effect with --no-refine")
    if args.constraints is not None and args.constraints.is_dir():
        raise InputError(f"constraints file {args.constraints} is a folder; give a JSON file")
    if args.constraints is not None and not args.constraints.is_file():
        raise InputError(f"constraints file {args.constraints} does not exist")


def _check_family(args: argparse.Namespace, options: ComposeOptions) -> None:
    """Options of the other architecture (``--attention-blocks`` on SD3, ``--map-sites`` on SD 1.5) are
    refused before the model loads, with the flag and the family named."""
    from editkit.models import model_source_family
    from editkit.tasks.compose import check_family_options
    from editkit.tasks.options import OptionError

    family = model_source_family(args.model)
    if family is None:  # a Hub repo not cached yet: the task checks once it is loaded
        return
    try:
        check_family_options(options, family)
    except OptionError as error:
        raise InputError(f"{FLAGS.get(error.field, error.field)} {error.problem}") from None


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


def run(args: argparse.Namespace) -> int:
    from editkit.commands.batch import check_batch_outputs, run_batch
    from editkit.constraints import load_constraints

    _check_mode(args)
    options = options_from_args(args)
    _check_arguments(args, options)
    if args.prompts is None:
        check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
        jobs, params = [], {}
    else:
        jobs = _jobs(read_prompts(args.prompts), args.constraints)
        params = command_params(args, skip=("prompts", "output_dir"))
        check_batch_outputs(jobs, args.output_dir, "compose", params, args.overwrite)
    _check_family(args, options)
    constraints = load_constraints(args.constraints, args.prompt) if args.constraints and args.prompt else None
    pipe, extra = load_method_pipeline("compose", args)
    generate = _generator(pipe, args, options, extra)
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


def _generator(pipe, args: argparse.Namespace, options: ComposeOptions, extra):
    """``generate(prompt, output, constraints) -> chosen``: one run of the task, its report, its file."""
    from editkit.image import save_image
    from editkit.model_card import card_metadata, vocabulary_warnings
    from editkit.tasks import ComposeInputs, compose, png_metadata

    verifier = compose.make_task_verifier(pipe, options, model=args.model)
    vocabulary = card_metadata(args.model).get("vocabulary")
    vocabulary = {str(word).lower() for word in vocabulary} if isinstance(vocabulary, list) else None
    files = {"constraints": args.constraints} if args.constraints is not None else {}

    def generate(prompt: str, output: Path, prompt_constraints=None) -> str:
        inputs = ComposeInputs(prompt, prompt_constraints, files)
        result = compose.run(pipe, inputs, options, verifier=verifier, attention_controllers=extra)
        echo(format_report(result.output, verifier, vocabulary_warnings(prompt, pipe.tokenizer, vocabulary)))
        record = {**result.records[0], **run_settings(args)}
        save_image(result.images[0], output, metadata=png_metadata(record), overwrite=args.overwrite)
        echo(f"wrote {output}")
        return result.output.chosen

    return generate
