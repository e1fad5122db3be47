"""A deterministic detector for the shapes world (no learned weights).

The image's background is the background colour nearest to the median border pixel. Foreground
pixels are those closer to some object tone (a colour or its darker pattern tone) than to that
background. Foreground pixels are grouped into 4-connected components by a vectorised label
propagation over the whole batch; each component of at least ``MIN_AREA`` pixels is an object:

- colour: majority vote of its pixels' nearest tones (dark tones count for their colour);
- shape: from the fill ratio ``ink / bbox area`` (square ~1, circle ~pi/4, triangle ~1/2), where
  ink weighs each pixel of the component and its 1-px ring by its distance from the background
  relative to its nearest tone, so blur that rounds the binary mask barely moves it;
- pattern: from the fraction of dark-tone pixels and whether the dark pixels run vertically
  (stripes) or come in 2x2 dots.

On clean renders this recovers every object exactly; on generated images nearest-colour
classification, the majority colour vote, the ink-based fill ratio and the minimum area make it
degrade gracefully.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from editkit.shapes.palette import BACKGROUNDS, COLORS, shade

#: Components smaller than this many pixels are ignored.
MIN_AREA = 8
#: Fill-ratio thresholds: below ``TRIANGLE_MAX`` triangle, above ``SQUARE_MIN`` square.
TRIANGLE_MAX = 0.7
SQUARE_MIN = 0.93
#: Fraction of dark-tone pixels below which an object is solid.
SOLID_MAX_DARK = 0.12
#: Vertical agreement of dark pixels above which a patterned object is striped (dots give ~0.5).
STRIPES_MIN_AGREEMENT = 0.75


@dataclass(frozen=True)
class Detection:
    """One detected object. ``bbox`` is ``(x0, y0, x1, y1)`` with exclusive ends, in pixels."""

    color: str
    shape: str
    pattern: str
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    fill_ratio: float


@dataclass(frozen=True)
class Palette:
    """The colours pixels are classified to and what each entry means."""

    rgb: np.ndarray  # (P, 3) float32
    color_index: np.ndarray  # (P,) object colour index, -1 for background/edge entries
    dark: np.ndarray  # (P,) bool, dark pattern tone
    background_index: np.ndarray  # (P,) background index, -1 otherwise
    color_names: tuple[str, ...]
    background_names: tuple[str, ...]


def build_palette() -> Palette:
    """The fixed palette: backgrounds, colours, dark tones and colour/background blends."""
    color_names, background_names = tuple(COLORS), tuple(BACKGROUNDS)
    rgb, color_index, dark, background_index = [], [], [], []
    for b, name in enumerate(background_names):
        rgb.append(BACKGROUNDS[name]), color_index.append(-1), dark.append(False), background_index.append(b)
    for c, name in enumerate(color_names):
        for tone, is_dark in ((COLORS[name], False), (shade(COLORS[name]), True)):
            rgb.append(tone), color_index.append(c), dark.append(is_dark), background_index.append(-1)
    for name in color_names:
        for tone in (COLORS[name], shade(COLORS[name])):
            for bg in background_names:
                blend = tuple((np.asarray(tone) + np.asarray(BACKGROUNDS[bg])) / 2)
                rgb.append(blend), color_index.append(-1), dark.append(False), background_index.append(-1)
    return Palette(
        np.asarray(rgb, dtype=np.float32),
        np.asarray(color_index),
        np.asarray(dark),
        np.asarray(background_index),
        color_names,
        background_names,
    )


def classify_pixels(images: np.ndarray, palette: Palette) -> np.ndarray:
    """Nearest palette entry per pixel: ``(N, H, W, 3)`` RGB (0-255) -> ``(N, H, W)`` int.

    Pixels are rounded to uint8 and each distinct colour is classified once.
    """
    rgb = np.clip(np.round(images), 0, 255).astype(np.uint32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    colors, inverse = np.unique(packed, return_inverse=True)
    unique = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=1).astype(np.float32)
    dist = ((unique[:, None, :] - palette.rgb[None]) ** 2).sum(-1)
    return dist.argmin(1)[inverse.reshape(-1)].reshape(images.shape[:-1])


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[..., y, x] = a[..., y + dy, x + dx]`` with ``fill`` outside."""
    out = np.full_like(a, fill)
    h, w = a.shape[-2:]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = a[..., ys, xs]
    return out


def connected_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class, batched: ``(N, H, W)`` -> labels.

    Labels are flat pixel indices (unique over the batch); pixels with class < 0 get -1.
    """
    big = np.iinfo(np.int64).max
    labels = np.where(classes >= 0, np.arange(classes.size).reshape(classes.shape), big)
    neighbours = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    same = [(_shift(classes, dy, dx, -2) == classes) & (classes >= 0) for dy, dx in neighbours]
    while True:
        new = labels
        for (dy, dx), ok in zip(neighbours, same):
            new = np.where(ok, np.minimum(new, _shift(labels, dy, dx, big)), new)
        # Pointer jumping: follow each label to its own label, which shortens long chains.
        valid = new != big
        new[valid] = new.reshape(-1)[new[valid]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(labels == big, -1, labels)


def _component_stats(labels: np.ndarray, dark: np.ndarray) -> dict[str, np.ndarray]:
    """Per-component sums over the batch, indexed by label (``bincount`` over flat labels)."""
    n = labels.size
    flat = labels.reshape(-1)
    inside = flat >= 0
    idx = flat[inside]
    h, w = labels.shape[-2:]
    ys, xs = np.mgrid[0:h, 0:w]
    ys = np.broadcast_to(ys, labels.shape).reshape(-1)[inside]
    xs = np.broadcast_to(xs, labels.shape).reshape(-1)[inside]
    dk = dark.reshape(-1)[inside]
    stats = {
        "area": np.bincount(idx, minlength=n),
        "sum_x": np.bincount(idx, weights=xs + 0.5, minlength=n),
        "sum_y": np.bincount(idx, weights=ys + 0.5, minlength=n),
        "dark": np.bincount(idx, weights=dk, minlength=n),
    }
    for name, values, op, init in (
        ("x0", xs, np.minimum, w),
        ("y0", ys, np.minimum, h),
        ("x1", xs + 1, np.maximum, 0),
        ("y1", ys + 1, np.maximum, 0),
    ):
        acc = np.full(n, init, dtype=np.int64)
        op.at(acc, idx, values)
        stats[name] = acc
    # Vertical agreement of dark pixels: dark pixels' vertical neighbours in the same component.
    pairs = np.zeros(n)
    agree = np.zeros(n)
    for dy in (1, -1):
        nb_label = _shift(labels, dy, 0, -1)
        nb_dark = _shift(dark, dy, 0, False)
        ok = (labels >= 0) & dark & (nb_label == labels)
        pairs += np.bincount(labels[ok], minlength=n)
        agree += np.bincount(labels[ok & nb_dark], minlength=n)
    stats["pairs"], stats["agree"] = pairs, agree
    return stats


def _shape_name(fill_ratio: float) -> str:
    if fill_ratio < TRIANGLE_MAX:
        return "triangle"
    return "square" if fill_ratio >= SQUARE_MIN else "circle"


def _pattern_name(dark_fraction: float, agreement: float) -> str:
    if dark_fraction < SOLID_MAX_DARK:
        return "solid"
    return "striped" if agreement >= STRIPES_MIN_AGREEMENT else "dotted"


def detect_background(images: np.ndarray, palette: Palette) -> list[str]:
    """Background name per image: the nearest background colour to the median border pixel."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1).astype(np.float32)
    median = np.median(border, axis=1)
    bgs = np.asarray([BACKGROUNDS[b] for b in palette.background_names], dtype=np.float32)
    nearest = ((median[:, None] - bgs[None]) ** 2).sum(-1).argmin(1)
    return [palette.background_names[i] for i in nearest]


def _tone_distances(images: np.ndarray, palette: Palette, backgrounds: list[str]):
    """Per pixel: nearest object tone (palette index), its distance, and the distance to the
    image's background colour."""
    pixels = images.astype(np.float32)
    tones = np.flatnonzero(palette.color_index >= 0)
    d_tone = np.sqrt(((pixels[..., None, :] - palette.rgb[tones]) ** 2).sum(-1))
    bg_rgb = np.asarray([BACKGROUNDS[b] for b in backgrounds], dtype=np.float32)[:, None, None, :]
    d_bg = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1))
    nearest = d_tone.argmin(-1)
    return tones[nearest], np.take_along_axis(d_tone, nearest[..., None], -1)[..., 0], d_bg


def _soft_area(labels: np.ndarray, weights: np.ndarray, root: int, box: tuple[int, int, int, int]) -> float:
    """Ink of a component: foreground weights (see ``detect_batch``) over it and its 1-px ring.

    Blur moves colour across the edge but keeps the total, so this is close to the drawn area even
    when the binary mask is eroded or rounded; on clean renders it equals the pixel count.
    """
    h, w = labels.shape
    x0, y0, x1, y1 = box
    ya, yb, xa, xb = max(y0 - 1, 0), min(y1 + 1, h), max(x0 - 1, 0), min(x1 + 1, w)
    crop, weights = labels[ya:yb, xa:xb], weights[ya:yb, xa:xb]
    comp = crop == root
    grown = comp.copy()
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        grown |= _shift(comp, dy, dx, False)
    ring = grown & ~comp & (crop < 0)
    return float(weights[comp].sum() + weights[ring].sum())


def detect_batch(images: np.ndarray, min_area: int = MIN_AREA, palette: Palette | None = None) -> list[list[Detection]]:
    """Detect objects in ``(N, H, W, 3)`` RGB images; per image, objects sorted by area (largest first).

    Foreground: pixels closer to some object tone than to the image's background colour. Objects:
    4-connected foreground components of at least ``min_area`` pixels; colour by majority vote of
    the pixels' nearest tones; shape from the blur-tolerant fill ratio (``_soft_area``).
    """
    palette = palette or build_palette()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    backgrounds = detect_background(images, palette)
    tone, d_tone, d_bg = _tone_distances(images, palette, backgrounds)
    foreground = d_tone < d_bg
    # Foreground weight: how far a pixel is from the background, relative to its nearest tone.
    bg_rgb = np.asarray([BACKGROUNDS[b] for b in backgrounds], dtype=np.float32)[:, None, None, :]
    tone_to_bg = np.sqrt(((palette.rgb[tone] - bg_rgb) ** 2).sum(-1))
    weights = np.clip(d_bg / np.maximum(tone_to_bg, 1e-6), 0, 1)
    colors = np.where(foreground, palette.color_index[tone], -1)
    dark = foreground & palette.dark[tone]
    labels = connected_components(np.where(foreground, 0, -1))
    stats = _component_stats(labels, dark)
    roots = np.flatnonzero(stats["area"] >= min_area)
    flat_labels, flat_colors = labels.reshape(-1), colors.reshape(-1)
    order = np.argsort(flat_labels, kind="stable")
    bounds = np.searchsorted(flat_labels[order], np.stack([roots, roots + 1]))
    per_image: list[list[Detection]] = [[] for _ in range(images.shape[0])]
    pixels_per_image = labels[0].size
    for root, lo, hi in zip(roots, bounds[0], bounds[1]):
        image_index = int(root) // pixels_per_image
        area = int(stats["area"][root])
        box = tuple(int(stats[k][root]) for k in ("x0", "y0", "x1", "y1"))
        x0, y0, x1, y1 = box
        fill = _soft_area(labels[image_index], weights[image_index], root, box) / float((x1 - x0) * (y1 - y0))
        votes = np.bincount(flat_colors[order[lo:hi]], minlength=len(palette.color_names))
        pairs = stats["pairs"][root]
        agreement = float(stats["agree"][root] / pairs) if pairs else 0.0
        per_image[image_index].append(
            Detection(
                color=palette.color_names[int(votes.argmax())],
                shape=_shape_name(fill),
                pattern=_pattern_name(float(stats["dark"][root]) / area, agreement),
                bbox=(x0, y0, x1, y1),
                centroid=(float(stats["sum_x"][root] / area), float(stats["sum_y"][root] / area)),
                area=area,
                fill_ratio=fill,
            )
        )
    for detections in per_image:
        detections.sort(key=lambda d: -d.area)
    return per_image


def detect(image: np.ndarray, min_area: int = MIN_AREA) -> list[Detection]:
    """Detect objects in one ``(H, W, 3)`` RGB image."""
    return detect_batch(image[None], min_area=min_area)[0]
