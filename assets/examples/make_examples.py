"""Render the app's example images from the shapes world: ``python assets/examples/make_examples.py``.

content.png (a red circle), style.png (a striped blue square on gray), edit.png (a green
triangle and a yellow square) and mask.png (the triangle's region), 128 x 128 px each.

Each scene is drawn at the shapes model's own 32 px (2 px stripes, the patterns it was trained on)
and enlarged 4x without smoothing, so the CLI's resize to the model's size gives the 32 px scene
back: patterns drawn at 128 px (0.5 px at 32) would vanish in that resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.shapes.world import Scene, ShapeObject, render, shape_mask

SIZE = 128
NATIVE = 32  # the shapes model's resolution
FOLDER = Path(__file__).resolve().parent


def _scene(background: str, *objects: ShapeObject) -> Scene:
    return Scene(background=background, objects=objects, category="single", size=NATIVE)


def _enlarged(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def main() -> None:
    circle = ShapeObject("circle", "red", "solid", 16, 16, 9)
    square = ShapeObject("square", "blue", "striped", 16, 16, 10)
    triangle = ShapeObject("triangle", "green", "solid", 10, 16, 7)
    yellow = ShapeObject("square", "yellow", "dotted", 23.5, 16, 5.5)
    _enlarged(render(_scene("white", circle))).save(FOLDER / "content.png", optimize=True)
    _enlarged(render(_scene("gray", square))).save(FOLDER / "style.png", optimize=True)
    _enlarged(render(_scene("white", triangle, yellow))).save(FOLDER / "edit.png", optimize=True)
    mask = shape_mask(ShapeObject("triangle", "green", "solid", 10, 16, 8.5), NATIVE)
    _enlarged(np.where(mask, 255, 0).astype(np.uint8)).save(FOLDER / "mask.png", optimize=True)


if __name__ == "__main__":
    main()
