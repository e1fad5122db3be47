"""Compose on MM-DiT (SD3 / SD3.5, FLUX.1): cost against plain generation, and shapes-sd3 accuracy.

Speed (``--family sd3`` or ``flux``): full-width, reduced-depth random-weight transformers
(``editkit.testing_mmdit.full_width_transformer``: SD3.5-medium or FLUX.1-dev widths with
``--blocks`` blocks), tiny text encoders of the right output widths and a tiny VAE. Interleaved
medians of: plain generation (the pipeline with ``max_iter_to_alter=0, refine=False``, which equals
diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` bit for bit: ``tests/test_flow_compose.py``),
stage 1 only (half of the steps guided) and the full two-stage pipeline forced through stage 2 (a
verifier that fails every constraint: the worst case). Targets: stage 1 <= 1.8x, full <= 2.6x.
Op counts: transformer blocks entered per sample row, and those entered with grad (each guided or
refinement pass is backpropagated once to z_t, through exactly those blocks), counted by hooks. Memory:
the activation bytes autograd saves for one guided pass's backward (``guided_pass_saved_activation_bytes``).
The transformer's weights require grad, as ``from_pretrained`` leaves them: the pipeline keeps them out of
autograd itself (the figure is also given with them left in, for comparison).

Accuracy (``--shapes``; ``assets/models/shapes-sd3``, or ``--model``): pair colours+shapes and
relation accuracy on held-out shapes-world prompts with fixed seeds, scored by the deterministic
detector, for plain generation, stage 1, stage 2 alone (always refined) and the verifier's choice
(so the gain from selection is reported apart), as ``benchmarks/compose.py`` does for the UNet.
``--noise-refinement-rounds R``: stage 2 in R rounds (the pipeline's option; "always refined" is then the
best round). ``--random-direction-control``: an ablation of stage 2, each refinement replaced by a step of the
same length in a random direction (seeded), which keeps the re-draw and the verifier's selection but not
the constraint loss's direction, so the refinement's own share of the gain can be told apart.

    python -m benchmarks.flow_compose --family sd3 --blocks 4 --size 128 --steps 6 --repeats 2 --first-block
    python -m benchmarks.flow_compose --family flux --blocks 2 --size 128 --steps 6 --repeats 2
    python -m benchmarks.flow_compose --shapes --model /work/main/assets/models/shapes-sd3 --shapes-prompts 32
    python -m benchmarks.flow_compose --shapes --shapes-prompts 96 --verifier shapes --noise-refiner initno \
        --noise-refinement-rounds 3 [--random-direction-control]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from benchmarks.compose import PROMPT, _seeded, add_stage2_arguments, score_categories
from benchmarks.timing import environment, interleaved_medians, print_json, saved_activation_bytes
from editkit.compose_choices import LOSS_PRESETS
from editkit.verifiers import AttentionVerifier

SHAPES_MODEL = Path("assets/models/shapes-sd3")


def speed_pipelines(family: str, blocks: int, t5_tokens: int):
    """The compose pipeline of ``family`` on a full-width, ``blocks``-deep random transformer, with tiny text
    encoders of the widths it takes (SD3: CLIP projections 2 x 1024, no T5; FLUX: CLIP 768, T5 4096)."""
    from editkit.testing import _text_encoder, tiny_tokenizer
    from editkit.testing_mmdit import (
        FLUX1_DEV_TRANSFORMER,
        SD35_MEDIUM_TRANSFORMER,
        flow_match_scheduler,
        full_width_transformer,
        tiny_t5,
        tiny_t5_tokenizer,
    )
    from pipelines.flow_compose import FluxComposePipeline, SD3ComposePipeline

    words = tuple(PROMPT.split())
    torch.manual_seed(0)
    if family == "sd3":
        clip = {"with_projection": True, "projection_dim": 1024}
        return SD3ComposePipeline(
            transformer=full_width_transformer(SD35_MEDIUM_TRANSFORMER, blocks), scheduler=flow_match_scheduler(),
            vae=_vae(16), text_encoder=_text_encoder(32, 1000, **clip), tokenizer=tiny_tokenizer(words),
            text_encoder_2=_text_encoder(32, 1000, **clip), tokenizer_2=tiny_tokenizer(words),
        )  # fmt: skip
    return FluxComposePipeline(
        scheduler=flow_match_scheduler(flux=True), vae=_vae(16), text_encoder=_text_encoder(768, 1000),
        tokenizer=tiny_tokenizer(words), text_encoder_2=tiny_t5(4096).requires_grad_(False),
        tokenizer_2=tiny_t5_tokenizer(words, model_max_length=max(t5_tokens, 1)),
        transformer=full_width_transformer(FLUX1_DEV_TRANSFORMER, blocks),
    )  # fmt: skip


def _vae(channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=channels, norm_num_groups=4, layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
    ).eval()  # fmt: skip


class OpCounter:
    """Transformer blocks entered, per sample row (a guided pass stops inside its last map block), and
    those entered with grad (a guided or refinement pass: each is backpropagated once, to z_t)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.forwards = 0
        self.grad_forwards = 0
        blocks = [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]
        self.handles = [block.register_forward_pre_hook(self._forward, with_kwargs=True) for block in blocks]

    def _forward(self, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.forwards += int(hidden.shape[0])
        self.grad_forwards += int(hidden.shape[0]) if hidden.requires_grad else 0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def speed(args) -> dict:
    pipe = speed_pipelines(args.family, args.blocks, args.t5_tokens)
    pipe.set_progress_bar_config(disable=True)
    # requires_grad as from_pretrained leaves it: the pipeline must keep the weights out of autograd itself
    pipe.transformer.requires_grad_(True)
    common = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "output_type": "pt"}
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
    if args.first_block:  # the cheapest maps: the first joint / double-stream block alone
        first = {"map_sites": ["transformer_blocks.0"]}
        runs["stage1_first_block"] = call(max_iter_to_alter=half, refine=False, **first)
        runs["full_first_block"] = call(max_iter_to_alter=half, **forced, **first)
    counts = {}
    for name, run in runs.items():
        counter = OpCounter(pipe.transformer)
        run()
        counter.remove()
        counts[name] = {"block_forwards_per_row": counter.forwards, "with_grad": counter.grad_forwards}
    timings = interleaved_medians(runs, repeats=args.repeats, warmup=0, device="cpu")
    result = {"family": args.family, "blocks": args.blocks, "map_sites": _default_sites(pipe), "timings": timings}
    result["op_counts"] = counts
    result["guided_pass_saved_activation_bytes"] = guided_pass_memory(pipe, call)
    for name in [name for name in runs if name != "plain"]:
        result[f"{name}_wall_ratio"] = timings[name]["median_s"] / timings["plain"]["median_s"]
        result[f"{name}_cpu_ratio"] = timings[name]["cpu_median_s"] / timings["plain"]["cpu_median_s"]
        result[f"{name}_block_forward_ratio"] = (
            counts[name]["block_forwards_per_row"] / counts["plain"]["block_forwards_per_row"]
        )
    result["targets"] = {"stage1": 1.8, "full": 2.6}
    return result


def guided_pass_memory(pipe, call) -> dict:
    """Activation bytes autograd keeps for one guided pass's backward (weights excluded): the pipeline's (weights
    out of autograd) and, for comparison, with the transformer's weights left in autograd as loaded."""
    import pipelines.flow_compose as pipeline_module

    one_pass = call(max_iter_to_alter=1, refine=False)
    frozen = saved_activation_bytes(one_pass, pipe.transformer)
    original = pipeline_module.frozen_weights
    pipeline_module.frozen_weights = lambda module: contextlib.nullcontext(module)
    try:
        in_autograd = saved_activation_bytes(one_pass, pipe.transformer)
    finally:
        pipeline_module.frozen_weights = original
    return {"weights_frozen": frozen, "weights_in_autograd": in_autograd}


def _default_sites(pipe) -> list[str]:
    from editkit.flow_compose_maps import default_map_sites

    return default_map_sites(pipe.transformer)


def shapes_accuracy(args) -> dict:
    """Pair colours(+shapes) and relation accuracy for plain / stage 1 / always refined / chosen images."""
    from benchmarks.shapes.evaluate import call_kwargs
    from editkit.models import load_pipeline
    from pipelines.flow_compose import SD3ComposePipeline

    pipe = load_pipeline(SD3ComposePipeline, args.model)
    pipe.set_progress_bar_config(disable=True)
    common = {"num_inference_steps": args.shapes_steps, "guidance_scale": 5.0, "output_type": "pt"}
    common.update(call_kwargs(args.model))
    guided = {"loss_preset": args.losses, "scale_factor": args.scale_factor, "noise_refiner": args.noise_refiner,
              "noise_refinement_rounds": args.noise_refinement_rounds}  # fmt: skip
    if args.map_sites:
        guided["map_sites"] = list(args.map_sites)
    results: dict = {"model": str(args.model), "num_prompts": args.shapes_prompts, "steps": args.shapes_steps,
                     "prompt_and_noise_seed": args.shapes_seed}  # fmt: skip
    results.update(guided, verifier=args.verifier, map_sites=args.map_sites or _default_sites(pipe),
                   random_direction_control=args.random_direction_control)  # fmt: skip
    import editkit.flow_compose as method

    results.update(score_categories(pipe, args, guided, common, method))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("sd3", "flux"), default="sd3", help="speed part: the architecture")
    parser.add_argument("--blocks", type=int, default=2, help="speed part: transformer blocks (FLUX: of each kind)")
    parser.add_argument("--size", type=int, default=128, help="speed part: image side in pixels")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--t5-tokens", type=int, default=None, help="speed part: T5 tokens (SD3: zeros; default 0 SD3, 32 FLUX)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--first-block", action="store_true", help="speed part: also time maps of block 0 alone")
    parser.add_argument("--shapes", action="store_true", help="measure shapes-sd3 accuracy instead of speed")
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL)
    parser.add_argument("--shapes-prompts", type=int, default=32)
    parser.add_argument("--shapes-steps", type=int, default=25)
    parser.add_argument("--map-sites", nargs="+", default=None, help="shapes part: the map blocks (default: the rule)")
    parser.add_argument("--losses", choices=LOSS_PRESETS, default="attend-excite")
    parser.add_argument("--verifier", choices=("attention", "shapes"), default="attention")
    parser.add_argument("--scale-factor", type=float, default=20.0, help="shapes part: guided step size (A&E: 20)")
    add_stage2_arguments(parser)
    args = parser.parse_args()
    result: dict = {"benchmark": "flow_compose", "environment": environment()}
    if args.t5_tokens is None:
        args.t5_tokens = 0 if args.family == "sd3" else 32
    if args.shapes:
        result["shapes"] = shapes_accuracy(args)
    else:
        result.update(size=args.size, steps=args.steps, speed=speed(args))
    print_json(result)


if __name__ == "__main__":
    main()
