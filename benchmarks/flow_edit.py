"""Contrastive editing on MM-DiT (SD3.5 / FLUX.1): per-step efficiency against the transformer floor, op counts,
and the shapes-world colour edit of :mod:`benchmarks.edit` on ``shapes-sd3``.

Speed (full-width reduced-depth random-weight transformers, :func:`editkit.testing_mmdit.full_width_transformer`:
SD3.5-medium widths with 2 joint blocks, FLUX.1-dev widths with 2 double + 2 single blocks; tiny text
encoders and VAE). Per FlowEdit step, each against the floor measured in the same run (interleaved):

- ``flowedit`` (no contrast) vs ``floor_plain``: the transformer calls FlowEdit makes, with diffusers'
  stock processors and nothing else (SD3: one no-grad batch-4 call, CFG on both branches; FLUX.1-dev:
  two no-grad batch-1 calls, one per branch with its distilled guidance);
- ``flowedit_dual`` vs ``floor_contrast``: SD3: a no-grad batch-3 call (source uncond + cond, target
  uncond) and a batch-1 target call with a backward to its latent from the contrast sites' image-token
  outputs; FLUX: a no-grad source call and the target call with that backward.

Per step = (run of ``1 + k`` steps - run of 1 step) / k, so the run's fixed setup (image and text
encoding, attaching the processors) cancels; the whole-run times are reported too. Op counts:
dispatched non-view ATen operations (text encoders and VAE not counted, :class:`benchmarks.opcount.OpCounter`),
per step the same way, against the floor's.

Quality (``--shapes-model``, default ``assets/models/shapes-sd3``): "a red circle" -> "a blue circle" on
:func:`benchmarks.edit.red_circle_scenes`, scored by :func:`benchmarks.edit.score_edit` (success = a
blue circle is found; layout = box IoU and centroid shift against the original circle).

    python -m benchmarks.flow_edit --skip-speed --shapes-scenes 16
    python -m benchmarks.flow_edit --skip-shapes --only sd3 --size 256 --repeats 2
    python -m benchmarks.flow_edit --skip-shapes --only flux --size 128 --repeats 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.timing import environment, print_json

SHAPES_MODEL = Path("assets/models/shapes-sd3")


# -- quality ----------------------------------------------------------------------------------------
def shapes(args) -> dict:
    """Red circle -> blue circle on the shapes world, for each method and contrast setting."""
    from benchmarks.edit import red_circle_scenes, score_edit
    from editkit.models import load_pipeline
    from editkit.shapes.detect import detect
    from pipelines.flow_edit import SD3ContrastiveEditPipeline

    model = Path(args.shapes_model)
    if not (model / "model_index.json").is_file():
        return {"skipped": f"{model} not present"}
    pipe = load_pipeline(SD3ContrastiveEditPipeline, model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    originals = red_circle_scenes(args.shapes_scenes)
    results = {"model": str(model), "scenes": args.shapes_scenes}
    for name in args.shapes_runs:
        method, contrast = name.split(":")
        options = {"method": method, "contrast": None if contrast == "none" else contrast}
        if method == "dds":
            options["num_inference_steps"] = args.shapes_iterations
        if contrast != "none" and args.shapes_contrast_weight is not None:
            options["contrast_weight"] = args.shapes_contrast_weight
        if args.shapes_guidance_scale is not None:
            options["guidance_scale"] = args.shapes_guidance_scale
        if args.shapes_source_guidance_scale is not None:
            options["source_guidance_scale"] = args.shapes_source_guidance_scale
        scores, start = [], time.perf_counter()
        for index, original in enumerate(originals):
            out = pipe(Image.fromarray(original), "a red circle", "a blue circle", max_sequence_length=0,
                       generator=torch.Generator().manual_seed(index), **options)  # fmt: skip
            scores.append(score_edit(detect(original), detect(np.asarray(out.images[0]))))
        summary = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
        summary["success_and_iou_0.85"] = float(np.mean([s["success"] and s["iou"] >= 0.85 for s in scores]))
        summary["seconds"] = time.perf_counter() - start
        results[name] = summary | {"options": options}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (speed part)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes-model", default=str(SHAPES_MODEL))
    parser.add_argument("--shapes-scenes", type=int, default=16)
    parser.add_argument("--shapes-iterations", type=int, default=50, help="DDS iterations on the shapes model")
    parser.add_argument("--shapes-contrast-weight", type=float, default=None)
    parser.add_argument("--shapes-guidance-scale", type=float, default=None, help="target guidance (default: SD3's)")
    parser.add_argument("--shapes-source-guidance-scale", type=float, default=None)
    parser.add_argument(
        "--shapes-runs", nargs="+", default=["flowedit:none", "flowedit:dual", "dds:none", "dds:dual"],
        help="METHOD:CONTRAST pairs (flowedit or dds; none, source, target or dual)",
    )  # fmt: skip
    parser.add_argument("--only", choices=("sd3", "flux"), default=None, help="speed: one family only")
    parser.add_argument(
        "--text-tokens", type=int, default=64, help="speed: T5 tokens (SD3: zeros after the 77 CLIP ones)"
    )
    parser.add_argument("--steps-per-run", type=int, default=2, help="speed: FlowEdit steps per timed run (n_max)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-shapes", action="store_true")
    args = parser.parse_args()
    result = {"benchmark": "flow_edit", "device": args.device}
    if not args.skip_speed:
        from benchmarks.flow_edit_speed import speed

        result |= speed(args)
    result["shapes"] = {"skipped": "--skip-shapes"} if args.skip_shapes else shapes(args)
    result["targets"] = {"efficiency (floor / per-step time)": 0.85, "shapes success with IoU >= 0.85": 0.9}
    result["environment"] = environment()
    print_json(result)


if __name__ == "__main__":
    main()
