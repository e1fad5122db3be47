"""Run the README quickstart commands verbatim and draw their inputs and outputs as one PNG sheet.

    python examples/quickstart_figure.py                   # writes assets/quickstart.png, prints JSON

The commands run in a scratch folder that links ``assets/`` (so ``-o compose.png`` lands there, not
in the checkout), through this checkout's ``editkit`` (``python -m editkit.cli``). The sheet shows
every 32 px image enlarged 4x without smoothing. The JSON holds what the figure should show,
measured: the stylized image's colour distance to the style against the content's (at most 0.5 is
"halved") and the IoU of its foreground with the content's circle; the edit's detected objects.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
SETUP = "M=assets/models/shapes-sd; E=assets/examples"
#: The README's quickstart commands (tests/test_quickstart_figure.py keeps the two in step).
COMMANDS = (
    'editkit compose "a blue square to the left of a red circle" --model $M -o compose.png --steps 25',
    "editkit stylize $E/content.png $E/style.png --model $M -o stylized.png --steps 25",
    'editkit edit $E/edit.png --source-prompt "a green triangle and a yellow square" \\\n'
    '    --target-prompt "a blue triangle and a yellow square" --model $M -o edited.png --steps 100',
)
#: (label, inputs, output) per sheet row; paths relative to the scratch folder.
ROWS = (
    ("compose: text -> 'a blue square to the left of a red circle'", (), "compose.png"),
    ("stylize: content + style", ("assets/examples/content.png", "assets/examples/style.png"), "stylized.png"),
    ("edit: green triangle -> blue triangle", ("assets/examples/edit.png",), "edited.png"),
)
TILE, GAP, LABEL = 128, 8, 18


def run_commands(folder: Path) -> None:
    """The quickstart, verbatim, with ``editkit`` bound to this checkout's CLI."""
    (folder / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    script = "\n".join([f'editkit() {{ "{sys.executable}" -m editkit.cli "$@"; }}', "set -e", SETUP, *COMMANDS])
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    subprocess.run(["bash", "-c", script], cwd=folder, env=env, check=True)


def _tile(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)


def draw_sheet(folder: Path) -> Image.Image:
    """One row per command: its inputs (the prompt for compose), an arrow, its output."""
    inputs_wide = max(len(inputs) for _, inputs, _ in ROWS) * (TILE + GAP)
    arrow = 3 * GAP
    width = GAP + inputs_wide + arrow + TILE + GAP
    sheet = Image.new("RGB", (width, len(ROWS) * (TILE + LABEL + GAP) + GAP), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, inputs, output) in enumerate(ROWS):
        top = GAP + row * (TILE + LABEL + GAP)
        draw.text((GAP, top), label, fill="black")
        for column, path in enumerate(inputs):
            sheet.paste(_tile(folder / path), (GAP + inputs_wide - (len(inputs) - column) * (TILE + GAP), top + LABEL))
        left = GAP + inputs_wide
        draw.text((left, top + LABEL + TILE // 2 - 6), "->", fill="black")
        sheet.paste(_tile(folder / output), (left + arrow, top + LABEL))
    return sheet


def measure(folder: Path) -> dict:
    """What the sheet should show, in numbers (see the module docstring)."""
    from benchmarks.shapes.detect import detect
    from benchmarks.shapes.style_metrics import colour_distance, foreground_mask, mask_iou
    from benchmarks.shapes.world import ShapeObject, shape_mask

    def pixels(name: str) -> np.ndarray:  # at the model's 32 px, as the CLI saw them
        return np.asarray(Image.open(folder / name).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS))

    content, style = pixels("assets/examples/content.png"), pixels("assets/examples/style.png")
    stylized = pixels("stylized.png")
    circle = shape_mask(ShapeObject("circle", "red", "solid", 16, 16, 9), 32)  # make_examples.py's content
    return {
        "stylize_colour_distance_ratio": colour_distance(stylized, style) / colour_distance(content, style),
        "stylize_content_mask_iou": mask_iou(foreground_mask(stylized), circle),
        "edit_detected": [(d.color, d.shape) for d in detect(pixels("edited.png"))],
        "compose_detected": [(d.color, d.shape) for d in detect(pixels("compose.png"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "assets" / "quickstart.png")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # benchmarks.shapes for the measurement
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        run_commands(folder)
        draw_sheet(folder).save(args.output, optimize=True)
        print(json.dumps(measure(folder) | {"figure": str(args.output)}, indent=2))


if __name__ == "__main__":
    main()
