"""The quickstart figure script runs the README's commands, and the shapes-world style metrics measure what they say."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.shapes.detect import detect  # noqa: E402
from benchmarks.shapes.style_metrics import (  # noqa: E402
    box_iou,
    colour_distance,
    content_box_iou,
    foreground_mask,
    mask_iou,
    scene_mask,
    score_pair,
    summarize,
)
from benchmarks.shapes.world import Scene, ShapeObject, render  # noqa: E402


def test_figure_script_runs_the_readme_quickstart_verbatim():
    sys.path.insert(0, str(ROOT / "examples"))
    import quickstart_figure

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line for line in block.splitlines() if not line.startswith("editkit app")]
    assert lines[0] == quickstart_figure.SETUP
    assert "\n".join(lines[1:]) == "\n".join(quickstart_figure.COMMANDS)
    assert "assets/quickstart.png" in readme and (ROOT / "assets" / "quickstart.png").is_file()


def test_style_metrics_on_rendered_scenes():
    circle = Scene("white", (ShapeObject("circle", "red", "solid", 16, 16, 9),), "single")
    square = Scene("gray", (ShapeObject("square", "blue", "striped", 16, 16, 10),), "single")
    red, blue = render(circle), render(square)
    assert colour_distance(red, red) == 0 and colour_distance(red, blue) > 100
    assert mask_iou(foreground_mask(red), scene_mask(circle)) > 0.95  # foreground = the drawn object
    assert mask_iou(foreground_mask(blue), scene_mask(square)) > 0.95  # also on a gray background
    assert mask_iou(foreground_mask(red), scene_mask(square)) < 0.8
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def test_box_iou_of_detections_against_hand_computed_overlaps():
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == 8 / 24  # 2x4 overlap, 16 + 16 - 8 union
    assert box_iou((0, 0, 4, 4), (4, 4, 8, 8)) == 0.0 and box_iou((1, 2, 5, 7), (1, 2, 5, 7)) == 1.0
    square = Scene("white", (ShapeObject("square", "blue", "solid", 12, 16, 6),), "single")
    moved = Scene("gray", (ShapeObject("square", "red", "solid", 15, 16, 6),), "single")  # 3 px right, recoloured
    (a,), (b,) = detect(render(square)), detect(render(moved))
    side = a.bbox[2] - a.bbox[0]
    assert b.bbox[2] - b.bbox[0] == side and b.bbox[0] - a.bbox[0] == 3  # the detector reads the drawn squares
    expected = (side - 3) * side / (2 * side * side - (side - 3) * side)
    assert content_box_iou([a], [b]) == expected  # any colour counts
    assert content_box_iou([a], []) == 0.0 and content_box_iou([], [b]) == 1.0
    two = Scene("white", (square.objects[0], ShapeObject("circle", "green", "solid", 26, 6, 4)), "pair")
    assert content_box_iou(detect(render(two)), [b]) == 0.0  # the circle is lost: the worst object counts


def test_layout_and_summary_of_scored_pairs():
    content = Scene("white", (ShapeObject("circle", "red", "solid", 16, 16, 8),), "single")
    style = Scene("gray", (ShapeObject("square", "blue", "solid", 16, 16, 8),), "single")
    recoloured = Scene("gray", (ShapeObject("circle", "blue", "solid", 17, 16, 8),), "single")  # 1 px: kept
    moved = Scene("gray", (ShapeObject("circle", "blue", "solid", 24, 16, 8),), "single")  # 8 px: not kept
    images = [render(scene) for scene in (content, style, recoloured, moved)]
    kept, lost = (score_pair(images[0], images[1], out, content, style) for out in images[2:])
    assert kept["layout_kept"] and not lost["layout_kept"]
    assert kept["palette_nearer_style"] == 1.0 and kept["background_transferred"]  # blue on gray, as the style
    summary = summarize([kept, lost])
    assert summary["layout_kept"] == 0.5 and summary["background_pairs"] == 2
    assert summary["content_mask_iou_at_least_0.7"] == 0.5  # the moved circle leaves the content's mask
