"""``editkit softrepa``: train SoftREPA soft tokens, and generate images with them.

``train`` runs the same on one CPU, one GPU, or several processes under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from editkit.cli import echo
from editkit.commands.common import (
    add_compile_option,
    add_knob,
    add_model_options,
    add_output_options,
    add_seed_option,
    add_size_option,
    check_output_path,
    make_options,
    non_negative_int,
    positive_float,
    positive_int,
    ranged_float,
    run_settings,
)
from editkit.models import DEFAULT_SD_MODEL
from editkit.tasks.generate import GenerateOptions

TRAIN_EXAMPLE = """example:
  editkit softrepa train --data coco_subset/ --output tokens.safetensors --max-steps 2000
  several GPUs:
    accelerate launch --multi_gpu --num_processes 4 -m editkit.cli softrepa train \\
        --data coco_subset/ --output tokens.safetensors
  several CPU processes: the same with --device cpu"""
GENERATE_EXAMPLE = """example:
  editkit softrepa generate 'a red cube left of a blue ball' --soft-tokens tokens.safetensors -o out.png"""
#: Option field -> flag of ``generate`` (an invalid value is reported with its flag).
GENERATE_FLAGS = {
    "num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "negative_prompt": "--negative-prompt",
    "soft_token_strength": "--soft-token-strength", "size": "--size", "seed": "--seed",
    "max_sequence_length": "--max-sequence-length",
}  # fmt: skip


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "softrepa",
        help="train SoftREPA soft tokens; generate with them",
        description="SoftREPA: soft text tokens trained contrastively on a frozen model (better text alignment).",
        epilog=f"{TRAIN_EXAMPLE}\n{GENERATE_EXAMPLE}",
    )
    actions = parser.add_subparsers(dest="softrepa_command", metavar="ACTION", required=True)
    _register_train(actions)
    _register_generate(actions)


def _default(name: str):
    """A default of :class:`editkit.softrepa.TrainConfig` (or of its loss config): written there once."""
    import dataclasses

    from editkit.softrepa import ContrastiveLossConfig, TrainConfig

    for config in (TrainConfig, ContrastiveLossConfig):
        found = {f.name: f.default for f in dataclasses.fields(config)}
        if name in found:
            return found[name]
    raise KeyError(name)


def _register_train(actions) -> None:
    parser = actions.add_parser(
        "train",
        help="train soft tokens on captioned images",
        description="Train m soft tokens (model frozen) with the contrastive denoising loss; writes .safetensors.",
        epilog=TRAIN_EXAMPLE,
    )
    add = parser.add_argument
    add("--data", type=Path, required=True, help="folder with images + metadata.jsonl, or a .csv")
    add("--model", default=DEFAULT_SD_MODEL, help="Hub id, diffusers folder or .safetensors file")
    add("--output", "-o", type=Path, required=True, help="token file to write (.safetensors)")
    add("--overwrite", action="store_true", help="replace an existing token file")
    add("--device", default=None, help="cpu or cuda (default: what accelerate chooses)")
    add("--seed", type=non_negative_int, default=_default("seed"), help="random seed")
    add("--max-steps", type=positive_int, default=_default("max_steps"), help="optimisation steps")
    add(
        "--batch-size",
        type=positive_int,
        default=_default("batch_size"),
        help="images per process and step (B; B^2 pairs)",
    )
    add("--learning-rate", type=positive_float, default=_default("learning_rate"), help="AdamW learning rate")
    add("--weight-decay", type=ranged_float(0, 1), default=_default("weight_decay"), help="AdamW weight decay")
    add(
        "--min-learning-rate",
        type=ranged_float(0, 1),
        default=_default("min_learning_rate"),
        help="floor of the cosine schedule",
    )
    add(
        "--restart-every",
        type=positive_int,
        default=_default("restart_every"),
        help="steps between cosine warm restarts (reference: 5000)",
    )
    add(
        "--lr-step-every",
        type=positive_int,
        default=_default("lr_step_every"),
        help="steps between learning-rate updates (reference: 500, so T_0 = 10; 1: a smooth cosine)",
    )
    add("--num-tokens", type=positive_int, default=_default("num_tokens"), help="m soft tokens")
    add(
        "--token-init",
        choices=("text", "normal"),
        default=_default("token_init"),
        help="initial tokens: text (the empty prompt's start-of-text embedding on SD 1.x, the reference's) or "
        "normal (N(0, 0.02) on every model)",
    )
    add(
        "--time-buckets",
        type=non_negative_int,
        default=_default("time_buckets"),
        help="time-embedding buckets (0: none; reference: 100)",
    )
    add(
        "--time-layout",
        choices=("shared", "per-token"),
        default=_default("time_layout"),
        help="shared: one vector per bucket added to all m tokens (reference); per-token: (buckets, m, width)",
    )
    add(
        "--sites",
        nargs="+",
        default=None,
        help="cross-attention site patterns (default: down blocks; SDXL + mid; "
        "MM-DiT: joint sites, default the first --layers joint blocks)",
    )
    add(
        "--layers",
        type=positive_int,
        default=_default("layers"),
        help="MM-DiT models (SD3/SD3.5, FLUX): per-layer tokens on the first N joint blocks (reference: 5)",
    )
    add(
        "--max-sequence-length",
        type=non_negative_int,
        default=None,
        help="MM-DiT models: T5 tokens of the captions (default: the pipeline's; 0 for a model without T5)",
    )
    add(
        "--resolution",
        type=positive_int,
        default=_default("resolution"),
        help="training size in pixels (reference: 512, SDXL included)",
    )
    add(
        "--logit-form",
        choices=("exp", "linear"),
        default=_default("logit_form"),
        help="contrastive logits: s*exp(-err/tau) or -err/tau",
    )
    add("--tau", type=positive_float, default=_default("tau"), help="temperature of the contrastive logits")
    add("--logit-scale", type=positive_float, default=_default("scale"), help="s of the exp form")
    add(
        "--direction",
        choices=("rows", "columns", "both"),
        default=_default("direction"),
        help="cross-entropy over captions per image (rows), over images per caption (columns) or both",
    )
    add(
        "--denoise-weight",
        type=ranged_float(0, 1e6),
        default=_default("denoise_weight"),
        help="weight of the plain denoising loss on the matching pairs",
    )
    add(
        "--negative-bank",
        type=non_negative_int,
        default=_default("negative_bank"),
        help="extra negative captions per step",
    )
    add("--gather-negatives", action="store_true", help="other processes' captions as negatives")
    add(
        "--hard-negatives",
        type=non_negative_int,
        default=_default("hard_negatives"),
        metavar="N",
        help="up to N perturbed captions per batch caption as extra negatives: colours swapped between its two "
        "objects, relation flipped (0: none)",
    )
    add("--row-chunk", type=positive_int, default=None, help="image rows per denoiser call (default: all at once)")
    add("--gradient-checkpointing", action="store_true", help="recompute denoiser activations (less memory, slower)")
    add(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default=_default("mixed_precision"),
        help="accelerate's mixed precision",
    )
    add(
        "--checkpoint-every",
        type=non_negative_int,
        default=_default("checkpoint_every"),
        help="steps between checkpoints (0: none)",
    )
    add(
        "--validate-every",
        type=non_negative_int,
        default=_default("validate_every"),
        help="steps between validations (0: none)",
    )
    add(
        "--val-fraction",
        type=ranged_float(0, 0.5),
        default=_default("val_fraction"),
        help="share of the data held out for validation",
    )
    add(
        "--keep-best",
        choices=("group", "hard-negatives"),
        default=_default("keep_best"),
        help="held-out metric that picks the saved tokens: own caption lowest among a group of validation "
        "captions, or among it and its hard negatives",
    )
    add(
        "--patience",
        type=non_negative_int,
        default=_default("patience"),
        help="validations without gain before stopping (0: never stop early)",
    )
    add("--resume", type=Path, default=None, help="checkpoint file or checkpoint folder to continue")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)  # fmt: skip


def _register_generate(actions) -> None:
    parser = actions.add_parser(
        "generate",
        help="text-to-image with soft tokens",
        description="Plain SoftREPA generation: text-to-image with the tokens in both CFG branches.",
        epilog=GENERATE_EXAMPLE,
    )
    parser.add_argument("prompt", help="text prompt")
    add_knob(parser, "--negative-prompt", GenerateOptions, "negative_prompt", type=str)
    add_knob(parser, "--steps", GenerateOptions, "num_inference_steps")
    add_knob(parser, "--guidance-scale", GenerateOptions, "guidance_scale")
    add_knob(parser, "--max-sequence-length", GenerateOptions, "max_sequence_length")
    add_size_option(parser, GenerateOptions)
    add_seed_option(parser, GenerateOptions)
    add_model_options(parser)
    add_output_options(parser)
    add_compile_option(parser)
    parser.set_defaults(run=run_generate)


def run_train(args: argparse.Namespace) -> int:
    from editkit.errors import InputError

    if not args.data.exists():  # cheap checks before the model loads
        raise InputError(f"training data not found: {args.data}")
    if args.output.suffix.lower() != ".safetensors":
        raise InputError(f"cannot write {args.output}: use a .safetensors file name")
    from editkit.softrepa import ContrastiveLossConfig, TrainConfig, train_soft_tokens

    loss = ContrastiveLossConfig(args.logit_form, args.tau, args.logit_scale, args.direction, args.denoise_weight)
    config = TrainConfig(
        data=args.data, model=args.model, output=args.output, max_steps=args.max_steps, batch_size=args.batch_size,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, min_learning_rate=args.min_learning_rate,
        restart_every=args.restart_every, lr_step_every=args.lr_step_every, num_tokens=args.num_tokens,
        token_init=args.token_init, hard_negatives=args.hard_negatives, keep_best=args.keep_best,
        time_buckets=args.time_buckets, time_layout=args.time_layout, sites=args.sites, layers=args.layers,
        max_sequence_length=args.max_sequence_length,
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
    from editkit.errors import InputError
    from editkit.image import SAVE_FORMATS, save_image
    from editkit.tasks import GenerateInputs, check_soft_tokens_source, generate, load_task_pipeline, png_metadata

    options = make_options(GenerateOptions, GENERATE_FLAGS, args)
    check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
    if args.soft_tokens is None:
        raise InputError(
            "generate needs --soft-tokens FILE (plain generation without tokens is any diffusers pipeline)"
        )
    if not args.soft_tokens.is_file():
        raise InputError(f"soft-token file not found: {args.soft_tokens}")
    check_soft_tokens_source(args.soft_tokens, args.model)  # before the model loads
    pipe = load_task_pipeline("generate", args.model, device=args.device, dtype=args.dtype, compile_mode=args.compile)
    result = generate.run(pipe, GenerateInputs(args.prompt, args.soft_tokens), options)
    record = {**result.records[0], **run_settings(args)}
    save_image(result.images[0], args.output, metadata=png_metadata(record), overwrite=args.overwrite)
    echo(f"wrote {args.output}")
    return 0
