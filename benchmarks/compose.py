"""ComposePipeline cost against plain generation, and (when the shapes model exists) its accuracy.

Speed: the full-size SD 1.5 UNet architecture with random weights (it costs what the real model
costs), a small CLIP text encoder of the right width and a tiny VAE (decoded once per image in
every configuration). Interleaved medians of: diffusers' plain ``StableDiffusionPipeline``,
stage 1 only (guided latent updates for half of the steps), and the full two-stage pipeline
forced through stage 2 (a verifier that fails every constraint: the worst case). Targets:
stage 1 <= 1.8x plain, full <= 2.6x plain (the paper's code is about 4x). ``floor_stage1``
(stock processors: plain generation plus, per guided step, a batch-1 forward with grad up to the
guidance grid's last cross-attention layer and a backward to z_t) gives stage 1's efficiency.
``stage1_down_only``/``full_down_only``: the same with ``attention_blocks=("down",)`` (maps from
the down path only, an opt-in deviation from the paper whose guided passes stop earlier).

Accuracy (only when ``assets/models/shapes-sd/model_index.json`` exists): two-object colour
binding and relation accuracy on held-out shapes-world prompts with fixed seeds, measured by the
deterministic detector, for plain generation, stage 1, stage 2 alone (always refined) and the
verifier's choice, so the gain from selection is reported apart from the gain from refinement (``--noise-refiner``,
``--noise-refinement-rounds``, ``--random-direction-control``: as in ``benchmarks/flow_compose.py``).
``--attention-blocks down`` measures the down-only maps there, ``--losses paper`` the paper's loss
preset and ``--verifier shapes`` the detector as verifier (then "chosen" is selected by the very
detector that scores it: an upper bound, as the paper's BLIP-VQA verifier on T2I-CompBench).

    python -m benchmarks.compose --size 128 --steps 8 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import environment, interleaved_medians, peak_memory, print_json
from editkit.compose_choices import LOSS_PRESETS, NOISE_REFINERS
from editkit.verifiers import AttentionVerifier
from pipelines.compose import ComposePipeline

PROMPT = "a red car on the left of a blue bird"
SHAPES_MODEL = Path("assets/models/shapes-sd")


def build_components(device: str, dtype: torch.dtype) -> dict:
    """Full-size SD 1.5 UNet (random), a one-layer 768-wide text encoder, a tiny VAE."""
    from editkit.testing import full_size_sd15_components

    return full_size_sd15_components(dtype, device, words=PROMPT.split())


def speed(args) -> dict:
    from diffusers import StableDiffusionPipeline

    dtype = getattr(torch, args.dtype)
    parts = build_components(args.device, dtype)
    plain = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    compose = ComposePipeline(**parts)
    for pipe in (plain, compose):
        pipe.set_progress_bar_config(disable=True)
    common = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "output_type": "pt"}
    half = args.steps // 2

    # full: a verifier that fails every constraint forces stage 2 (the worst case)
    forced = {"verifier": AttentionVerifier(peak_threshold=2.0)}
    down = {"attention_blocks": ("down",)}  # the opt-in deviation: maps from the down path only

    def guided(**options):
        return lambda: compose(PROMPT, generator=_seeded(0), max_iter_to_alter=half, **options, **common)

    runs = {
        "plain": lambda: plain(PROMPT, generator=_seeded(0), **common),
        "stage1": guided(refine=False),
        "full": guided(**forced),
        "stage1_down_only": guided(refine=False, **down),
        "full_down_only": guided(**forced, **down),
    }
    runs["floor_stage1"] = stage1_floor(plain, args.size // 8, args.steps, half, common)
    timings = interleaved_medians(runs, repeats=args.repeats, warmup=args.warmup, device=args.device)
    result = {"timings": timings}
    for name in ("stage1", "full", "stage1_down_only", "full_down_only"):
        result[f"{name}_wall_ratio"] = timings[name]["median_s"] / timings["plain"]["median_s"]
        result[f"{name}_cpu_ratio"] = timings[name]["cpu_median_s"] / timings["plain"]["cpu_median_s"]
    for clock in ("median_s", "cpu_median_s"):
        key = "stage1_efficiency" + ("_cpu" if clock.startswith("cpu") else "")
        result[key] = timings["floor_stage1"][clock] / timings["stage1"][clock]
    # Stage 2 reruns stage 1 from the refined noise (the paper), so the full pipeline costs about
    # twice stage 1; this ratio shows what the rest (refinement passes, verification) adds.
    result["full_vs_twice_stage1"] = timings["full"]["median_s"] / (2 * timings["stage1"]["median_s"])
    result["targets"] = {"stage1": 1.8, "full": 2.6}
    if args.device.startswith("cuda"):
        result["peak_gb"] = {name: peak_memory(runs[name], args.device) / 1e9 for name in ("plain", "stage1", "full")}
    return result


class _MapsDone(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raised by the floor's hook after the last map layer: the rest of the UNet is not needed."""


def stage1_floor(plain, latent: int, steps: int, guided: int, common: dict):
    """The bare UNet work of stage 1 with stock processors: plain generation (``steps`` CFG steps,
    VAE decode once) plus, per guided step, a batch-1 forward with grad that stops after the last
    cross-attention layer of the guidance grid and a backward from those layers' outputs to z_t."""
    from editkit.attention import attention_sites
    from editkit.refine import map_divisor, map_grid

    unet = plain.unet
    grid = map_grid((latent, latent), map_divisor(unet.config))
    modules = [unet.get_submodule(s.name) for s in attention_sites(unet) if s.is_cross]
    sample = torch.randn(1, 4, latent, latent, generator=_seeded(1)).to(unet.device, unet.dtype)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=_seeded(2)).to(unet.device, unet.dtype)

    def forward_collecting(z, stop_after=None) -> list:
        """Outputs of the cross-attention layers at the grid, in execution order (with their modules)."""
        outputs: list = []

        def hook(module, args, output):
            if output.shape[1] == grid[0] * grid[1]:
                outputs.append((module, output))
                if module is stop_after:
                    raise _MapsDone

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            unet(z, 500, encoder_hidden_states=context)
        except _MapsDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    with torch.no_grad():
        last = forward_collecting(sample)[-1][0]

    def run():
        plain(PROMPT, generator=_seeded(0), **common)
        for _ in range(guided):
            with torch.enable_grad():
                z = sample.clone().requires_grad_(True)
                outputs = forward_collecting(z, stop_after=last)
                torch.autograd.grad(sum(o.float().square().mean() for _, o in outputs), z)

    return run


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def stage_images(pipe, prompt: str, out, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's and stage 2's images of a compose output ``out`` (stage 2's: stage 1's where nothing was refined).

    The verifier's pick is one of the two candidates (generation is deterministic from z_T), so only the other
    one is regenerated, from its noise, with ``kwargs`` (the call's options) and no refinement.
    """
    if out.chosen == "refined":
        return pipe(prompt, latents=out.initial_noise, refine=False, **kwargs).images, out.images
    if out.refined_noise is None:
        return out.images, out.images
    return out.images, pipe(prompt, latents=out.refined_noise, refine=False, **kwargs).images


def score_category(pipe, category: str, prompts, first_seed: int, scorer, verifier, guided: dict, common: dict) -> dict:
    """Plain / stage 1 / refined / chosen figures of one prompt category (seeds from ``first_seed``), by ``scorer``."""
    from benchmarks.shapes.detect import detect_batch

    images: dict[str, list[torch.Tensor]] = {"plain": [], "stage1": [], "refined": [], "chosen": []}
    chosen_refined = 0
    for seed, prompt in enumerate(prompts, start=first_seed):
        plain = pipe(prompt.caption, generator=_seeded(seed), max_iter_to_alter=0, refine=False, **common).images
        out = pipe(prompt.caption, generator=_seeded(seed), verifier=verifier, **guided, **common)
        stage1, refined = stage_images(pipe, prompt.caption, out, **guided, **common)
        for name, batch in (("plain", plain), ("stage1", stage1), ("refined", refined), ("chosen", out.images)):
            images[name].append(batch)
        chosen_refined += out.chosen == "refined"
    results = {}
    for name, batch in images.items():
        scores = scorer(prompts, detect_batch(_to_uint8(torch.cat(batch))))
        results.update({f"{category}_{name}_{key}": value for key, value in scores.items()})
    results[f"{category}_chosen_refined_fraction"] = chosen_refined / len(prompts)
    return results


@contextlib.contextmanager
def random_direction_refiners(module, seed: int = 0):
    """``module``'s stage-2 refiners (both) replaced by a step of their own length in a seeded random direction.

    The ablation keeps stage 2's re-draw and the verifier's selection but not the constraint loss's direction, so
    the refinement's own share of the gain can be told apart (``module``: the method module that calls them).
    """
    generator = torch.Generator().manual_seed(seed)
    originals = {name: getattr(module, name) for name in ("initno_refine", "single_step_refine")}

    def randomised(refiner):
        def refine(noise, faulty, loss_fn, **kwargs):
            length = (refiner(noise, faulty, loss_fn, **kwargs).float() - noise.float()).norm()
            direction = torch.randn(noise.shape, generator=generator).to(noise.device)
            return (noise.float() + direction * length / direction.norm()).to(noise.dtype)

        return refine

    for name, refiner in originals.items():
        setattr(module, name, randomised(refiner))
    try:
        yield
    finally:
        for name, refiner in originals.items():
            setattr(module, name, refiner)


def score_categories(pipe, args, guided: dict, common: dict, method) -> dict:
    """Pair and relation figures on the draw of ``args`` (``--random-direction-control``: with ``method``'s refiners
    randomised, ``method`` being the module that calls them)."""
    from benchmarks.shapes.evaluate import score_pair, score_relation
    from benchmarks.shapes.world import held_out_prompts

    results: dict = {}
    control = random_direction_refiners(method) if args.random_direction_control else contextlib.nullcontext()
    with control:
        for category, scorer in {"pair": score_pair, "relation": score_relation}.items():
            prompts = held_out_prompts(category, args.shapes_prompts, seed=args.shapes_seed)
            results.update(
                score_category(pipe, category, prompts, args.shapes_seed, scorer, args.verifier, guided, common)
            )
    return results


def shapes_accuracy(args) -> dict:
    """Pair colour binding and relation accuracy for plain / stage 1 / always refined / chosen images."""

    pipe = ComposePipeline.from_pretrained(SHAPES_MODEL).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": args.shapes_steps, "guidance_scale": 5.0, "output_type": "pt"}
    guided = {"attention_blocks": tuple(args.attention_blocks), "loss_preset": args.losses,
              "scale_factor": args.scale_factor, "noise_refiner": args.noise_refiner,
              "noise_refinement_rounds": args.noise_refinement_rounds}  # fmt: skip
    results: dict = {"num_prompts": args.shapes_prompts, "steps": args.shapes_steps, "verifier": args.verifier,
                     "prompt_and_noise_seed": args.shapes_seed}  # fmt: skip
    results["random_direction_control"] = args.random_direction_control
    results.update(guided)
    import pipelines.compose as method

    results.update(score_categories(pipe, args, guided, common, method))
    return results


def add_stage2_arguments(parser: argparse.ArgumentParser) -> None:
    """The shapes part's prompt draw and stage-2 options (shared with ``benchmarks/flow_compose.py``)."""
    parser.add_argument(
        "--shapes-seed", type=int, default=0, help="shapes part: prompt draw, and first generation seed (default 0)"
    )
    parser.add_argument("--noise-refiner", choices=NOISE_REFINERS, default="single-step", help="shapes part: stage 2")
    parser.add_argument("--noise-refinement-rounds", type=int, default=1, help="shapes part: stage 2's rounds")
    parser.add_argument(
        "--random-direction-control", action="store_true", help="shapes part: ablation, random refinement directions"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--shapes-prompts", type=int, default=50)
    parser.add_argument("--shapes-steps", type=int, default=25)
    parser.add_argument(
        "--attention-blocks", nargs="+", default=["down", "up"], help="shapes part: the guidance maps' blocks"
    )
    parser.add_argument("--losses", choices=LOSS_PRESETS, default="attend-excite", help="shapes part")
    parser.add_argument("--verifier", choices=("attention", "shapes"), default="attention", help="shapes part")
    parser.add_argument("--scale-factor", type=float, default=20.0, help="shapes part: guided step size (A&E: 20)")
    add_stage2_arguments(parser)
    parser.add_argument("--shapes-only", "--skip-speed", action="store_true", help="skip the full-size speed part")
    parser.add_argument("--skip-shapes", action="store_true", help="skip the shapes-world part")
    args = parser.parse_args()

    result: dict = {"benchmark": "compose", "environment": environment(), "size": args.size, "steps": args.steps}
    if not args.shapes_only:
        result["speed"] = speed(args)
    if args.skip_shapes or args.shapes_prompts <= 0:
        result["shapes"] = "skipped: --skip-shapes or --shapes-prompts 0"
    elif (SHAPES_MODEL / "model_index.json").is_file():
        result["shapes"] = shapes_accuracy(args)
    else:
        result["shapes"] = f"skipped: {SHAPES_MODEL}/model_index.json not found (train it: benchmarks/shapes/train.py)"
    print_json(result)


if __name__ == "__main__":
    main()
