"""Evaluate a shapes-world text-to-image pipeline with the deterministic detector.

For each category (single object, two objects with "and", two objects with a spatial relation)
held-out prompts are generated with fixed seeds and scored:

- ``single_color_accuracy`` / ``single_shape_accuracy``: the largest detected object has the
  prompt's colour / shape (shape is counted on all prompts, not only those with the right colour),
  with the shape accuracy per prompted shape and the wrong readings (``"circle -> triangle": n``);
- ``pair_both_colors``: both prompted colours are detected;
- ``relation_accuracy``: both colours are detected and their centroids stand in the prompted
  relation (``relation_both_colors`` is reported too).

The functions (``generate``, ``score_single``, ``score_pair``, ``score_relation``, ``evaluate``) are
meant to be imported by other benchmarks (e.g. to score an editing or refinement method on the
same prompts). Usage::

    python -m benchmarks.shapes.evaluate --model assets/models/shapes-sd --num-prompts 200
    python -m benchmarks.shapes.evaluate --model assets/models/shapes-sd3 --num-prompts 200 --steps 28

Both a ``StableDiffusionPipeline`` folder (shapes-sd) and a ``StableDiffusion3Pipeline`` folder
(shapes-sd3, flow matching) work; for the latter, components saved as ``null`` (T5) load as None and
the T5 sequence length the model was trained with (``training_summary.json``) is passed as
``max_sequence_length``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from benchmarks.shapes.detect import Detection, detect_batch
from benchmarks.shapes.world import Prompt, held_out_prompts

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "assets/models/shapes-sd"


def _model_index(model: str | Path) -> dict:
    path = Path(model, "model_index.json")
    if not path.is_file():
        raise ValueError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
    return json.loads(path.read_text())


def load_pipeline(model: str = DEFAULT_MODEL, device: str = "cpu"):
    """Load a ``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline`` from a local folder, progress bar off.

    Components the folder saved as ``null`` (shapes-sd3's ``text_encoder_3`` / ``tokenizer_3``) are
    passed as None, which diffusers requires for the SD3 pipeline's non-optional T5.
    """
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    index = _model_index(model)
    if index.get("_class_name") == "StableDiffusion3Pipeline":
        absent = {name: None for name, value in index.items() if value == [None, None]}
        pipe = StableDiffusion3Pipeline.from_pretrained(model, **absent)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(model: str | Path) -> dict:
    """Extra pipeline arguments a model folder needs: SD3 without T5 -> its trained ``max_sequence_length``."""
    summary = Path(model, "training_summary.json")
    if _model_index(model).get("_class_name") != "StableDiffusion3Pipeline" or not summary.is_file():
        return {}
    t5_tokens = json.loads(summary.read_text()).get("config", {}).get("t5_tokens")
    return {} if t5_tokens is None else {"max_sequence_length": int(t5_tokens)}


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
    **kwargs,
) -> np.ndarray:
    """Images ``(N, H, W, 3)`` uint8 for ``prompts``, one seeded generator per image.

    Each image depends only on its prompt and seed (not on the batch it falls in).
    """
    assert len(prompts) == len(seeds)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(
            batch,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **kwargs,
        ).images
        chunks.append(np.clip(np.round(out * 255), 0, 255).astype(np.uint8))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), dtype=np.uint8)


def _mean(values: Sequence[bool]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _first_of_color(detections: list[Detection], color: str) -> Detection | None:
    return next((d for d in detections if d.color == color), None)


def score_single(prompts: Sequence[Prompt], detections: Sequence[list[Detection]]) -> dict[str, float]:
    """Colour and shape accuracy of the largest detected object against single-object prompts."""
    color_ok, shape_ok, both_ok = [], [], []
    by_shape: dict[str, list[bool]] = {}
    confusions: dict[str, int] = {}  # "asked -> drawn" for the shapes drawn wrong
    for prompt, found in zip(prompts, detections):
        color, shape = prompt.objects[0]
        top = found[0] if found else None
        color_ok.append(top is not None and top.color == color)
        shape_ok.append(top is not None and top.shape == shape)
        both_ok.append(color_ok[-1] and shape_ok[-1])
        by_shape.setdefault(shape, []).append(shape_ok[-1])
        if not shape_ok[-1]:
            drawn = f"{shape} -> {top.shape if top is not None else 'nothing'}"
            confusions[drawn] = confusions.get(drawn, 0) + 1
    return {
        "single_color_accuracy": _mean(color_ok),
        "single_shape_accuracy": _mean(shape_ok),
        "single_color_and_shape_accuracy": _mean(both_ok),
        "single_shape_accuracy_by_shape": {
            k: {"prompts": len(v), "accuracy": _mean(v)} for k, v in sorted(by_shape.items())
        },
        "single_shape_confusions": dict(sorted(confusions.items())),
    }


def score_pair(prompts: Sequence[Prompt], detections: Sequence[list[Detection]]) -> dict[str, float]:
    """Fraction of two-object images in which both prompted colours are detected (and with shapes)."""
    colors_ok, shapes_ok = [], []
    for prompt, found in zip(prompts, detections):
        matches = [_first_of_color(found, color) for color, _ in prompt.objects]
        colors_ok.append(all(m is not None for m in matches))
        shapes_ok.append(colors_ok[-1] and all(m.shape == shape for m, (_, shape) in zip(matches, prompt.objects)))
    return {"pair_both_colors": _mean(colors_ok), "pair_both_colors_and_shapes": _mean(shapes_ok)}


def relation_holds(relation: str, first: Detection, second: Detection) -> bool:
    """Whether ``first`` stands in ``relation`` to ``second`` (image y grows downwards)."""
    (x0, y0), (x1, y1) = first.centroid, second.centroid
    return {"left of": x0 < x1, "right of": x0 > x1, "above": y0 < y1, "below": y0 > y1}[relation]


def score_relation(prompts: Sequence[Prompt], detections: Sequence[list[Detection]]) -> dict[str, float]:
    """Fraction of relation prompts with both colours detected and the relation right."""
    present, correct = [], []
    for prompt, found in zip(prompts, detections):
        first, second = (_first_of_color(found, color) for color, _ in prompt.objects)
        present.append(first is not None and second is not None)
        correct.append(present[-1] and relation_holds(prompt.relation, first, second))
    return {"relation_both_colors": _mean(present), "relation_accuracy": _mean(correct)}


@torch.no_grad()
def score_vae_roundtrip(pipe, n: int = 500, seed: int = 12345, batch_size: int = 250) -> dict[str, float]:
    """Detector agreement on clean renders passed through the pipeline's VAE (an upper bound for
    what generation can reach): colour, shape and pattern of every object recovered."""
    from benchmarks.shapes.world import sample_batch

    images, _, scenes = sample_batch(seed, n, training=False, size=pipe.vae.config.sample_size)
    decoded = []
    for start in range(0, n, batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.to(pipe.device, pipe.vae.dtype)
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        decoded.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    detections = detect_batch(np.concatenate(decoded))
    color_shape, full = [], []
    for scene, found in zip(scenes, detections):
        expected = sorted((o.color, o.shape, o.pattern) for o in scene.objects)
        got = sorted((d.color, d.shape, d.pattern) for d in found)
        full.append(got == expected)
        color_shape.append([e[:2] for e in expected] == [g[:2] for g in got])
    return {"vae_roundtrip_color_shape": _mean(color_shape), "vae_roundtrip_exact": _mean(full)}


SCORERS = {"single": score_single, "pair": score_pair, "relation": score_relation}


def evaluate(
    pipe,
    num_prompts: int = 200,
    steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
    seed: int = 0,
    categories: Sequence[str] = ("single", "pair", "relation"),
    **kwargs,
) -> dict:
    """Generate ``num_prompts`` held-out prompts per category (seeds ``seed + i``) and score them.

    ``kwargs`` reach every pipeline call (e.g. :func:`call_kwargs`).
    """
    results: dict = {"num_prompts": num_prompts, "steps": steps, "guidance_scale": guidance_scale}
    for category in categories:
        prompts = held_out_prompts(category, num_prompts, seed=seed)
        start = time.time()
        images = generate(
            pipe,
            [p.caption for p in prompts],
            [seed + i for i in range(num_prompts)],
            steps=steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            **kwargs,
        )
        results.update(SCORERS[category](prompts, detect_batch(images)))
        results[f"{category}_distinct_prompts"] = len({p.caption for p in prompts})
        logger.info("%s: %d images in %.1f s", category, num_prompts, time.time() - start)
    return results


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints the results as JSON."""
    parser = argparse.ArgumentParser(description="Evaluate a shapes-world pipeline on held-out prompts.")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--vae-roundtrip", type=int, default=0, help="also score N clean renders through the VAE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.device)
    results = evaluate(
        pipe,
        num_prompts=args.num_prompts,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        seed=args.seed,
        **call_kwargs(args.model),
    )
    if args.vae_roundtrip:
        results.update(score_vae_roundtrip(pipe, args.vae_roundtrip))
    results["model"] = args.model
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
