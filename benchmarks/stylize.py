"""Style transfer cost against its floor, cache size against StyleID, peak memory; shapes-world quality.

Full-size SD 1.5 UNet architecture (random weights: the real model's cost) with tiny stand-ins for the
VAE and text encoder, so the figures are about the UNet work the method adds. Prints one JSON document:

- ``efficiency``: total time / (UNet evaluations the configuration needs x one UNet forward at that
  shape, measured in the same run, interleaved), uncached (3N passes with r = 0) and with a cached
  style (2N); target <= 1.10. The evaluations are counted, not assumed.
- ``cache``: bytes of the recorded features (content queries + style keys/values, fp16) against what
  StyleID stores for the same layers and steps (q, k, v of both images, fp32); target <= 0.25. Also
  the analytic figure at 512 px / 50 steps.
- ``memory``: peak memory of a stylization against plain generation at the same size (CUDA: allocator
  peak; CPU: process peak RSS, measured plain first, so the stylize figure is the increase over it).
- ``shapes``: on the project's shapes model (``assets/models/shapes-sd``, when present): layout kept
  (detector), the content's shape mask kept (IoU), the palette nearer the style's than the content's,
  the background and (for striped/dotted styles) the pattern transferred.

    python -m benchmarks.stylize --size 128 --steps 4 --repeats 3
    python -m benchmarks.stylize --shapes-only --shapes-pairs 64 --shapes-gamma 0 --shapes-adain-strength 1
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path

import numpy as np
import torch

from benchmarks.timing import environment, interleaved_medians, peak_memory, print_json
from editkit.style import default_style_sites
from editkit.testing import full_size_sd15_components
from pipelines.style_transfer import StyleTransferPipeline

SHAPES_MODEL = Path("assets/models/shapes-sd")


def build_pipeline(dtype: torch.dtype, device: str) -> StyleTransferPipeline:
    """Full-size SD 1.5 UNet; a tiny VAE and a one-layer 768-wide text encoder."""
    pipe = StyleTransferPipeline(**full_size_sd15_components(dtype, device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(seed: int, size: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class UNetCounter:
    """Counts UNet forwards while installed."""

    def __init__(self, unet):
        self.count = 0
        self.handle = unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self) -> int:
        self.handle.remove()
        return self.count


def efficiency(pipe, args) -> dict:
    content, style = random_image(0, args.size), random_image(1, args.size)
    run = dict(num_inference_steps=args.steps, output_type="pt")
    cache = pipe(content, style, **run).style_caches[0]
    latent = args.size // pipe.vae_scale_factor
    sample = torch.randn(1, 4, latent, latent, device=args.device, dtype=pipe.unet.dtype)
    context = torch.zeros(1, 77, 768, device=args.device, dtype=pipe.unet.dtype)

    def unet_forward():
        with torch.no_grad():
            pipe.unet(sample, 500, encoder_hidden_states=context, return_dict=False)

    configs = {
        "unet_forward": unet_forward,
        "stylize_uncached": lambda: pipe(content, style, **run),
        "stylize_cached_style": lambda: pipe(content, style_cache=cache, **run),
    }
    passes = {}
    for name in ("stylize_uncached", "stylize_cached_style"):
        counter = UNetCounter(pipe.unet)
        configs[name]()
        passes[name] = counter.remove()
    times = interleaved_medians(configs, repeats=args.repeats, warmup=1, device=args.device)
    unit = times["unet_forward"]
    result = {"unet_forward": unit, "configs": {}}
    for name, needed in (("stylize_uncached", 3 * args.steps), ("stylize_cached_style", 2 * args.steps)):
        result["configs"][name] = {
            **times[name],
            "unet_evaluations": passes[name],
            "unet_evaluations_needed": needed,
            "ratio_wall": times[name]["median_s"] / (needed * unit["median_s"]),
            "ratio_cpu": times[name]["cpu_median_s"] / (needed * unit["cpu_median_s"]),
        }
    return result


def cache_sizes(pipe, args) -> dict:
    content, style = random_image(0, args.size), random_image(1, args.size)
    out = pipe(content, style, num_inference_steps=args.steps, output_type="latent")
    ours = out.style_caches[0].nbytes() + out.content_cache.nbytes()
    per_kind = out.content_cache.nbytes()  # one tensor kind (q) of one image, fp16
    styleid = per_kind * 2 * 3 * 2  # fp32 (x2) q, k, v (x3) of both images (x2)
    sites = default_style_sites(pipe.unet)
    elements = _elements_at(pipe.unet, sites, 512)
    return {
        "sites": len(sites),
        "ours_bytes": ours,
        "styleid_bytes": styleid,
        "ratio": ours / styleid,
        "style_cache_only_ratio": out.style_caches[0].nbytes() / styleid,
        "analytic_512px_50_steps": {
            "ours_gb": elements * 3 * 2 * 50 / 1e9,  # q content + k, v style, fp16
            "styleid_gb": elements * 6 * 4 * 50 / 1e9,
        },
    }


def _elements_at(unet, sites: list[str], size: int) -> int:
    """Elements of one (1, tokens, dim) tensor summed over ``sites`` at ``size`` px (SD 1.5 levels)."""
    total = 0
    for name in sites:
        block = int(name.split(".")[1])
        level = len(unet.config.block_out_channels) - 1 - block  # up block i works at level (n - 1 - i)
        tokens = (size // 8 // 2**level) ** 2
        total += tokens * unet.get_submodule(name).to_q.out_features
    return total


def memory(pipe, args) -> dict:
    from diffusers import StableDiffusionPipeline

    parts = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    plain = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    content, style = random_image(0, args.size), random_image(1, args.size)

    def plain_run():
        plain("", num_inference_steps=args.steps, guidance_scale=1.0, height=args.size, width=args.size)

    def stylize_run():
        pipe(content, style, num_inference_steps=args.steps, output_type="latent")

    if torch.device(args.device).type == "cuda":
        return {"kind": "cuda_peak_allocated", "plain": peak_memory(plain_run, args.device),
                "stylize": peak_memory(stylize_run, args.device)}  # fmt: skip
    plain_run()
    after_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stylize_run()
    after_stylize = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kind": "cpu_peak_rss_bytes", "plain": after_plain, "stylize": after_stylize,
            "increase": after_stylize - after_plain}  # fmt: skip


def shapes_quality(device: str, pairs: int = 16, steps: int = 25, settings: dict | None = None) -> dict:
    """Colour, shape, background and pattern transfer on the shapes model (``benchmarks.shapes.style_metrics``).

    ``settings``: pipeline keyword arguments (gamma, tau, adain_strength, feature_timing,
    injection_sites); the pipeline's defaults when absent. Styles are drawn with patterns and
    backgrounds half of the time (the world's training mix), so pattern transfer can be measured.
    """
    if not (SHAPES_MODEL / "model_index.json").is_file():
        return {"skipped": f"{SHAPES_MODEL} has no trained model yet (run benchmarks/shapes/train.py)"}
    from PIL import Image

    from benchmarks.shapes.style_metrics import score_pair, stylize_pairs, summarize

    pipe = StyleTransferPipeline.from_pretrained(SHAPES_MODEL).to(device)
    pipe.set_progress_bar_config(disable=True)
    (contents, content_scenes), (styles, style_scenes) = stylize_pairs(pairs)
    scores = []
    for content, style, content_scene, style_scene in zip(contents, styles, content_scenes, style_scenes):
        out = pipe(
            Image.fromarray(content), Image.fromarray(style), num_inference_steps=steps, output_type="pt",
            **(settings or {}),
        )  # fmt: skip
        result = (out.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        scores.append(score_pair(content, style, result, content_scene, style_scene))
    return {"pairs": pairs, "steps": steps, "settings": settings or "pipeline defaults"} | summarize(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--shapes-only", action="store_true", help="skip the full-size speed/memory/cache part")
    parser.add_argument("--shapes-pairs", type=int, default=16, help="content/style pairs of the shapes part")
    parser.add_argument("--shapes-steps", type=int, default=25, help="DDIM steps of the shapes part")
    parser.add_argument(
        "--shapes-gamma", type=float, default=None, help="gamma of the shapes part (default: pipeline's)"
    )
    parser.add_argument("--shapes-tau", type=float, default=None)
    parser.add_argument("--shapes-adain-strength", type=float, default=None)
    parser.add_argument("--shapes-feature-timing", default=None, choices=("inversion_step", "inverted_latent"))
    parser.add_argument("--shapes-sites", nargs="+", default=None, help="injection sites/patterns (default: model's)")
    args = parser.parse_args()
    result = {"environment": environment()}
    if not args.shapes_only:
        pipe = build_pipeline(getattr(torch, args.dtype), args.device)
        result |= {
            "setup": {"size": args.size, "steps": args.steps, "resample_steps": 0, "dtype": args.dtype},
            "memory": memory(pipe, args),  # first: peak RSS is monotone
            "efficiency": efficiency(pipe, args),
            "cache": cache_sizes(pipe, args),
        }
    if not args.skip_shapes:
        settings = {
            key: value
            for key, value in {
                "gamma": args.shapes_gamma, "tau": args.shapes_tau, "adain_strength": args.shapes_adain_strength,
                "feature_timing": args.shapes_feature_timing, "injection_sites": args.shapes_sites,
            }.items()
            if value is not None
        }  # fmt: skip
        result["shapes"] = shapes_quality(args.device, args.shapes_pairs, args.shapes_steps, settings or None)
    print_json(result)


if __name__ == "__main__":
    main()
