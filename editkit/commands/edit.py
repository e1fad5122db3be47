"""``editkit edit``: text-driven editing of a real image with the (dual) contrastive denoising score."""

from __future__ import annotations

import argparse
import logging
import warnings
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
from editkit.jsonio import parse_json
from editkit.tasks.edit import EditOptions, check_prompts

logger = logging.getLogger(__name__)

#: Option field -> flag (an invalid value is reported with its flag).
FLAGS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "learning_rate": "--learning-rate",
    "contrast": "--contrast", "contrast_weight": "--contrast-weight", "feature": "--feature",
    "identity_branch": "--identity-branch", "gradient_checkpointing": "--gradient-checkpointing", "size": "--size",
    "seed": "--seed", "method": "--method", "source_guidance_scale": "--source-guidance-scale", "n_max": "--n-max",
}  # fmt: skip
EXAMPLE = """examples:
  editkit edit cat.png --source-prompt "a photo of a cat" --target-prompt "a photo of a dog" -o dog.png
  editkit edit photos/ --source-prompt "a cat" --target-prompt "a dog" --output-dir out/
      (every image; resumable)
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
    )
    parser.add_argument("image", type=Path, help="input image (PNG, JPEG, WebP), or a folder of them (batch mode)")
    parser.add_argument("--source-prompt", default=None, help="text describing the input image")
    parser.add_argument("--target-prompt", default=None, help="text describing the wanted result")
    parser.add_argument(
        "--prompts", type=Path, default=None, help="batch mode: JSON lines with image, source_prompt, target_prompt"
    )
    method = parser.add_argument_group("method")
    add_knob(method, "--steps", EditOptions, "num_inference_steps")
    add_knob(method, "--guidance-scale", EditOptions, "guidance_scale")
    add_knob(method, "--contrast", EditOptions, "contrast")
    add_knob(method, "--contrast-weight", EditOptions, "contrast_weight")
    add_knob(method, "--feature", EditOptions, "feature")
    add_knob(method, "--identity-branch", EditOptions, "identity_branch", action="store_true")
    add_knob(method, "--learning-rate", EditOptions, "learning_rate")
    add_knob(method, "--method", EditOptions, "method")
    add_knob(method, "--source-guidance-scale", EditOptions, "source_guidance_scale")
    add_knob(method, "--n-max", EditOptions, "n_max")
    method.add_argument("--mask", type=Path, default=None, help="edit inside this mask only (white = edit)")
    add_size_option(method, EditOptions)
    add_knob(method, "--gradient-checkpointing", EditOptions, "gradient_checkpointing", action="store_true")
    add_seed_option(method, EditOptions)
    add_model_options(parser)
    add_attention_option(parser)
    add_output_options(parser, required=False, batch=True)
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


def run(args: argparse.Namespace) -> int:
    from editkit.commands.batch import check_batch_outputs, run_batch
    from editkit.image import load_image

    _check_mode(args)
    options = make_options(EditOptions, FLAGS, args)
    check_prompts(args.source_prompt, args.target_prompt, names=("--source-prompt", "--target-prompt"))
    if args.output_dir is None:
        check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
        image = load_image(args.image)
        mask = _load_mask(args.mask, image.size) if args.mask is not None else None
    else:
        if not args.image.is_dir():
            raise InputError(f"batch mode needs a folder of images, got {args.image}")
        jobs, params = _jobs(args), command_params(args, skip=("prompts", "output_dir", "image"))
        check_batch_outputs(jobs, args.output_dir, "edit", params, args.overwrite)

    _check_family(options, args.model)
    pipe, extra = load_method_pipeline("edit", args)
    if args.output_dir is None:
        inputs = _inputs(image, args.image, args.source_prompt, args.target_prompt, mask, args.mask)
        _edit(pipe, args, options, inputs, args.output, extra)
        return 0

    def produce(task) -> None:
        edit, output = task.job.inputs, task.path(task.job.output)
        inputs = _inputs(load_image(edit["image"]), edit["image"], edit["source_prompt"], edit["target_prompt"])
        _edit(pipe, args, options, inputs, output, extra)
        task.written(task.job.output)

    echo(run_batch(jobs, args.output_dir, "edit", params, produce, overwrite=args.overwrite))
    return 0


def _check_family(options: EditOptions, model) -> None:
    """Options of the other model kind (UNet / MM-DiT) are refused from the model's index, before it loads."""
    from editkit.models import model_source_family
    from editkit.tasks.edit import MMDIT_ONLY, UNET_ONLY, check_family_options

    if any(getattr(options, name) not in (None, False) for name in (*UNET_ONLY, *MMDIT_ONLY)):
        family = model_source_family(model)
        if family is not None:  # a Hub repo not cached yet: the task layer checks once it is loaded
            check_family_options(options, family, names=FLAGS)


def _load_mask(path: Path, image_size: tuple[int, int]):
    """The mask image, checked before the model loads: readable, the image's aspect ratio, not empty."""
    from editkit.image import read_mask_image
    from editkit.tasks.common import prepare_mask

    mask = read_mask_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run reports the resize and threshold once
        prepare_mask(mask, image_size, mask.size, name=f"mask {path}")
    return mask


def _inputs(image, image_path, source: str, target: str, mask=None, mask_path=None):
    from editkit.tasks import EditInputs

    files = {"image": image_path, **({"mask": mask_path} if mask_path is not None else {})}
    return EditInputs(image, source, target, mask, files)


def _edit(pipe, args: argparse.Namespace, options: EditOptions, inputs, output: Path, extra) -> None:
    """Edit one image with the task layer; save it with its record."""
    from editkit.image import save_image
    from editkit.tasks import edit, png_metadata

    result = edit.run(pipe, inputs, options, attention_controllers=extra)
    record = {**result.records[0], **run_settings(args), "image": str(inputs.files["image"])}
    save_image(result.images[0], output, metadata=png_metadata(record), overwrite=args.overwrite)
    echo(f"wrote {output}")
