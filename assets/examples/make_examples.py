"""Render the app's example images from the shapes world: ``python assets/examples/make_examples.py``.

content.png (a red circle), style.png (a striped blue square on gray), edit.png (a green
triangle and a yellow square) and mask.png (the triangle's region), 128 x 128 px each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.shapes.world import Scene, ShapeObject, render, shape_mask

SIZE = 128
FOLDER = Path(__file__).resolve().parent


def _scene(background: str, *objects: ShapeObject) -> Scene:
    return Scene(background=background, objects=objects, category="single", size=SIZE)


def main() -> None:
    circle = ShapeObject("circle", "red", "solid", 64, 64, 36)
    square = ShapeObject("square", "blue", "striped", 64, 64, 40)
    triangle = ShapeObject("triangle", "green", "solid", 40, 64, 28)
    yellow = ShapeObject("square", "yellow", "dotted", 94, 64, 22)
    Image.fromarray(render(_scene("white", circle))).save(FOLDER / "content.png", optimize=True)
    Image.fromarray(render(_scene("gray", square))).save(FOLDER / "style.png", optimize=True)
    Image.fromarray(render(_scene("white", triangle, yellow))).save(FOLDER / "edit.png", optimize=True)
    mask = shape_mask(ShapeObject("triangle", "green", "solid", 40, 64, 34), SIZE)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(FOLDER / "mask.png", optimize=True)


if __name__ == "__main__":
    main()
