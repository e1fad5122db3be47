"""The methods on the shipped shapes model, scored by the deterministic detector.

Small versions of the shapes parts of ``benchmarks/edit.py`` and ``benchmarks/compose.py`` (the
benchmarks report the full numbers): what each method is for must show on real images.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.shapes.detect import detect, detect_batch  # noqa: E402
from benchmarks.shapes.evaluate import score_relation  # noqa: E402
from benchmarks.shapes.world import Scene, ShapeObject, held_out_prompts, render  # noqa: E402

MODEL_DIR = ROOT / "assets" / "models" / "shapes-sd"
pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model_index.json").is_file(), reason="assets/models/shapes-sd is not there"
)


def _box_iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


@pytest.mark.parametrize("contrast", [None, "dual"])
def test_colour_edit_changes_the_colour_and_keeps_the_layout(contrast):
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    pipe = ContrastiveEditPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    for index, (cx, cy, radius) in enumerate([(11.0, 13.0, 6.0), (20.0, 18.0, 7.5)]):
        original = render(Scene("white", (ShapeObject("circle", "red", "solid", cx, cy, radius),), "single"))
        out = pipe(
            Image.fromarray(original), "a red circle", "a blue circle", num_inference_steps=50, contrast=contrast,
            generator=torch.Generator().manual_seed(index),  # the paper's contrast_weight 3.0
        )  # fmt: skip
        (before,) = detect(original)
        after = detect(np.asarray(out.images[0]))
        assert [(d.color, d.shape) for d in after] == [("blue", "circle")]
        assert _box_iou(before.bbox, after[0].bbox) >= 0.8
        assert np.hypot(*np.subtract(before.centroid, after[0].centroid)) <= 1.5


def test_compose_guidance_puts_objects_where_the_prompt_says():
    from pipelines.compose import ComposePipeline

    pipe = ComposePipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    prompts = held_out_prompts("relation", 12, seed=0)
    common = {"num_inference_steps": 25, "guidance_scale": 5.0, "output_type": "np", "refine": False}
    images = {"plain": [], "guided": []}
    for seed, prompt in enumerate(prompts):
        for name, extra in (("plain", {"max_iter_to_alter": 0}), ("guided", {})):
            out = pipe(prompt.caption, generator=torch.Generator().manual_seed(seed), **common, **extra)
            images[name].append((out.images[0] * 255).round().astype(np.uint8))
    accuracy = {
        name: score_relation(prompts, detect_batch(np.stack(batch)))["relation_accuracy"]
        for name, batch in images.items()
    }
    assert accuracy["guided"] >= accuracy["plain"] + 3 / 12, accuracy


def test_stylize_example_moves_colour_toward_the_style_and_keeps_the_shape():
    """The README's stylize example at the defaults: colour distance to the style at least halved, shape kept."""
    from benchmarks.shapes.style_metrics import colour_distance, foreground_mask, mask_iou
    from benchmarks.shapes.world import shape_mask
    from pipelines.style_transfer import StyleTransferPipeline

    pipe = StyleTransferPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    examples = ROOT / "assets" / "examples"
    content, style = (
        Image.open(examples / f"{name}.png").convert("RGB").resize((32, 32)) for name in ("content", "style")
    )
    out = pipe(content, style, num_inference_steps=25, output_type="pt").images[0]
    result = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    content, style = np.asarray(content), np.asarray(style)
    assert colour_distance(result, style) <= 0.5 * colour_distance(content, style)
    circle = shape_mask(ShapeObject("circle", "red", "solid", 16, 16, 9), 32)  # make_examples.py's content
    assert mask_iou(foreground_mask(content), circle) > 0.9  # the example is that circle
    assert mask_iou(foreground_mask(result), circle) >= 0.7
