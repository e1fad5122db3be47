"""A procedurally generated image world of coloured shapes, with captions and ground-truth layouts.

Every image has a background colour and one or two objects. Objects have a shape (circle, square,
triangle), a colour (six fixed names), a fill pattern (solid, striped, dotted) and a position.
Two-object scenes are described with "and" or with a spatial relation (left of, right of, above,
below). Everything is drawn through an explicit ``numpy.random.Generator``; the same seed gives the
same image and caption.

Held-out captions: a caption is held out for evaluation when a stable hash of its text falls into the
evaluation split (``is_held_out``). Training samplers skip them; ``held_out_captions`` lists them.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import numpy as np

from editkit.shapes.palette import (  # noqa: F401 - re-exported: the world's names live in editkit
    BACKGROUNDS,
    COLORS,
    DEFAULT_BACKGROUND,
    DEFAULT_PATTERN,
    PATTERN_SHADE,
    PATTERNS,
    SHAPES,
    shade,
)

IMAGE_SIZE = 32

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single", "pair", "relation")
#: Fraction (in percent) of caption hashes that are held out for evaluation.
HELD_OUT_PERCENT = 15
HELD_OUT_SALT = b"shapes-world-v1"

_RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}


@dataclass(frozen=True)
class ShapeObject:
    """One object in a scene: what it is and where (centre and half-size in pixels)."""

    shape: str
    color: str
    pattern: str
    cx: float
    cy: float
    radius: float

    def describe(self) -> str:
        """Noun phrase without article, e.g. ``"striped red circle"``."""
        words = [] if self.pattern == DEFAULT_PATTERN else [self.pattern]
        return " ".join([*words, self.color, self.shape])

    def bbox(self) -> tuple[float, float, float, float]:
        """Nominal bounding box ``(x0, y0, x1, y1)`` in pixels."""
        return (self.cx - self.radius, self.cy - self.radius, self.cx + self.radius, self.cy + self.radius)


@dataclass(frozen=True)
class Scene:
    """A full scene: background, objects, the category and the relation between two objects."""

    background: str
    objects: tuple[ShapeObject, ...]
    category: str
    relation: str | None = None
    size: int = IMAGE_SIZE
    extras: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def caption(self) -> str:
        """The caption of this scene (see ``caption_for``)."""
        return caption_for(self)


def _article(phrase: str) -> str:
    return "an " + phrase if phrase[0] in "aeiou" else "a " + phrase


def caption_for(scene: Scene) -> str:
    """Caption from the templates: ``a red circle``, ``a red circle and a blue square``, ...

    A non-default background adds ``on a gray background``.
    """
    phrases = [_article(obj.describe()) for obj in scene.objects]
    if scene.category == "single":
        text = phrases[0]
    elif scene.category == "pair":
        text = f"{phrases[0]} and {phrases[1]}"
    else:
        assert scene.relation is not None
        text = f"{phrases[0]} {_RELATION_PHRASES[scene.relation]} {phrases[1]}"
    if scene.background != DEFAULT_BACKGROUND:
        text += f" on a {scene.background} background"
    return text


def vocabulary() -> list[str]:
    """Every word the captions use (for a word-level tokenizer)."""
    words = {"a", "an", "and", "on", "background", "to", "the", "of", "left", "right", "above", "below"}
    words.update(COLORS, BACKGROUNDS, SHAPES, PATTERNS)
    return sorted(words)


def is_held_out(caption: str) -> bool:
    """Whether ``caption`` belongs to the evaluation split (stable across runs and machines)."""
    return zlib.crc32(HELD_OUT_SALT + caption.encode()) % 100 < HELD_OUT_PERCENT


# ----------------------------------------------------------------------------------------------
# Sampling scenes


def _pattern(rng: np.random.Generator, pattern_prob: float) -> str:
    if rng.random() < pattern_prob:
        return str(rng.choice(PATTERNS[1:]))
    return DEFAULT_PATTERN


def _background(rng: np.random.Generator, background_prob: float) -> str:
    if rng.random() < background_prob:
        return str(rng.choice([b for b in BACKGROUNDS if b != DEFAULT_BACKGROUND]))
    return DEFAULT_BACKGROUND


def _single_scene(rng: np.random.Generator, size: int, pattern_prob: float, background: str) -> Scene:
    radius = float(rng.integers(5, 8))
    cx = float(rng.uniform(radius + 1, size - radius - 1))
    cy = float(rng.uniform(radius + 1, size - radius - 1))
    obj = ShapeObject(
        str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), _pattern(rng, pattern_prob), cx, cy, radius
    )
    return Scene(background, (obj,), "single", size=size)


def _pair_positions(rng: np.random.Generator, size: int, relation: str, radius: tuple[float, float]):
    """Centres for two objects so that the first stands in ``relation`` to the second."""
    half = size / 2
    r0, r1 = radius
    # First object in the "first" half along the relation axis, second in the other half, with a
    # gap of at least two pixels between them.
    a0 = float(rng.uniform(r0 + 1, half - r0 - 1))
    a1 = float(rng.uniform(half + r1 + 1, size - r1 - 1))
    b0 = float(rng.uniform(r0 + 1, size - r0 - 1))
    b1 = float(rng.uniform(r1 + 1, size - r1 - 1))
    if relation in ("right of", "below"):
        a0, a1 = size - a0, size - a1
    if relation in ("left of", "right of"):
        return (a0, b0), (a1, b1)
    return (b0, a0), (b1, a1)


def _pair_scene(rng: np.random.Generator, size: int, pattern_prob: float, background: str, category: str) -> Scene:
    colors = rng.choice(list(COLORS), size=2, replace=False)
    shapes = rng.choice(SHAPES, size=2)
    radius = (float(rng.integers(4, 6)), float(rng.integers(4, 6)))
    relation = str(rng.choice(RELATIONS))
    (x0, y0), (x1, y1) = _pair_positions(rng, size, relation, radius)
    objects = (
        ShapeObject(str(shapes[0]), str(colors[0]), _pattern(rng, pattern_prob), x0, y0, radius[0]),
        ShapeObject(str(shapes[1]), str(colors[1]), _pattern(rng, pattern_prob), x1, y1, radius[1]),
    )
    return Scene(background, objects, category, relation=relation if category == "relation" else None, size=size)


def sample_scene(
    rng: np.random.Generator,
    category: str | None = None,
    size: int = IMAGE_SIZE,
    pattern_prob: float = 0.3,
    background_prob: float = 0.3,
    category_probs: tuple[float, float, float] = (0.5, 0.2, 0.3),
) -> Scene:
    """Draw one scene. ``category`` ``None`` draws it with ``category_probs``."""
    if category is None:
        category = str(rng.choice(CATEGORIES, p=np.asarray(category_probs) / sum(category_probs)))
    background = _background(rng, background_prob)
    if category == "single":
        return _single_scene(rng, size, pattern_prob, background)
    if category in ("pair", "relation"):
        return _pair_scene(rng, size, pattern_prob, background, category)
    raise ValueError(f"unknown category {category!r}")


def sample_training_scene(rng: np.random.Generator, **kwargs) -> Scene:
    """Draw a scene whose caption is not held out (rejection sampling)."""
    while True:
        scene = sample_scene(rng, **kwargs)
        if not is_held_out(scene.caption):
            return scene


# ----------------------------------------------------------------------------------------------
# Rendering


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    return xs, ys


def shape_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """Boolean ``(size, size)`` mask of the pixels whose centres fall inside ``obj``."""
    xs, ys = _grid(size)
    dx, dy, r = xs - obj.cx, ys - obj.cy, obj.radius
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "triangle":
        t = (dy + r) / (2 * r)  # 0 at the apex (top), 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(f"unknown shape {obj.shape!r}")


def pattern_mask(pattern: str, size: int) -> np.ndarray:
    """Pixels drawn in the darker tone: vertical stripes (2 px) or 2x2 dots (period 4)."""
    xs, ys = np.mgrid[0:size, 0:size][::-1]
    if pattern == "striped":
        return (xs // 2) % 2 == 1
    if pattern == "dotted":
        return ((xs % 4) >= 2) & ((ys % 4) >= 2)
    return np.zeros((size, size), dtype=bool)


def render(scene: Scene) -> np.ndarray:
    """Render ``scene`` to an ``(H, W, 3)`` uint8 RGB array (no anti-aliasing)."""
    size = scene.size
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        mask = shape_mask(obj, size)
        image[mask] = COLORS[obj.color]
        image[mask & pattern_mask(obj.pattern, size)] = shade(COLORS[obj.color])
    return image


def sample_batch(seed: int, n: int, training: bool = True, **kwargs) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` rendered scenes from ``seed``: images ``(n, H, W, 3)`` uint8, captions, scenes."""
    rng = np.random.default_rng(seed)
    draw = sample_training_scene if training else sample_scene
    scenes = [draw(rng, **kwargs) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3))
    return images, [s.caption for s in scenes], scenes


# ----------------------------------------------------------------------------------------------
# Held-out captions (for evaluation)


def _objects_phrases(pattern_choices: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return list(itertools.product(pattern_choices, COLORS, SHAPES))


def all_captions(category: str) -> list[str]:
    """Every caption of a category (patterns on pair objects limited to solid, to keep it finite)."""
    backgrounds = list(BACKGROUNDS)
    captions: list[str] = []
    if category == "single":
        for (pattern, color, shape), bg in itertools.product(_objects_phrases(PATTERNS), backgrounds):
            scene = Scene(bg, (ShapeObject(shape, color, pattern, 0, 0, 1),), "single")
            captions.append(scene.caption)
        return captions
    relations = RELATIONS if category == "relation" else (None,)
    solid = _objects_phrases((DEFAULT_PATTERN,))
    for (p0, c0, s0), (p1, c1, s1), bg, rel in itertools.product(solid, solid, backgrounds, relations):
        if c0 == c1:
            continue
        objects = (ShapeObject(s0, c0, p0, 0, 0, 1), ShapeObject(s1, c1, p1, 0, 0, 1))
        captions.append(Scene(bg, objects, category, relation=rel).caption)
    return captions


@dataclass(frozen=True)
class Prompt:
    """A held-out evaluation prompt with its target description."""

    caption: str
    category: str
    objects: tuple[tuple[str, str], ...]  # (colour, shape) per object, in caption order
    relation: str | None
    background: str


def parse_caption(caption: str) -> Prompt:
    """Recover the target description from a caption produced by ``caption_for``."""
    text, background = caption, DEFAULT_BACKGROUND
    if " on a " in text and text.endswith(" background"):
        text, bg_part = text.split(" on a ", 1)
        background = bg_part.removesuffix(" background")
    relation, parts = None, [text]
    for rel, phrase in _RELATION_PHRASES.items():
        if f" {phrase} " in text:
            relation, parts = rel, text.split(f" {phrase} ")
            break
    else:
        if " and " in text:
            parts = text.split(" and ")
    objects = tuple((p.split()[-2], p.split()[-1]) for p in parts)
    category = "single" if len(objects) == 1 else ("relation" if relation else "pair")
    return Prompt(caption, category, objects, relation, background)


def held_out_prompts(category: str, n: int, seed: int = 0) -> list[Prompt]:
    """``n`` held-out prompts of ``category``: all distinct while the split has enough, then cycled.

    The order is a seeded permutation, so the first ``n`` are a fixed, reproducible choice.
    """
    captions = sorted(c for c in all_captions(category) if is_held_out(c))
    order = np.random.default_rng(seed).permutation(len(captions))
    chosen = [captions[i] for i in order]
    return [parse_caption(chosen[i % len(chosen)]) for i in range(n)]
