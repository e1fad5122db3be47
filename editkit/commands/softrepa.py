"""``editkit softrepa``: train SoftREPA soft tokens, and generate images with them.

``train`` runs the same on one CPU, one GPU, or several processes under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from editkit.cli import echo
from editkit.commands.common import (
    DEFAULT_SD_MODEL,
    add_compile_option,
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    compile_mode,
    finite_float,
    non_negative_int,
    png_metadata,
    positive_float,
    positive_int,
    ranged_float,
)

TRAIN_EXAMPLE = (
    "example: editkit softrepa train --data coco_subset/ --model stable-diffusion-v1-5/stable-diffusion-v1-5 "
    "--output tokens.safetensors --max-steps 2000\n"
    "  several GPUs: accelerate launch --multi_gpu --num_processes 4 -m editkit.cli softrepa train --data coco_subset/ "
    "--output tokens.safetensors\n"
    "  several CPU processes: the same with --device cpu"
)
GENERATE_EXAMPLE = (
    "example: editkit softrepa generate 'a red cube left of a blue ball' --soft-tokens tokens.safetensors -o out.png"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "softrepa",
        help="train SoftREPA soft tokens; generate with them",
        description="SoftREPA: soft text tokens trained contrastively on a frozen model (better text alignment).",
        epilog=f"{TRAIN_EXAMPLE}\n{GENERATE_EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="softrepa_command", metavar="ACTION", required=True)
    _register_train(actions)
    _register_generate(actions)


def _register_train(actions) -> None:
    parser = actions.add_parser(
        "train",
        help="train soft tokens on captioned images",
        description="Train m soft tokens (model frozen) with the contrastive denoising loss; writes .safetensors.",
        epilog=TRAIN_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with images + metadata.jsonl, or a .csv")
    parser.add_argument(
        "--model",
        default=DEFAULT_SD_MODEL,
        help=f"Hub id, diffusers folder or .safetensors (default: {DEFAULT_SD_MODEL})",
    )
    parser.add_argument("--output", "-o", type=Path, required=True, help="token file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what accelerate chooses)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=1000)
    parser.add_argument("--batch-size", type=positive_int, default=4, help="images per process and step (B; B^2 pairs)")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-3)
    parser.add_argument("--weight-decay", type=ranged_float(0, 1), default=1e-4)
    parser.add_argument(
        "--min-learning-rate", type=ranged_float(0, 1), default=1e-5, help="floor of the cosine schedule"
    )
    parser.add_argument(
        "--restart-every", type=positive_int, default=5000, help="steps between cosine warm restarts (reference: 5000)"
    )
    parser.add_argument(
        "--lr-step-every",
        type=positive_int,
        default=500,
        help="steps between learning-rate updates (reference: 500, so T_0 = 10; 1: a smooth cosine)",
    )
    parser.add_argument("--num-tokens", type=positive_int, default=4, help="m soft tokens")
    parser.add_argument(
        "--token-init",
        choices=("text", "normal"),
        default="text",
        help="initial tokens: text (the empty prompt's start-of-text embedding on SD 1.x, the reference's) or "
        "normal (N(0, 0.02) on every model) (default: %(default)s)",
    )
    parser.add_argument(
        "--time-buckets", type=non_negative_int, default=100, help="time-embedding buckets (0: none; reference: 100)"
    )
    parser.add_argument(
        "--time-layout",
        choices=("shared", "per-token"),
        default="shared",
        help="shared: one vector per bucket added to all m tokens (reference); per-token: (buckets, m, width)",
    )
    parser.add_argument(
        "--sites", nargs="+", default=None, help="cross-attention site patterns (default: down blocks; SDXL + mid)"
    )
    parser.add_argument(
        "--resolution", type=positive_int, default=512, help="training size in pixels (reference: 512, SDXL included)"
    )
    parser.add_argument("--logit-form", choices=("exp", "linear"), default="exp", help="s*exp(-err/tau) or -err/tau")
    parser.add_argument("--tau", type=positive_float, default=0.07)
    parser.add_argument("--logit-scale", type=positive_float, default=4.0, help="s of the exp form")
    parser.add_argument("--direction", choices=("rows", "columns", "both"), default="rows")
    parser.add_argument("--denoise-weight", type=ranged_float(0, 1e6), default=10.0)
    parser.add_argument("--negative-bank", type=non_negative_int, default=0, help="extra negative captions per step")
    parser.add_argument("--gather-negatives", action="store_true", help="other processes' captions as negatives")
    parser.add_argument(
        "--hard-negatives",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="up to N perturbed captions per batch caption as extra negatives: colours swapped between its two "
        "objects, relation flipped (default: %(default)s, none)",
    )
    parser.add_argument("--row-chunk", type=positive_int, default=None, help="image rows per denoiser call")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--checkpoint-every", type=non_negative_int, default=100)
    parser.add_argument("--validate-every", type=non_negative_int, default=100)
    parser.add_argument("--val-fraction", type=ranged_float(0, 0.5), default=0.1)
    parser.add_argument(
        "--keep-best",
        choices=("group", "hard-negatives"),
        default="group",
        help="held-out metric that picks the saved tokens: own caption lowest among a group of validation "
        "captions, or among it and its hard negatives (default: %(default)s)",
    )
    parser.add_argument("--patience", type=non_negative_int, default=0, help="validations without gain before stopping")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint file or checkpoint folder to continue")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def _register_generate(actions) -> None:
    parser = actions.add_parser(
        "generate",
        help="text-to-image with soft tokens",
        description="Plain SoftREPA generation: text-to-image with the tokens in both CFG branches.",
        epilog=GENERATE_EXAMPLE,
    )
    parser.add_argument("prompt", help="text prompt")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=positive_int, default=30)
    parser.add_argument("--guidance-scale", type=finite_float, default=7.5)
    parser.add_argument("--width", type=positive_int, default=None)
    parser.add_argument("--height", type=positive_int, default=None)
    add_model_options(parser)
    add_output_options(parser)
    add_compile_option(parser)
    parser.set_defaults(run=run_generate)


def run_train(args: argparse.Namespace) -> int:
    from editkit.softrepa import ContrastiveLossConfig, TrainConfig, train_soft_tokens

    loss = ContrastiveLossConfig(args.logit_form, args.tau, args.logit_scale, args.direction, args.denoise_weight)
    config = TrainConfig(
        data=args.data, model=args.model, output=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, min_learning_rate=args.min_learning_rate,
        restart_every=args.restart_every, lr_step_every=args.lr_step_every, num_tokens=args.num_tokens,
        token_init=args.token_init, hard_negatives=args.hard_negatives, keep_best=args.keep_best,
        time_buckets=args.time_buckets, time_layout=args.time_layout, sites=args.sites,
        resolution=args.resolution, seed=args.seed, loss=loss, negative_bank=args.negative_bank,
        gather_negatives=args.gather_negatives, row_chunk=args.row_chunk,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every, validate_every=args.validate_every, val_fraction=args.val_fraction,
        patience=args.patience, device=args.device, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress,
    )  # fmt: skip
    from editkit.softrepa.runfiles import evaluation_line

    result = train_soft_tokens(config, report=lambda entry: echo(evaluation_line(entry)))
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    if result.unreadable_images:
        echo(f"skipped {result.unreadable_images} unreadable images")
    echo(f"wrote {args.output} and its log {config.log_path} after {result.steps} steps")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from editkit.image import SAVE_FORMATS, save_image
    from editkit.models import load_pipeline
    from editkit.softrepa import load_soft_tokens, use_soft_tokens
    from editkit.softrepa.train import text_to_image_class

    check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
    if args.soft_tokens is None:
        from editkit.errors import InputError

        raise InputError(
            "generate needs --soft-tokens FILE (plain generation without tokens is any diffusers pipeline)"
        )
    pipe = load_pipeline(text_to_image_class(args.model), args.model, device=args.device, dtype=args.dtype)
    controller = load_soft_tokens(args.soft_tokens, unet=pipe.unet, strength=args.soft_token_strength)
    if args.compile:
        from editkit.acceleration import compile_unet

        compile_unet(pipe.unet, mode=compile_mode(args.compile))
    generator = torch.Generator("cpu").manual_seed(args.seed)
    with use_soft_tokens(pipe.unet, controller):
        image = pipe(
            args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, width=args.width, height=args.height, generator=generator,
        ).images[0]  # fmt: skip
    save_image(
        image, args.output, metadata=png_metadata("softrepa generate", command_params(args)), overwrite=args.overwrite
    )
    return 0
