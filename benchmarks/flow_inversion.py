"""Flow-ODE inversion on the shapes MM-DiT: Euler vs RF-Solver's midpoint step vs FireFlow.

Clean renders of held-out single-object and relation scenes are encoded by the model's VAE, inverted
with their captions along the generation schedule (``editkit.flow_inversion``), regenerated with the
same solver and scored against the clean latents and the scene: latent MSE (of the scaled latents),
pixel MSE of the decoded reconstruction against the decoded clean latent, and detector agreement
(colour and shape of every object, as ``evaluate.score_vae_roundtrip``; the VAE alone is the
ceiling, reported as ``vae_roundtrip_color_shape``). Inversion and regeneration use CFG 1 (the
conditional velocity), as RF-Solver and FireFlow reconstruct. Prints JSON. Usage::

    python -m benchmarks.flow_inversion --model assets/models/shapes-sd3 --num-images 24 --steps 10 28
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch

from benchmarks.shapes.detect import detect_batch
from benchmarks.shapes.evaluate import call_kwargs, load_pipeline
from benchmarks.shapes.world import sample_batch
from editkit.backbones import backbone_for
from editkit.flow_inversion import FLOW_METHODS, flow_invert, flow_sample, flow_schedule

logger = logging.getLogger(__name__)


def sd3_velocity(pipe, prompts: list[str], **backbone_options):
    """``velocity(latents, sigma, timestep)`` of an SD3 pipeline's transformer for ``prompts``, through editkit's
    backbone (``backbone_options``: e.g. ``max_sequence_length``). No guidance: the inversions run at CFG 1."""
    backbone = backbone_for(pipe, **backbone_options)
    conditioning = backbone.encode_text(prompts)

    def velocity(latents: torch.Tensor, sigma: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return backbone.denoise(latents, timestep, conditioning)

    return velocity


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _agreement(images: np.ndarray, scenes) -> float:
    """Fraction of images whose detected (colour, shape) multiset equals the scene's."""
    hits = []
    for scene, found in zip(scenes, detect_batch(images)):
        hits.append(sorted((o.color, o.shape) for o in scene.objects) == sorted((d.color, d.shape) for d in found))
    return float(np.mean(hits))


@torch.no_grad()
def measure(pipe, num_images: int, steps_list: list[int], seed: int, extra: dict) -> dict:
    """Reconstruction figures per (steps, method), plus the VAE-only ceiling."""
    images, captions, scenes = sample_batch(seed, num_images, training=False)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = pipe.vae
    x0 = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    decode = lambda z: vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample  # noqa: E731
    clean = decode(x0)
    velocity = sd3_velocity(pipe, captions, **extra)
    results: dict = {"num_images": num_images, "vae_roundtrip_color_shape": _agreement(_to_uint8(clean), scenes)}
    for steps in steps_list:
        schedule = flow_schedule(pipe.scheduler, steps)
        for method in FLOW_METHODS:
            start = time.time()
            inverted = flow_invert(velocity, x0, schedule, method=method)
            back = flow_sample(velocity, inverted.final, schedule, method=method)
            recon = decode(back)
            results[f"{method}_{steps}"] = {
                "latent_mse": float(((back - x0) ** 2).mean()),
                "pixel_mse": float(((recon - clean) ** 2).mean()),
                "detector_agreement": _agreement(_to_uint8(recon), scenes),
                "velocity_calls": inverted.velocity_calls * 2,
                "seconds": round(time.time() - start, 1),
            }
            logger.info("%s %d: %s", method, steps, results[f"{method}_{steps}"])
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="assets/models/shapes-sd3")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 28])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    results = measure(pipe, args.num_images, args.steps, args.seed, call_kwargs(args.model))
    results["model"] = args.model
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
