"""``editkit edit``: text-driven editing of a real image with the (dual) contrastive denoising score."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.cli import echo
from editkit.commands.common import (
    add_attention_option,
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    finite_float,
    load_method_pipeline,
    png_metadata,
    positive_int,
    read_text_lines,
)
from editkit.errors import InputError
from editkit.image import SAVE_FORMATS
from editkit.jsonio import parse_json

logger = logging.getLogger(__name__)

CONTRAST_CHOICES = ("dual", "source", "target", "none")
EXAMPLE = """examples:
  editkit edit cat.png --source-prompt "a photo of a cat" --target-prompt "a photo of a dog" -o dog.png --seed 0
  editkit edit photos/ --source-prompt "a cat" --target-prompt "a dog" --output-dir out/   (every image; resumable)
  editkit edit photos/ --prompts edits.jsonl --output-dir out/
      (one edit per line: {"image": "cat.png", "source_prompt": "a cat", "target_prompt": "a dog"})"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit",
        help="edit an image from a source prompt to a target prompt (DDS / CDS / dual contrastive)",
        description=(
            "Edit IMAGE so that it matches --target-prompt and keeps everything else: delta denoising "
            "score with a patch-wise contrastive loss on self-attention features (dual by default)."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", type=Path, help="input image (PNG, JPEG, WebP), or a folder of them (batch mode)")
    parser.add_argument("--source-prompt", default=None, help="text describing the input image")
    parser.add_argument("--target-prompt", default=None, help="text describing the wanted result")
    parser.add_argument(
        "--prompts", type=Path, default=None, help="batch mode: JSON lines with image, source_prompt, target_prompt"
    )
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="batch mode: folder for the edited images and manifest.json"
    )
    parser.add_argument("--iterations", type=int, default=200, help="optimisation iterations (default: 200)")
    parser.add_argument("--guidance-scale", type=finite_float, default=7.5, help="CFG scale (default: 7.5)")
    parser.add_argument(
        "--contrast",
        choices=CONTRAST_CHOICES,
        default="dual",
        help="PatchNCE anchor: source (CDS), target (CUT), dual (both) or none (plain DDS); default: dual",
    )
    parser.add_argument("--contrast-weight", type=finite_float, default=3.0, help="contrastive weight (default: 3)")
    parser.add_argument(
        "--feature",
        choices=("output", "query", "key", "value"),
        default="output",
        help="self-attention feature compared (default: output)",
    )
    parser.add_argument("--identity-branch", action="store_true", help="also contrast with the identity branch")
    parser.add_argument("--learning-rate", type=finite_float, default=0.1, help="SGD step (default: 0.1)")
    parser.add_argument("--mask", type=Path, default=None, help="binary mask of the image's size: edit inside only")
    parser.add_argument(
        "--max-side", type=positive_int, default=None, help="downscale longer side to this (default: the model's)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, slower backward")
    add_model_options(parser)
    add_attention_option(parser)
    add_output_options(parser, required=False)
    parser.set_defaults(run=run)


def _check_mode(args: argparse.Namespace) -> None:
    """Either IMAGE -o FILE with both prompts, or FOLDER --output-dir DIR with both prompts or --prompts."""
    if args.output_dir is None:
        if args.output is None or args.prompts is not None:
            raise InputError(
                "give -o FILE (or --output-dir DIR, with --prompts FILE.jsonl or both prompts, for a batch)"
            )
    elif args.output is not None:
        raise InputError("batch mode writes to --output-dir DIR; leave out -o")
    elif args.mask is not None:
        raise InputError("--mask applies to a single image, not to a batch")
    if args.prompts is None and (args.source_prompt is None or args.target_prompt is None):
        raise InputError("give --source-prompt and --target-prompt (or --prompts FILE.jsonl with --output-dir)")
    if args.prompts is not None and (args.source_prompt is not None or args.target_prompt is not None):
        raise InputError("--prompts gives the prompts of each image; leave out --source-prompt/--target-prompt")


def read_edits(path: Path, folder: Path) -> list[dict[str, str]]:
    """The edits of a JSON-lines file: image (relative to ``folder``), source_prompt, target_prompt."""
    lines = read_text_lines(path, "prompt file")
    edits = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        entry = parse_json(line, f"{path} line {number}")
        try:
            edit = {key: str(entry[key]) for key in ("image", "source_prompt", "target_prompt")}
        except (ValueError, KeyError, TypeError):
            raise InputError(
                f'{path} line {number}: expected {{"image": ..., "source_prompt": ..., "target_prompt": ...}}'
            ) from None
        edit["image"] = str(folder / edit["image"])
        edits.append(edit)
    if not edits:
        raise InputError(f"{path} holds no edits (one JSON object per line)")
    return edits


def _jobs(args: argparse.Namespace) -> list:
    """One job per image (both prompts) or per JSON line; a job's fingerprint covers its prompts and
    the bytes of its image, so a corrected line or a replaced image is redone on resume."""
    from editkit.commands.batch import Job, fingerprint, images_in, output_name, without_outputs

    if args.prompts is None:
        edits = [
            {"image": str(p), "source_prompt": args.source_prompt, "target_prompt": args.target_prompt}
            for p in without_outputs(images_in(args.image), args.output_dir)
        ]
        names = [output_name(Path(e["image"]).stem) for e in edits]
        keys = [e["image"] for e in edits]
    else:
        edits = read_edits(args.prompts, args.image)
        names = [output_name(f"{i:04d}-{Path(e['image']).stem}") for i, e in enumerate(edits)]
        keys = [f"{i:04d}" for i in range(len(edits))]
    return [Job(key, name, e, fingerprint(e, [e["image"]])) for key, name, e in zip(keys, names, edits)]


def _check_arguments(args: argparse.Namespace) -> None:
    """User mistakes caught before anything is loaded."""
    for option, prompt in (("--source-prompt", args.source_prompt), ("--target-prompt", args.target_prompt)):
        if prompt is not None and not prompt.strip():
            raise InputError(f"{option} is empty; describe the image in a few words")
    if args.iterations < 1:
        raise InputError(f"--iterations must be at least 1, got {args.iterations}")
    if args.guidance_scale < 1:
        raise InputError(f"--guidance-scale must be at least 1, got {args.guidance_scale:g}")
    if args.contrast_weight < 0 or args.learning_rate <= 0:
        raise InputError("--contrast-weight must be >= 0 and --learning-rate > 0")


def _load_mask(path: Path, image_size: tuple[int, int]) -> torch.Tensor:
    """A binary, non-empty mask of exactly the image's size -> (1, 1, H, W) of {0, 1}."""
    from editkit.image import load_image, load_mask

    found = load_image(path).size
    if found != image_size:
        raise InputError(f"mask {path} is {found[0]}x{found[1]} but the image is {image_size[0]}x{image_size[1]}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = load_mask(path, image_size)
    if any("not binary" in str(w.message) for w in caught):
        raise InputError(f"mask {path} is not binary; use black (keep) and white (edit) pixels only")
    if not mask.any():
        raise InputError(f"mask {path} is empty (all black): nothing to edit")
    return mask


def run(args: argparse.Namespace) -> int:
    from editkit.commands.batch import check_batch_outputs, run_batch
    from editkit.image import load_image
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    _check_mode(args)
    _check_arguments(args)
    if args.output_dir is None:
        check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
        if args.source_prompt.strip() == args.target_prompt.strip():
            logger.warning("--source-prompt and --target-prompt are identical: the edit will change little")
        image = load_image(args.image)
        mask = _load_mask(args.mask, image.size) if args.mask is not None else None
    else:
        if not args.image.is_dir():
            raise InputError(f"batch mode needs a folder of images, got {args.image}")
        jobs, params = _jobs(args), command_params(args, skip=("prompts", "output_dir", "image"))
        check_batch_outputs(jobs, args.output_dir, "edit", params, args.overwrite)

    pipe, extra = load_method_pipeline(ContrastiveEditPipeline, args)
    if args.output_dir is None:
        _edit(pipe, args, (image, args.image), args.source_prompt, args.target_prompt, mask, args.output, extra)
        return 0

    def produce(task) -> None:
        edit, output = task.job.inputs, task.path(task.job.output)
        picture = (load_image(edit["image"]), edit["image"])
        _edit(pipe, args, picture, edit["source_prompt"], edit["target_prompt"], None, output, extra)
        task.written(task.job.output)

    echo(run_batch(jobs, args.output_dir, "edit", params, produce, overwrite=args.overwrite))
    return 0


def _edit(pipe, args: argparse.Namespace, picture, source: str, target: str, mask, output: Path, extra) -> None:
    """Edit one ``picture`` = (image, its path) with the command's options; save it with its parameters."""
    from editkit.image import fit_size, resize_to, save_image

    image, image_path = picture
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = fit_size(*image.size, multiple=pipe.vae_scale_factor, max_side=args.max_side or native)
    if mask is not None and size != image.size:
        mask = F.interpolate(mask, size=(size[1], size[0]), mode="nearest")
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="source and target prompts are identical")
        result = pipe(
            resize_to(image, size),
            source,
            target,
            num_inference_steps=args.iterations,
            guidance_scale=args.guidance_scale,
            learning_rate=args.learning_rate,
            contrast=None if args.contrast == "none" else args.contrast,
            contrast_weight=args.contrast_weight,
            feature=args.feature,
            identity_branch=args.identity_branch,
            mask=mask,
            gradient_checkpointing=args.gradient_checkpointing,
            generator=generator,
            attention_controllers=extra,
        )
    params = command_params(args, skip=("prompts", "output_dir"))
    params.update(image=str(image_path))
    params.update(source_prompt=source, target_prompt=target, size=list(size))
    save_image(result.images[0], output, metadata=png_metadata("edit", params), overwrite=args.overwrite)
    echo(f"wrote {output}")
