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
    add_knob,
    add_model_options,
    add_output_options,
    add_seed_option,
    add_size_option,
    check_output_path,
    command_params,
    load_method_pipeline,
    make_options,
    run_settings,
)
from editkit.errors import InputError, OutputExistsError
from editkit.image import SAVE_FORMATS
from editkit.tasks.stylize import StylizeOptions

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Option field -> flag (an invalid value is reported with its flag).
FLAGS = {
    "num_inference_steps": "--steps", "gamma": "--gamma", "tau": "--tau", "adain_strength": "--adain-strength",
    "resample_steps": "--resample-steps", "feature_timing": "--feature-timing", "injection_sites": "--sites",
    "prompt": "--prompt", "size": "--size", "seed": "--seed", "guidance_scale": "--guidance-scale",
    "negative_prompt": "--negative-prompt",
}  # fmt: skip
EXAMPLE = """examples:
  editkit stylize content.png style.png -o stylized.png --steps 50 --gamma 0.75 --tau 1.5
  editkit stylize photos/ styles/ --output-dir out/ --save-style-cache caches/
      (all pairs, each style inverted once; resumable)
  editkit stylize photo.png --style-cache caches/style.safetensors -o out.png"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stylize",
        help="transfer the style of one or more images onto content images (AttenST)",
        description=(
            "Training-free style transfer: the content and style images are inverted (DDIM; the flow ODE on "
            "SD3/FLUX), then the content is regenerated with the style's self-attention keys/values in the "
            "decoder (SD3/FLUX: the image-token keys/values of joint blocks; query preservation gamma, "
            "temperature tau) from a content-aware AdaIN start latent. One output per "
            "(content, style) pair; a folder of contents and a folder of styles give all pairs (--output-dir)."
        ),
        epilog=EXAMPLE,
    )
    parser.add_argument("content", type=Path, help="content image, or a folder of them")
    parser.add_argument("style", type=Path, nargs="*", help="style image(s) or folder(s) of them")
    add_output_options(parser, required=False, batch=True)
    add_model_options(parser)
    add_attention_option(parser)
    method = parser.add_argument_group("method")
    add_knob(method, "--steps", StylizeOptions, "num_inference_steps")
    add_knob(method, "--gamma", StylizeOptions, "gamma")
    add_knob(method, "--tau", StylizeOptions, "tau")
    add_knob(method, "--adain-strength", StylizeOptions, "adain_strength")
    add_knob(method, "--resample-steps", StylizeOptions, "resample_steps")
    add_knob(method, "--feature-timing", StylizeOptions, "feature_timing")
    add_knob(method, "--sites", StylizeOptions, "injection_sites", nargs="+", type=str)
    method.add_argument("--mask", type=Path, default=None, help="stylize only inside this mask (white = stylize)")
    add_size_option(method, StylizeOptions)
    add_knob(method, "--prompt", StylizeOptions, "prompt", type=str)
    add_knob(method, "--guidance-scale", StylizeOptions, "guidance_scale")
    add_knob(method, "--negative-prompt", StylizeOptions, "negative_prompt", type=str)
    add_seed_option(method, StylizeOptions)
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


def options_from_args(args: argparse.Namespace) -> StylizeOptions:
    """The task options of the parsed arguments (checked: an invalid value names its flag)."""
    sites = tuple(args.injection_sites) if args.injection_sites else None
    return make_options(StylizeOptions, FLAGS, args, injection_sites=sites)


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
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(
                f"{str(path)!r} is not an image file; stylize takes two image paths, CONTENT and STYLE "
                "(a text prompt goes to --prompt, or to 'editkit compose' / 'editkit edit')"
            )
        raise InputError(f"image file not found: {path}")
    return [path]


def _output_name(content: Path, label: str) -> str:
    return output_name(f"{content.stem}__{label}")


def _check_mode(args: argparse.Namespace) -> None:
    """Either -o FILE (one content, one style) or --output-dir DIR (any number of pairs)."""
    if (args.output is None) == (args.output_dir is None):
        raise InputError("give -o FILE for one content and one style, or --output-dir DIR for several")


def _inputs(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    """Content and style files, less this batch's own outputs when --output-dir is one of their folders."""
    contents = without_outputs(_images_in(args.content), args.output_dir)
    styles = without_outputs([file for path in args.style for file in _images_in(path)], args.output_dir)
    if args.output_dir is not None and args.output_dir.is_dir():  # outputs a killed run wrote before recording
        folder = args.output_dir.resolve()
        labels = [p.stem for p in styles] + [p.stem for p in args.style_cache]
        planned = {_output_name(content, label) for content in contents for label in labels}
        contents = [p for p in contents if not (p.resolve().parent == folder and p.name in planned)]
    if not contents:
        raise InputError(f"{args.content} holds no images besides this batch's outputs")
    return contents, styles


def _plan(args: argparse.Namespace) -> _Plan:
    _check_mode(args)
    contents, styles = _inputs(args)
    caches = list(args.style_cache)
    if not styles and not caches:
        raise InputError("no style given: pass style image(s) or --style-cache FILE")
    labels = [p.stem for p in styles] + [p.stem for p in caches]
    single = args.output is not None
    if single and (len(contents) > 1 or len(labels) > 1):
        count = len(contents) * len(labels)
        raise InputError(f"{count} outputs: give --output-dir DIR instead of -o {args.output}")
    if single:
        check_output_path(args.output, args.overwrite, suffixes=SAVE_FORMATS)
    outputs = {
        (ci, si): args.output if single else args.output_dir / _output_name(content, label)
        for ci, content in enumerate(contents)
        for si, label in enumerate(labels)
    }
    cache_outputs = []
    if args.save_style_cache is not None:
        if not styles:
            raise InputError("--save-style-cache needs style images to compute caches from")
        many = len(styles) > 1
        cache_outputs = [
            args.save_style_cache / f"{p.stem}.safetensors" if many else args.save_style_cache for p in styles
        ]
    for path in cache_outputs:
        check_output_path(path, args.overwrite)
    plan = _Plan(contents, styles, caches, outputs, cache_outputs)
    if not single:
        check_batch_outputs(_jobs(plan, args), args.output_dir, "stylize", _batch_params(args), args.overwrite)
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
    skip = ("debug", "save_style_cache", "content", "style", "style_cache", "output_dir")
    return command_params(args, skip=skip)


def _load_inputs(plan: _Plan, args: argparse.Namespace):
    """Every image, mask and cache read (and checked) before the model loads."""
    from editkit.image import load_image
    from editkit.style import StyleCache

    contents = [load_image(path) for path in plan.contents]
    styles = [load_image(path) for path in plan.styles]
    caches = [StyleCache.load(path) for path in plan.caches]
    mask = None
    if args.mask is not None:  # read and checked now, fitted to each content by the task
        from editkit.image import read_mask_image

        mask = read_mask_image(args.mask)
        from editkit.tasks.common import prepare_mask

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each run reports the resize and threshold
            for content, path in zip(contents, plan.contents):
                prepare_mask(mask, content.size, mask.size, f"mask {args.mask} (for {path.name})")
    return contents, styles, caches, mask


def _check_family(args: argparse.Namespace, options: StylizeOptions, caches: list) -> None:
    """Options of the other model kind (``--resample-steps`` on SD3, ``--negative-prompt`` on FLUX.1) and style
    caches made on another family are refused from the model's index, before it loads, with the flag and the
    family named."""
    from editkit.models import model_source_family
    from editkit.tasks.options import OptionError
    from editkit.tasks.stylize import check_family_options

    family = model_source_family(args.model)
    if family is None:  # a Hub repo not cached yet: the task checks once it is loaded
        return
    try:
        check_family_options(family, options)
    except OptionError as error:
        raise InputError(f"{FLAGS.get(error.field, error.field)} {error.problem}") from None
    for cache in caches:
        cache.check_family(family)


def run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    plan = _plan(args)
    contents, styles, caches, mask = _load_inputs(plan, args)
    _check_family(args, options, caches)

    from editkit.tasks import StylizeInputs, stylize

    pipe, extra = load_method_pipeline("stylize", args)
    state = {"caches": None}  # every style's cache once it is inverted, reused for the other contents

    def run_one(ci: int, pending: set[Path], on_saved=None) -> None:
        reuse = state["caches"] is not None and mask is None
        files = {"content": plan.contents[ci], **{f"style {i + 1}": p for i, p in enumerate(plan.styles)}}
        files.update({f"style cache {i + 1}": p for i, p in enumerate(plan.caches)})
        if args.mask is not None:
            files["mask"] = args.mask
        inputs = StylizeInputs(contents[ci], () if reuse else styles, state["caches"] if reuse else caches, mask, files)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            result = stylize.run(pipe, inputs, options, attention_controllers=extra,
                                 offload_features=len(contents) > 1)  # fmt: skip
        for warning in caught:
            logger.warning("%s", warning.message)
        if state["caches"] is None:
            state["caches"] = result.style_caches
            _save_caches(result.style_caches, plan, args)
        _save_outputs(result, ci, plan, args, pending, on_saved)

    if args.output is not None:
        run_one(0, set(plan.outputs.values()))
        return 0
    from editkit.commands.batch import run_batch

    index = {str(content): ci for ci, content in enumerate(plan.contents)}

    def produce(task) -> None:
        pending = {task.path(name) for name in task.pending}
        run_one(index[task.job.key], pending, lambda path: task.written(path.name))

    manifest = run_batch(
        _jobs(plan, args), args.output_dir, "stylize", _batch_params(args), produce, overwrite=args.overwrite
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


def _save_outputs(result, content_index: int, plan: _Plan, args: argparse.Namespace, pending, on_saved) -> None:
    from editkit.image import save_image
    from editkit.tasks import png_metadata

    labels = [str(p) for p in plan.styles] + [f"cache:{p}" for p in plan.caches]
    for si, (image, record) in enumerate(zip(result.images, result.records)):
        path = plan.outputs[(content_index, si)]
        if path not in pending:
            continue  # written by an interrupted run of this batch
        record = {**record, **run_settings(args), "content": str(plan.contents[content_index]), "style": labels[si]}
        save_image(image, path, metadata=png_metadata(record), overwrite=args.overwrite)
        if on_saved is not None:
            on_saved(path)
        echo(path)
