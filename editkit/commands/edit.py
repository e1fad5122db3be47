"""``editkit edit``: text-driven editing of a real image with the (dual) contrastive denoising score."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from editkit.commands.common import (
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    finite_float,
    png_metadata,
    positive_int,
)
from editkit.errors import InputError

logger = logging.getLogger(__name__)

CONTRAST_CHOICES = ("dual", "source", "target", "none")
EXAMPLE = (
    'example: editkit edit cat.png --source-prompt "a photo of a cat" --target-prompt "a photo of a dog" '
    "-o dog.png --seed 0"
)


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
    parser.add_argument("image", type=Path, help="input image (PNG, JPEG, WebP)")
    parser.add_argument("--source-prompt", required=True, help="text describing the input image")
    parser.add_argument("--target-prompt", required=True, help="text describing the wanted result")
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
    add_output_options(parser)
    parser.set_defaults(run=run)


def _check_arguments(args: argparse.Namespace) -> None:
    """User mistakes caught before anything is loaded."""
    for option, prompt in (("--source-prompt", args.source_prompt), ("--target-prompt", args.target_prompt)):
        if not prompt.strip():
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
    from editkit.image import fit_size, load_image, resize_to, save_image
    from editkit.models import load_pipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    check_output_path(args.output, args.overwrite)
    _check_arguments(args)
    if args.source_prompt.strip() == args.target_prompt.strip():
        logger.warning("--source-prompt and --target-prompt are identical: the edit will change little")
    image = load_image(args.image)
    mask = _load_mask(args.mask, image.size) if args.mask is not None else None

    pipe = load_pipeline(ContrastiveEditPipeline, args.model, device=args.device, dtype=args.dtype)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    size = fit_size(*image.size, multiple=pipe.vae_scale_factor, max_side=args.max_side or native)
    if mask is not None and size != image.size:
        mask = F.interpolate(mask, size=(size[1], size[0]), mode="nearest")
    extra = []
    if args.soft_tokens:
        from editkit.softrepa import load_soft_tokens

        extra = [load_soft_tokens(args.soft_tokens, unet=pipe.unet, strength=args.soft_token_strength)]

    generator = torch.Generator("cpu").manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="source and target prompts are identical")
        result = pipe(
            resize_to(image, size),
            args.source_prompt,
            args.target_prompt,
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
    params = command_params(args)
    params["size"] = list(size)
    save_image(result.images[0], args.output, metadata=png_metadata("edit", params), overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0
