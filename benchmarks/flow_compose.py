"""Compose on MM-DiT (SD3 / SD3.5, FLUX.1): cost against plain generation, and shapes-sd3 accuracy.

Speed (``--family sd3`` or ``flux``): full-width, reduced-depth random-weight transformers
(``editkit.testing_mmdit.full_width_transformer``: SD3.5-medium or FLUX.1-dev widths with
``--blocks`` blocks), tiny text encoders of the right output widths and a tiny VAE. Interleaved
medians of: plain generation (the pipeline with ``max_iter_to_alter=0, refine=False``, which equals
diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` bit for bit: ``tests/test_flow_compose.py``),
stage 1 only (half of the steps guided) and the full two-stage pipeline forced through stage 2 (a
verifier that fails every constraint: the worst case). Targets: stage 1 <= 1.8x, full <= 2.6x.
Op counts: transformer block executions per sample row (forward) and backward passes, counted by
hooks on the blocks.

Accuracy (``--shapes``; ``assets/models/shapes-sd3``, or ``--model``): pair colours+shapes and
relation accuracy on held-out shapes-world prompts with fixed seeds, scored by the deterministic
detector, for plain generation, stage 1, stage 2 alone (always refined) and the verifier's choice
(so the gain from selection is reported apart), as ``benchmarks/compose.py`` does for the UNet.

    python -m benchmarks.flow_compose --family sd3 --size 128 --steps 6 --repeats 2
    python -m benchmarks.flow_compose --shapes --model /work/main/assets/models/shapes-sd3 --shapes-prompts 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.compose import PROMPT, _seeded, _to_uint8
from benchmarks.timing import environment, interleaved_medians, print_json
from editkit.verifiers import AttentionVerifier

SHAPES_MODEL = Path("assets/models/shapes-sd3")


def speed_pipelines(family: str, blocks: int):
    """The compose pipeline of ``family`` on a full-width, ``blocks``-deep random transformer."""
    from editkit.testing_mmdit import (
        FLUX1_DEV_TRANSFORMER,
        SD35_MEDIUM_TRANSFORMER,
        full_width_transformer,
        tiny_flux_components,
        tiny_sd3_components,
    )
    from pipelines.flow_compose import FluxComposePipeline, SD3ComposePipeline

    words = tuple(PROMPT.split())
    if family == "sd3":
        parts = tiny_sd3_components(words=words, clip_width=1024, t5=False)
        parts["transformer"] = full_width_transformer(SD35_MEDIUM_TRANSFORMER, blocks)
        parts["vae"] = _vae(16)
        return SD3ComposePipeline(**parts)
    parts = tiny_flux_components(words=words, t5_width=4096, clip_width=768)
    parts["transformer"] = full_width_transformer(FLUX1_DEV_TRANSFORMER, blocks)
    parts["vae"] = _vae(16)
    return FluxComposePipeline(**parts)


def _vae(channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=channels, norm_num_groups=4, layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
    ).eval()  # fmt: skip


class OpCounter:
    """Transformer block executions (per sample row) and backward passes through the first block."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.forwards = 0
        self.backwards = 0
        blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
        self.handles = [block.register_forward_hook(self._forward) for block in blocks]
        self.handles.append(blocks[0].register_full_backward_hook(self._backward))

    def _forward(self, module, args, output) -> None:
        first = output[0] if isinstance(output, tuple) else output
        self.forwards += int(first.shape[0])

    def _backward(self, module, grad_input, grad_output) -> None:
        self.backwards += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def speed(args) -> dict:
    pipe = speed_pipelines(args.family, args.blocks)
    pipe.set_progress_bar_config(disable=True)
    common = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "output_type": "pt"}
    if args.family == "sd3":
        common["max_sequence_length"] = args.t5_tokens
    half = args.steps // 2
    forced = {"verifier": AttentionVerifier(peak_threshold=2.0)}  # fails every constraint: stage 2 always runs

    def call(**options):
        return lambda: pipe(PROMPT, generator=_seeded(0), **common, **options)

    runs = {
        "plain": call(max_iter_to_alter=0, refine=False),
        "stage1": call(max_iter_to_alter=half, refine=False),
        "full": call(max_iter_to_alter=half, **forced),
    }
    counts = {}
    for name, run in runs.items():
        counter = OpCounter(pipe.transformer)
        run()
        counter.remove()
        counts[name] = {"block_forwards_per_row": counter.forwards, "backwards": counter.backwards}
    timings = interleaved_medians(runs, repeats=args.repeats, warmup=0, device="cpu")
    result = {"family": args.family, "blocks": args.blocks, "map_sites": _default_sites(pipe), "timings": timings}
    result["op_counts"] = counts
    for name in ("stage1", "full"):
        result[f"{name}_wall_ratio"] = timings[name]["median_s"] / timings["plain"]["median_s"]
        result[f"{name}_cpu_ratio"] = timings[name]["cpu_median_s"] / timings["plain"]["cpu_median_s"]
        result[f"{name}_block_forward_ratio"] = (
            counts[name]["block_forwards_per_row"] / counts["plain"]["block_forwards_per_row"]
        )
    result["targets"] = {"stage1": 1.8, "full": 2.6}
    return result


def _default_sites(pipe) -> list[str]:
    from editkit.flow_compose_maps import default_map_sites

    return default_map_sites(pipe.transformer)


def shapes_accuracy(args) -> dict:
    """Pair colours(+shapes) and relation accuracy for plain / stage 1 / always refined / chosen images."""
    from benchmarks.shapes.detect import detect_batch
    from benchmarks.shapes.evaluate import call_kwargs, score_pair, score_relation
    from benchmarks.shapes.world import held_out_prompts
    from editkit.models import load_pipeline
    from pipelines.flow_compose import SD3ComposePipeline

    pipe = load_pipeline(SD3ComposePipeline, args.model)
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": args.shapes_steps, "guidance_scale": 5.0, "output_type": "pt"}
    common.update(call_kwargs(args.model))
    guided = {"loss_preset": args.losses, "scale_factor": args.scale_factor}
    if args.map_sites:
        guided["map_sites"] = list(args.map_sites)
    results: dict = {"model": str(args.model), "num_prompts": args.shapes_prompts, "steps": args.shapes_steps}
    results.update(guided, verifier=args.verifier, map_sites=args.map_sites or _default_sites(pipe))
    for category, scorer in {"pair": score_pair, "relation": score_relation}.items():
        prompts = held_out_prompts(category, args.shapes_prompts, seed=0)
        images: dict[str, list[torch.Tensor]] = {"plain": [], "stage1": [], "refined": [], "chosen": []}
        chosen_refined = 0
        for seed, prompt in enumerate(prompts):
            text = prompt.caption
            plain = pipe(text, generator=_seeded(seed), max_iter_to_alter=0, refine=False, **common)
            out = pipe(text, generator=_seeded(seed), verifier=args.verifier, **guided, **common)
            # the pick is one of two deterministic candidates: regenerate only the other one
            if out.chosen == "refined":
                refined = out.images
                stage1 = pipe(text, latents=out.initial_noise, refine=False, **guided, **common).images
            else:
                stage1 = refined = out.images
                if out.refined_noise is not None:
                    refined = pipe(text, latents=out.refined_noise, refine=False, **guided, **common).images
            for name, batch in (("plain", plain.images), ("stage1", stage1), ("refined", refined)):
                images[name].append(batch)
            images["chosen"].append(out.images)
            chosen_refined += out.chosen == "refined"
        for name, batch in images.items():
            scores = scorer(prompts, detect_batch(_to_uint8(torch.cat(batch))))
            results.update({f"{category}_{name}_{key}": value for key, value in scores.items()})
        results[f"{category}_chosen_refined_fraction"] = chosen_refined / len(prompts)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd3", "flux"), default="sd3", help="speed part: the architecture")
    parser.add_argument("--blocks", type=int, default=2, help="speed part: transformer blocks (FLUX: of each kind)")
    parser.add_argument("--size", type=int, default=128, help="speed part: image side in pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--t5-tokens", type=int, default=0, help="speed part, SD3: zero T5 tokens appended")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shapes", action="store_true", help="measure shapes-sd3 accuracy instead of speed")
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL)
    parser.add_argument("--shapes-prompts", type=int, default=32)
    parser.add_argument("--shapes-steps", type=int, default=25)
    parser.add_argument("--map-sites", nargs="+", default=None, help="shapes part: the map blocks (default: the rule)")
    parser.add_argument("--losses", choices=("attend-excite", "paper"), default="attend-excite")
    parser.add_argument("--verifier", choices=("attention", "shapes"), default="attention")
    parser.add_argument("--scale-factor", type=float, default=20.0, help="shapes part: guided step size (A&E: 20)")
    args = parser.parse_args()
    result: dict = {"benchmark": "flow_compose", "environment": environment()}
    if args.shapes:
        result["shapes"] = shapes_accuracy(args)
    else:
        result.update(size=args.size, steps=args.steps, speed=speed(args))
    print_json(result)


if __name__ == "__main__":
    main()
