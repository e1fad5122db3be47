"""MM-DiT style transfer (issue 23): cost against its floor, cache bytes; shapes-sd3 quality and the block sweep.

Speed (``--only speed``): full-width, reduced-depth random-weight transformers
(``editkit.testing_mmdit.full_width_transformer``: SD3.5-medium with 2 joint blocks, the first with
``attn2``; FLUX.1-dev with 2 double + 2 single blocks) in the real pipeline classes, with a tiny
16-channel VAE and no text encoders (content and style given as latents, the text as embeddings),
so every figure is transformer work. The floor is 3N stock transformer forwards (style inversion +
content inversion + generation) and 2N with a cached style; ``ratio_wall`` = stylize time / (floor
calls x one forward measured in the same run, interleaved), target <= 1.10. ``ops`` = dispatched ATen
operations of the run / (floor calls x the ops of one stock forward), target <= 1.10. Transformer
calls are counted, not assumed. ``cache_bytes``: the style cache (keys + values, fp16) and the
content cache (queries), per image at this size and step count.

Shapes (``--only shapes``): ``assets/models/shapes-sd3`` (or ``--model``), 32 px; contents and styles
as in ``benchmarks/stylize.py`` (held-out scenes, seeds 101 / 202), scored with its metric code
(``benchmarks.shapes.style_metrics``, ``summarize``): colour moved toward the
style, the content's object mask kept (IoU >= 0.7), both in one pair (``success``).
``--sweep`` scores block choices (``--sweep-pairs`` pairs each) to choose the default.

    python -m benchmarks.flow_stylize --only speed --steps 2 --latent 16 --repeats 2
    python -m benchmarks.flow_stylize --only shapes --model /work/main/assets/models/shapes-sd3 --pairs 64
    python -m benchmarks.flow_stylize --only shapes --model /work/main/assets/models/shapes-sd3 --sweep --pairs 0
    python -m benchmarks.flow_stylize --only shapes --model /work/main/assets/models/shapes-sd3 --attention --pairs 0

``--oracle-matching``: the same pairs with object-aware matching from the scenes' own masks
(``benchmarks/style_oracle.py``; a diagnostic upper bound, not an editkit setting).

``--attention`` (16 pairs of other scenes, ``--sweep-pairs``): where the content's image queries look among the
style's image keys at the default site, per timestep (``attention_diagnostic``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.opcount import OpCounter
from benchmarks.timing import environment, interleaved_medians, print_json

SHAPES_MODEL = Path("assets/models/shapes-sd3")
#: Block choices of the sweep on shapes-sd3 (4 joint blocks).
SWEEP = {
    "block 0": ["transformer_blocks.0.attn"],
    "block 1": ["transformer_blocks.1.attn"],
    "block 2": ["transformer_blocks.2.attn"],
    "block 3": ["transformer_blocks.3.attn"],
    "blocks 0-1 (first half)": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
    "blocks 2-3 (second half)": ["transformer_blocks.2.attn", "transformer_blocks.3.attn"],
    "blocks 1-3": ["transformer_blocks.1.attn", "transformer_blocks.2.attn", "transformer_blocks.3.attn"],
    "all 4 blocks": ["transformer_blocks"],
}


def speed_pipeline(name: str):
    """The family's style transfer pipeline around a full-width reduced-depth transformer, a tiny VAE."""
    from diffusers import AutoencoderKL

    from editkit.testing_mmdit import (
        FLUX1_DEV_TRANSFORMER,
        SD35_MEDIUM_TRANSFORMER,
        flow_match_scheduler,
        full_width_transformer,
    )
    from pipelines.flow_style_transfer import FluxStyleTransferPipeline, SD3StyleTransferPipeline

    flux = name == "flux"
    transformer = full_width_transformer(FLUX1_DEV_TRANSFORMER if flux else SD35_MEDIUM_TRANSFORMER, 2)
    vae = AutoencoderKL(block_out_channels=[8] * 4, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=4,
                        layers_per_block=1).eval()  # fmt: skip
    parts = {"transformer": transformer, "scheduler": flow_match_scheduler(flux), "vae": vae, "text_encoder": None,
             "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}  # fmt: skip
    pipe = FluxStyleTransferPipeline(**parts) if flux else SD3StyleTransferPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def speed(name: str, args) -> dict:
    """Time and ops of an uncached and a cached-style run against their floors (see the module docstring)."""
    from editkit.backbones import FlowConditioning, backbone_for

    pipe = speed_pipeline(name)
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    content, style = (torch.randn(1, 16, args.latent, args.latent, generator=generator) for _ in range(2))
    embeds = torch.randn(1, args.text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    run = {"num_inference_steps": args.steps, "output_type": "latent", "prompt_embeds": embeds,
           "pooled_prompt_embeds": pooled}  # fmt: skip
    first = pipe(content, [style], **run)
    cache = first.style_caches[0]
    backbone = backbone_for(pipe)
    text_ids = torch.zeros(args.text_tokens, 3) if name == "flux" else None
    conditioning = FlowConditioning(embeds, pooled, text_ids)
    sample = torch.randn_like(content)

    def forward():
        with torch.no_grad():
            backbone.denoise(sample, torch.tensor(500.0), conditioning)

    configs = {"forward": forward, "uncached": lambda: pipe(content, [style], **run),
               "cached_style": lambda: pipe(content, style_cache=[cache], **run)}  # fmt: skip
    floors = {"uncached": 3 * args.steps, "cached_style": 2 * args.steps}
    calls = {key: _calls(pipe, configs[key]) for key in floors}
    ops = {key: _ops(configs[key]) for key in ("forward", *floors)}
    times = interleaved_medians(configs, repeats=args.repeats, warmup=1, device="cpu")
    unit = times["forward"]
    result = {"forward": unit, "forward_ops": ops["forward"], "sites": list(cache.sites),
              "cache_bytes": {"style": cache.nbytes(), "content": first.content_cache.nbytes()}}  # fmt: skip
    for key, floor in floors.items():
        result[key] = {
            **times[key], "transformer_calls": calls[key], "floor_calls": floor,
            "ratio_wall": times[key]["median_s"] / (floor * unit["median_s"]),
            "ratio_cpu": times[key]["cpu_median_s"] / (floor * unit["cpu_median_s"]),
            "ops": ops[key], "ops_ratio": ops[key] / (floor * ops["forward"]),
        }  # fmt: skip
    return result


def _calls(pipe, run) -> int:
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def _ops(run) -> int:
    with torch.no_grad(), OpCounter() as counter:
        run()
    return counter.count


def _shapes_setup(model: Path, pairs: int, seed_offset: int):
    """The shapes-sd3 style pipeline and the ``pairs`` held-out contents / styles (images, scenes) of the benchmark
    (seeds ``101 / 202 + seed_offset``, as ``benchmarks/stylize.py``)."""
    from benchmarks.shapes.style_metrics import stylize_pairs
    from editkit.models import load_pipeline
    from pipelines.flow_style_transfer import SD3StyleTransferPipeline

    pipe = load_pipeline(SD3StyleTransferPipeline, model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, *stylize_pairs(pairs, seed_offset)


def shapes(model: Path, pairs: int, steps: int, settings: dict, seed_offset: int = 0, oracle: bool = False) -> dict:
    """Colour moved toward the style and the content's mask kept, on ``pairs`` shapes-world pairs
    (``oracle``: object-aware matching from the scenes' masks, ``benchmarks.style_oracle``)."""
    import contextlib

    from PIL import Image

    from benchmarks.shapes.style_metrics import scene_mask, score_pair, succeeded, summarize
    from benchmarks.style_oracle import oracle_matching

    pipe, (contents, content_scenes), (styles, style_scenes) = _shapes_setup(model, pairs, seed_offset)
    scores = []
    for content, style, content_scene, style_scene in zip(contents, styles, content_scenes, style_scenes):
        matching = oracle_matching(scene_mask(content_scene), scene_mask(style_scene)) if oracle else None
        with matching or contextlib.nullcontext():
            out = pipe(Image.fromarray(content), [Image.fromarray(style)], num_inference_steps=steps,
                       output_type="pt", max_sequence_length=0, **settings)  # fmt: skip
        result = (out.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        scores.append(score_pair(content, style, result, content_scene, style_scene))
    success = [succeeded(s) for s in scores]  # summarize has it, and the same with the detector's box IoU
    summary = summarize(scores)
    by_background = {}  # where the pairs fail: (pairs, success) per style background
    for ok, style_scene in zip(success, style_scenes, strict=True):
        count, hits = by_background.get(style_scene.background, (0, 0))
        by_background[style_scene.background] = (count + 1, hits + int(ok))
    return {"pairs": pairs, "steps": steps, "settings": settings or "pipeline defaults", "oracle_matching": oracle,
            **summary,
            "success_by_style_background": {k: {"pairs": n, "success": h / n} for k, (n, h) in
                                            sorted(by_background.items())}}  # fmt: skip


def _token_grid(scene, side: int) -> torch.Tensor:
    """The image tokens (``side`` x ``side`` grid, flattened) that the scene's objects cover by more than 30%."""
    from benchmarks.shapes.style_metrics import scene_mask

    mask = torch.from_numpy(scene_mask(scene)).float()[None, None]
    return torch.nn.functional.adaptive_avg_pool2d(mask, side).flatten() > 0.3


def attention_diagnostic(model: Path, pairs: int, steps: int, seed_offset: int = 1000) -> dict:
    """Where the content's image queries look in the style's keys at the default site (softmax over the style's
    image keys, plain scale, head mean), per inverted timestep: the mass on the same grid position (uniform:
    1 / tokens) and the mass of content-object queries on style-object keys beside the style-object token share."""
    from PIL import Image

    pipe, (contents, content_scenes), (styles, style_scenes) = _shapes_setup(model, pairs, seed_offset)
    rows: dict[int, list[tuple[float, float, float]]] = {}
    for content, style, content_scene, style_scene in zip(contents, styles, content_scenes, style_scenes):
        out = pipe(Image.fromarray(content), [Image.fromarray(style)], num_inference_steps=steps,
                   output_type="latent", max_sequence_length=0)  # fmt: skip
        content_cache, style_cache = out.content_cache, out.style_caches[0]
        for (site, key), features in content_cache.features.items():
            query, keys = features["query"].float()[0], style_cache.features[(site, key)]["key"].float()[0]
            side = math.isqrt(query.shape[1])
            on_content, on_style = _token_grid(content_scene, side), _token_grid(style_scene, side)
            probs = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1]), -1).mean(0)
            object_mass = probs[on_content][:, on_style].sum(-1).mean().item() if on_content.any() else float("nan")
            share = on_style.float().mean().item()
            rows.setdefault(key, []).append((probs.diagonal().mean().item(), object_mass, share))
    table = {str(key): {"same_position_mass": float(np.mean([r[0] for r in values])),
                        "object_to_object_mass": float(np.nanmean([r[1] for r in values])),
                        "style_object_token_share": float(np.mean([r[2] for r in values]))}
             for key, values in sorted(rows.items(), reverse=True)}  # fmt: skip
    return {"pairs": pairs, "steps": steps, "uniform_mass": 1 / query.shape[1], "by_timestep_key": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("speed", "shapes"), default=None)
    parser.add_argument("--models", nargs="+", default=["sd35", "flux"], choices=("sd35", "flux"))
    parser.add_argument("--steps", type=int, default=2, help="steps N of the speed part")
    parser.add_argument("--latent", type=int, default=16, help="latent side of the speed part (16: 128 px)")
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", type=Path, default=SHAPES_MODEL, help="the shapes-sd3 folder")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--shapes-steps", type=int, default=28)
    parser.add_argument("--gamma", type=float, default=None)
    parser.add_argument("--tau", type=float, default=None)
    parser.add_argument("--adain-strength", type=float, default=None)
    parser.add_argument("--sites", nargs="+", default=None)
    parser.add_argument("--window", type=float, nargs=2, default=None, help="injection_sigmas LOW HIGH (0 0: none)")
    parser.add_argument("--no-adain", action="store_true", help="adain_strength None (no AdaIN)")
    parser.add_argument("--sweep", action="store_true", help="score the block choices of SWEEP")
    parser.add_argument("--attention", action="store_true", help="where content queries look in the style's keys")
    parser.add_argument(
        "--oracle-matching", action="store_true", help="object-aware matching from the scenes' masks (a diagnostic)"
    )
    parser.add_argument("--sweep-pairs", type=int, default=16)
    parser.add_argument("--seed-offset", type=int, default=0, help="other scenes (the sweep uses 1000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"environment": environment()}
    if args.only in (None, "speed"):
        setup = {"latent": args.latent, "steps": args.steps, "text_tokens": args.text_tokens, "dtype": "float32"}
        result["speed"] = {"setup": setup} | {name: speed(name, args) for name in args.models}
    if args.only in (None, "shapes"):
        window = tuple(args.window) if args.window else None
        settings = {"gamma": args.gamma, "tau": args.tau, "adain_strength": args.adain_strength,
                    "injection_sites": args.sites, "injection_sigmas": window}  # fmt: skip
        settings = {key: value for key, value in settings.items() if value is not None}
        if args.no_adain:
            settings["adain_strength"] = None
        if args.pairs:
            result["shapes"] = shapes(
                args.model, args.pairs, args.shapes_steps, settings, args.seed_offset, oracle=args.oracle_matching
            )
        if args.sweep:
            result["sweep"] = {}
            for label, sites in SWEEP.items():  # other seeds than the evaluation's: the choice is not fitted to it
                scored = shapes(args.model, args.sweep_pairs, args.shapes_steps, {**settings, "injection_sites": sites},
                                seed_offset=1000)  # fmt: skip
                result["sweep"][label] = scored
                print(label, json.dumps(scored), file=sys.stderr, flush=True)
        if args.attention:
            result["attention"] = attention_diagnostic(args.model, args.sweep_pairs, args.shapes_steps)
    print_json(result)


if __name__ == "__main__":
    main()
