"""The shapes world's fixed names and colours, shared by its renderer (``benchmarks/shapes/world.py``),
its detector (:mod:`editkit.shapes.detect`) and the shapes verifier.

The world: one or two coloured shapes (circle, square, triangle; six colours; solid, striped or
dotted) on a white, gray or black background, captioned from templates. ``assets/models/shapes-sd``
is trained on it.
"""

from __future__ import annotations

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_BACKGROUND",
    "DEFAULT_PATTERN",
    "PATTERNS",
    "PATTERN_SHADE",
    "SHAPES",
    "shade",
]

#: Object colours (name -> RGB). Names are fixed; the detector and the captions share them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 190),
    "orange": (250, 140, 20),
}
#: Background colours; ``white`` is the default and is not named in captions.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (140, 140, 140),
    "black": (15, 15, 15),
}
DEFAULT_BACKGROUND = "white"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Fill patterns; ``solid`` is the default and is not named in captions.
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
DEFAULT_PATTERN = "solid"
#: The darker tone that striped and dotted objects are drawn with, as a fraction of the colour.
PATTERN_SHADE = 0.5


def shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The darker tone of a colour used for patterns."""
    return tuple(round(c * PATTERN_SHADE) for c in rgb)  # type: ignore[return-value]
