"""``editkit stylize``: attention-swapping style transfer (AttenST) of content images by style images."""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from editkit.cli import echo
from editkit.commands.batch import Job, check_batch_outputs, fingerprint, output_name, without_outputs
from editkit.commands.common import (
    add_attention_option,
    add_model_options,
    add_output_options,
    check_output_path,
    command_params,
    load_method_pipeline,
    non_negative_int,
    png_metadata,
    positive_float,
    positive_int,
    ranged_float,
)
from editkit.errors import InputError, OutputExistsError
from editkit.image import SAVE_FORMATS

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EXAMPLE = """example:
  editkit stylize content.png style.png -o stylized.png --steps 50 --gamma 0.75 --tau 1.5
  editkit stylize photos/ styles/ -o out/ --save-style-cache caches/   (all pairs, each style inverted once)
  editkit stylize photo.png --style-cache caches/style.safetensors -o out.png"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stylize",
        help="transfer the style of one or more images onto content images (AttenST)",
        description=(
            "Training-free style transfer: the content and style images are inverted with DDIM, then the "
            "content is regenerated with the style's self-attention keys/values in the decoder (query "
            "preservation gamma, temperature tau) from a content-aware AdaIN start latent. One output per "
            "(content, style) pair; a folder of contents and a folder of styles give all pairs."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("content", type=Path, help="content image, or a folder of them")
    parser.add_argument("style", type=Path, nargs="*", help="style image(s) or folder(s) of them")
    add_output_options(parser)
    add_model_options(parser)
    add_attention_option(parser)
    method = parser.add_argument_group("method")
    method.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    method.add_argument("--gamma", type=ranged_float(0, 1), default=0.75, help="content query preservation (0.75)")
    method.add_argument("--tau", type=positive_float, default=1.5, help="attention temperature, > 1 sharpens (1.5)")
    method.add_argument(
        "--adain-strength",
        type=ranged_float(0, 1),
        default=0.6,
        help="style colour strength a_s (1: AdaIN, 0: content's colours; 0.6)",
    )
    method.add_argument(
        "--resample-steps", type=non_negative_int, default=0, help="inversion resampling per step (0: plain DDIM)"
    )
    method.add_argument(
        "--feature-timing",
        choices=("inversion_step", "inverted_latent"),
        default="inversion_step",
        help="injected Q/K/V of step t from UNet(z_{t-1}, t) (default) or UNet(z_t, t) (StyleID's original)",
    )
    method.add_argument("--sites", nargs="+", default=None, help="self-attention sites/patterns (default: the model's)")
    method.add_argument("--mask", type=Path, default=None, help="stylize only inside this mask (white = stylize)")
    method.add_argument("--size", type=positive_int, default=None, help="longer side in pixels (default: the model's)")
    method.add_argument("--prompt", default="", help="optional text prompt (default: empty)")
    cache = parser.add_argument_group("style cache")
    cache.add_argument(
        "--style-cache", type=Path, action="append", default=[], help="use a saved style cache (repeatable)"
    )
    cache.add_argument(
        "--save-style-cache",
        type=Path,
        default=None,
        help="save computed style caches (a file, or a folder for several)",
    )
    parser.set_defaults(run=run)


@dataclass
class _Plan:
    contents: list[Path]
    styles: list[Path]
    caches: list[Path]
    outputs: dict[tuple[int, int], Path]  # (content index, style index) -> output file
    cache_outputs: list[Path]


def _images_in(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"{path} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    return [path]


def _output_name(content: Path, label: str) -> str:
    return output_name(f"{content.stem}__{label}")


def _inputs(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """Content and style files, less this batch's own outputs when -o is one of their folders."""
    contents = without_outputs(_images_in(args.content), args.output)
    styles = without_outputs([file for path in args.style for file in _images_in(path)], args.output)
    if args.output.is_dir():  # outputs a killed run wrote before recording them are not inputs either
        folder = args.output.resolve()
        labels = [p.stem for p in styles] + [p.stem for p in args.style_cache]
        planned = {_output_name(content, label) for content in contents for label in labels}
        contents = [p for p in contents if not (p.resolve().parent == folder and p.name in planned)]
    if not contents:
        raise InputError(f"{args.content} holds no images besides this batch's outputs")
    return contents, styles


def _plan(args: argparse.Namespace) -> _Plan:
    contents, styles = _inputs(args)
    caches = list(args.style_cache)
    if not styles and not caches:
        raise InputError("no style given: pass style image(s) or --style-cache FILE")
    labels = [p.stem for p in styles] + [p.stem for p in caches]
    single = len(contents) == 1 and len(labels) == 1
    outputs = {}
    for ci, content in enumerate(contents):
        for si, label in enumerate(labels):
            outputs[(ci, si)] = args.output if single else args.output / _output_name(content, label)
    if not single and (args.output.suffix.lower() in IMAGE_SUFFIXES or args.output.is_file()):
        raise InputError(f"{len(outputs)} outputs: give a folder for -o, not the file name {args.output}")
    cache_outputs = []
    if args.save_style_cache is not None:
        if not styles:
            raise InputError("--save-style-cache needs style images to compute caches from")
        many = len(styles) > 1
        cache_outputs = [
            args.save_style_cache / f"{p.stem}.safetensors" if many else args.save_style_cache for p in styles
        ]
    for path in outputs.values() if single else []:
        check_output_path(path, args.overwrite, suffixes=SAVE_FORMATS)
    for path in cache_outputs:
        check_output_path(path, args.overwrite)
    plan = _Plan(contents, styles, caches, outputs, cache_outputs)
    if not single:
        check_batch_outputs(_jobs(plan, args), args.output, "stylize", _batch_params(args), args.overwrite)
    return plan


def _jobs(plan: _Plan, args: argparse.Namespace) -> list[Job]:
    """Batch mode: one job per content image, one output per style (each style inverted once).

    A job's fingerprint covers the bytes of its content, of every style image and cache, and of
    the mask: a changed file is redone on resume."""
    labels = [str(p) for p in plan.styles] + [f"cache:{p}" for p in plan.caches]
    shared = [*plan.styles, *plan.caches, *([args.mask] if args.mask is not None else [])]
    shared_hash = fingerprint({}, shared)
    jobs = []
    for ci, content in enumerate(plan.contents):
        inputs = {"content": str(content), "styles": json.dumps(labels)}
        outputs = tuple(plan.outputs[(ci, si)].name for si in range(len(labels)))
        jobs.append(Job(str(content), outputs, inputs, fingerprint({**inputs, "shared": shared_hash}, [content])))
    return jobs


def _batch_params(args: argparse.Namespace) -> dict:
    """The options a resumed batch must share with the interrupted one (the manifest checks them)."""
    return command_params(args, skip=("debug", "save_style_cache", "content", "style", "style_cache"))


def _load_inputs(plan: _Plan, args: argparse.Namespace):
    """Every image, mask and cache read (and checked) before the model loads."""
    from editkit.image import load_image
    from editkit.style import StyleCache

    contents = [load_image(path) for path in plan.contents]
    styles = [load_image(path) for path in plan.styles]
    caches = [StyleCache.load(path) for path in plan.caches]
    if args.mask is not None:
        load_image(args.mask)  # readable; it is resized to each content's size later
    return contents, styles, caches


def _size(image, target: int):
    from editkit.image import fit_size

    return fit_size(*image.size, multiple=8, target=target)


def _mask(args: argparse.Namespace, size: tuple[int, int]):
    """The mask at the content's processing size; resize/threshold warnings become one log line each."""
    from editkit.image import load_mask, mask_coverage

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = load_mask(args.mask, size)
    for warning in caught:
        logger.warning("%s", warning.message)
    if mask_coverage(mask) == 0.0:
        raise InputError(f"mask {args.mask} is empty: nothing would be stylized")
    return mask[0, 0]


def _check_cache_sizes(caches, paths: list[Path], target: int) -> None:
    for cache, path in zip(caches, paths):
        if max(cache.size) != target:
            raise InputError(
                f"style cache {path} was made at {cache.size[0]}x{cache.size[1]} px; this run uses --size {target}"
            )


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    contents, styles, caches = _load_inputs(plan, args)

    import torch

    from editkit.image import resize_to
    from pipelines.style_transfer import StyleTransferPipeline

    pipe, extra = load_method_pipeline(StyleTransferPipeline, args)
    target = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    _check_cache_sizes(caches, plan.caches, target)
    style_inputs = [resize_to(image, _size(image, target)) if args.mask is None else image for image in styles]
    state = {"caches": None}  # every style's cache once it is inverted, reused for the other contents

    def stylize(ci: int, pending: set[Path], on_saved=None) -> None:
        content = contents[ci]
        width, height = _size(content, target)
        mask = _mask(args, (width, height)) if args.mask is not None else None
        reuse = state["caches"] is not None and args.mask is None
        out = pipe(
            content,
            None if reuse else style_inputs,
            style_cache=state["caches"] if reuse else caches,
            prompt=args.prompt,
            num_inference_steps=args.steps,
            gamma=args.gamma,
            tau=args.tau,
            adain_strength=args.adain_strength,
            resample_steps=args.resample_steps,
            feature_timing=args.feature_timing,
            injection_sites=args.sites,
            mask=mask,
            width=width,
            height=height,
            offload_features=len(contents) > 1,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
            attention_controllers=extra,
        )
        if state["caches"] is None:
            state["caches"] = out.style_caches
            _save_caches(out.style_caches, plan, args)
        _save_outputs(out.images, ci, plan, args, pending, on_saved)

    if len(plan.outputs) == 1:
        stylize(0, set(plan.outputs.values()))
        return 0
    from editkit.commands.batch import run_batch

    index = {str(content): ci for ci, content in enumerate(plan.contents)}

    def produce(task) -> None:
        pending = {task.path(name) for name in task.pending}
        stylize(index[task.job.key], pending, lambda path: task.written(path.name))

    manifest = run_batch(
        _jobs(plan, args), args.output, "stylize", _batch_params(args), produce, overwrite=args.overwrite
    )
    echo(manifest)
    return 0


def _save_caches(caches, plan: _Plan, args: argparse.Namespace) -> None:
    """Save computed style caches; a cache already there from an interrupted batch is kept.

    Under ``accelerate launch`` every process inverts the styles and saves the same caches: one
    that another process saved first (between the check and the atomic create) is kept as well.
    """
    for cache, path in zip(caches, plan.cache_outputs):
        if args.overwrite or not path.exists():
            try:
                cache.save(path, overwrite=args.overwrite)
            except OutputExistsError:
                logger.info("style cache %s was saved by another process of this batch", path)


def _save_outputs(images, content_index: int, plan: _Plan, args: argparse.Namespace, pending, on_saved) -> None:
    from editkit.image import save_image

    labels = [str(p) for p in plan.styles] + [f"cache:{p}" for p in plan.caches]
    for si, image in enumerate(images):
        path = plan.outputs[(content_index, si)]
        if path not in pending:
            continue  # written by an interrupted run of this batch
        params = command_params(args, skip=("style", "style_cache", "content"))
        params.update(content=str(plan.contents[content_index]), style=labels[si])
        save_image(image, path, metadata=png_metadata("stylize", params), overwrite=args.overwrite)
        if on_saved is not None:
            on_saved(path)
        echo(path)
