"""Contrastive editing: per-iteration efficiency against the UNet floor, memory, and a shapes-world edit.

Speed (full-size SD 1.5 UNet architecture, random weights: the real model's cost): the pipeline's
per-iteration time for plain DDS, CDS (source-anchored) and dual (the target-anchored direction
does the source-anchored one's UNet work),
each against the floor measured in the same run (interleaved):

- ``floor_issue``: the UNet work of the issue's accounting: a no-grad forward of the source branch
  (uncond + cond, batch 2) and a forward + backward of the target branch (batch 2);
- ``floor_schedule``: exactly the UNet work the pipeline schedules: no-grad source (batch 2),
  no-grad target uncond (batch 1), target cond forward + backward (batch 1; the uncond half
  needs no gradient);
- ``floor_dds``: plain DDS's one no-grad batch-4 forward.

Backward passes start from the up-block self-attention outputs (what the contrastive loss reads).
Memory: peak CUDA bytes with and without gradient checkpointing; on the CPU, the bytes autograd
saves for the backward pass (the activation memory checkpointing removes) instead.

Quality (only when ``assets/models/shapes-sd`` exists): "a red circle" -> "a blue circle" on
rendered scenes; success = the detector finds a blue circle; layout = IoU of its box with the
original circle's and centroid shift, for plain DDS and the dual contrastive loss.

    python -m benchmarks.edit --size 128 --iterations 2 --repeats 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.shapes.style_metrics import box_iou
from benchmarks.timing import environment, interleaved_medians, peak_memory, print_json, saved_activation_bytes

SHAPES_MODEL = Path("assets/models/shapes-sd")


def build_pipeline(device: str, dtype: torch.dtype):
    """ContrastiveEditPipeline with the full-size SD 1.5 UNet; tiny VAE and a 768-wide one-layer text encoder."""
    from editkit.testing import full_size_sd15_components
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    pipe = ContrastiveEditPipeline(**full_size_sd15_components(dtype, device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _attn_outputs(unet):
    """Forward hooks collecting up-block self-attention outputs (stock processors, no editkit layer)."""
    outputs: list[torch.Tensor] = []
    handles = [
        module.register_forward_hook(lambda _m, _a, out: outputs.append(out))
        for name, module in unet.named_modules()
        if name.startswith("up_blocks") and name.endswith("attn1")
    ]
    return outputs, handles


def floors(unet, latent: int, device: str, dtype: torch.dtype) -> dict:
    """The bare UNet work of one iteration, for each accounting."""
    generator = torch.Generator(device).manual_seed(0)
    sample = torch.randn(4, 4, latent, latent, generator=generator, device=device, dtype=dtype)
    context = torch.randn(4, 77, 768, generator=generator, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)

    def forward(batch: int):
        with torch.no_grad():
            unet(sample[:batch], timestep, encoder_hidden_states=context[:batch])

    def forward_backward(batch: int):
        outputs, handles = _attn_outputs(unet)
        with torch.enable_grad():
            z = sample[:batch].clone().requires_grad_(True)
            unet(z, timestep, encoder_hidden_states=context[:batch])
            torch.autograd.grad(sum(o.float().square().mean() for o in outputs), z)
        for handle in handles:
            handle.remove()

    return {
        "floor_dds": lambda: forward(4),
        "floor_issue": lambda: (forward(2), forward_backward(2)),
        "floor_schedule": lambda: (forward(2), forward(1), forward_backward(1)),
    }


def speed(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    pipe = build_pipeline(device, dtype)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((args.size, args.size, 3)) * 255).astype(np.uint8))

    def edit(contrast, checkpointing=False, iterations=args.iterations):
        def run():
            generator = torch.Generator().manual_seed(0)
            pipe(
                image, "a photo of a cat", "a photo of a dog", num_inference_steps=iterations, contrast=contrast,
                gradient_checkpointing=checkpointing, generator=generator, output_type="latent",
            )  # fmt: skip

        return run

    # the target-anchored direction does exactly the source-anchored one's UNet work: not timed separately
    runs = {"dds": edit(None), "cds_source": edit("source"), "dual": edit("dual")}
    runs |= floors(pipe.unet, args.size // 8, device, dtype)
    times = interleaved_medians(runs, repeats=args.repeats, warmup=1, device=device)
    n = args.iterations
    per_iteration = {name: {k: v / n for k, v in times[name].items()} for name in runs if not name.startswith("floor")}
    efficiency = {}
    for name in ("cds_source", "dual"):
        for floor in ("floor_issue", "floor_schedule"):
            for clock in ("median_s", "cpu_median_s"):
                key = f"{name}_vs_{floor}" + ("_cpu" if clock.startswith("cpu") else "")
                efficiency[key] = times[floor][clock] / per_iteration[name][clock]
    for clock in ("median_s", "cpu_median_s"):
        efficiency["dds_vs_floor_dds" + ("_cpu" if clock.startswith("cpu") else "")] = (
            times["floor_dds"][clock] / per_iteration["dds"][clock]
        )
    memory = {
        "dual_peak_bytes": peak_memory(edit("dual", iterations=1), device),
        "dual_checkpointed_peak_bytes": peak_memory(edit("dual", True, iterations=1), device),
        "dual_saved_activation_bytes": saved_activation_bytes(edit("dual", iterations=1), pipe.unet),
        "dual_checkpointed_saved_activation_bytes": saved_activation_bytes(edit("dual", True, iterations=1), pipe.unet),
    }
    return {
        "per_iteration": per_iteration,
        "floors": {k: v for k, v in times.items() if k.startswith("floor")},
        "efficiency": efficiency,
        "memory": memory,
    }


def shapes(args) -> dict:
    """Red circle -> blue circle on the shapes world: success and layout kept, DDS vs dual."""
    if not (SHAPES_MODEL / "model_index.json").is_file():
        return {"skipped": f"{SHAPES_MODEL} not present (train it with benchmarks.shapes.train)"}
    from benchmarks.shapes.detect import detect
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    pipe = ContrastiveEditPipeline.from_pretrained(SHAPES_MODEL).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    # The same scenes (and seeds) for both methods: draw them once, not inside the method loop.
    originals = red_circle_scenes(args.shapes_scenes)
    results = {"scenes": args.shapes_scenes, "iterations": args.shapes_iterations}
    extra = {} if args.shapes_contrast_weight is None else {"contrast_weight": args.shapes_contrast_weight}
    results["contrast_weight"] = args.shapes_contrast_weight if extra else "pipeline default"
    for name, contrast in (("dds", None), ("dual", "dual")):
        scores = []
        for index, original in enumerate(originals):
            out = pipe(
                Image.fromarray(original), "a red circle", "a blue circle", num_inference_steps=args.shapes_iterations,
                contrast=contrast, generator=torch.Generator().manual_seed(index), **(extra if contrast else {}),
            )  # fmt: skip
            scores.append(_score(detect(original), detect(np.asarray(out.images[0]))))
        results[name] = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
    return results


def red_circle_scenes(count: int) -> list[np.ndarray]:
    """The benchmark's ``count`` rendered scenes: one solid red circle on white (seeded; the same in every run)."""
    from benchmarks.shapes.world import Scene, ShapeObject, render

    rng = np.random.default_rng(0)
    originals = []
    for _ in range(count):
        radius = float(rng.uniform(5, 9))
        cx, cy = (float(v) for v in rng.uniform(radius + 1, 32 - radius - 1, size=2))
        originals.append(render(Scene("white", (ShapeObject("circle", "red", "solid", cx, cy, radius),), "single")))
    return originals


def score_edit(before, after) -> dict:
    """Success (a blue circle is found) and layout (IoU, centroid shift) against the original circle."""
    return _score(before, after)


def _score(before, after) -> dict:
    """Success (a blue circle is found) and layout (IoU, centroid shift) against the original circle."""
    red = max((d for d in before if d.color == "red"), key=lambda d: d.area, default=None)
    blue = max((d for d in after if d.color == "blue"), key=lambda d: d.area, default=None)
    success = blue is not None and blue.shape == "circle"
    if red is None or blue is None:
        return {"success": float(success), "iou": 0.0, "centroid_shift_px": 32.0}
    shift = float(np.hypot(red.centroid[0] - blue.centroid[0], red.centroid[1] - blue.centroid[1]))
    return {"success": float(success), "iou": box_iou(red.bbox, blue.bbox), "centroid_shift_px": shift}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--iterations", type=int, default=2, help="edit iterations per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--shapes-scenes", type=int, default=8)
    parser.add_argument("--shapes-iterations", type=int, default=100)
    parser.add_argument(
        "--shapes-contrast-weight", type=float, default=None,
        help="contrast_weight of the dual run (default: the pipeline's, the paper's 3.0; on the shapes model, "
        "whose self-attention features carry colour, 0.3 lets colour edits through: see benchmarks/RESULTS.md)",
    )  # fmt: skip
    parser.add_argument("--shapes-only", "--skip-speed", action="store_true", help="skip the full-size speed part")
    parser.add_argument("--skip-shapes", action="store_true", help="skip the shapes-world part")
    args = parser.parse_args()
    result = {"benchmark": "edit", "size_px": args.size, "device": args.device, "dtype": args.dtype}
    if not args.shapes_only:
        result |= speed(args)
    if args.skip_shapes or args.shapes_scenes <= 0:
        result["shapes"] = {"skipped": "--skip-shapes or --shapes-scenes 0"}
    else:
        result["shapes"] = shapes(args)
    result["targets"] = {"efficiency (floor / per-iteration time)": 0.85}
    result["environment"] = environment()
    print_json(result)


if __name__ == "__main__":
    main()
