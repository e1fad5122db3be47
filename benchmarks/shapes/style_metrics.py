"""Scores of a stylized shapes-world image against its content and style (colour, layout, pattern).

- ``colour_distance``: distance of per-channel RGB mean and std (the statistics AdaIN moves).
- ``foreground_mask`` / ``mask_iou``: the pixels that differ from the image's border colour, and
  their IoU with the content's object masks (the content's shape kept, whatever its new colour).
- ``box_iou`` / ``content_box_iou``: the detector's reading of the same: each object detected in the
  content against the best-overlapping output detection of any colour (box IoU), the worst object's.
- ``score_pair``: every figure of one (content, style, output) triple, with the detector's reading
  of the output (background and the main object's pattern) for background and pattern transfer, and
  whether the layout is kept (``layout_kept``); each image is detected once.
- ``summarize``: the benchmarks' figures over many scored pairs (``succeeded``: one pair's success).
- ``stylize_pairs``: the (content, style) pairs every stylize benchmark scores.
"""

from __future__ import annotations

import numpy as np

from benchmarks.shapes.detect import detect
from benchmarks.shapes.world import Scene, sample_batch, shape_mask

#: Summed absolute RGB difference from the border colour above which a pixel is foreground.
FOREGROUND_THRESHOLD = 60.0


Images = tuple[np.ndarray, list[Scene]]  # (n, H, W, 3) uint8 renders and their scenes


def stylize_pairs(n: int, seed_offset: int = 0) -> tuple[Images, Images]:
    """``n`` held-out pairs: ``(contents, their scenes), (styles, their scenes)``. Contents are solid objects
    (seed ``101 + seed_offset``); styles have patterns and non-white backgrounds half of the time (seed
    ``202 + seed_offset``, the world's training mix), so pattern and background transfer can be measured."""
    contents, _, content_scenes = sample_batch(seed=101 + seed_offset, n=n, training=False, pattern_prob=0.0)
    styles, _, style_scenes = sample_batch(seed=202 + seed_offset, n=n, training=False, pattern_prob=0.5,
                                           background_prob=0.5)  # fmt: skip
    return (contents, content_scenes), (styles, style_scenes)


def colour_distance(image: np.ndarray, reference: np.ndarray) -> float:
    """|mean_rgb(a) - mean_rgb(b)| + |std_rgb(a) - std_rgb(b)| over all pixels."""
    a, b = image.reshape(-1, 3).astype(np.float64), reference.reshape(-1, 3).astype(np.float64)
    return float(np.linalg.norm(a.mean(0) - b.mean(0)) + np.linalg.norm(a.std(0) - b.std(0)))


def foreground_mask(image: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Pixels whose colour differs from the median border pixel by more than ``threshold`` (summed RGB)."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    background = np.median(border, axis=0)
    return np.abs(image.astype(np.float64) - background).sum(-1) > threshold


def scene_mask(scene: Scene) -> np.ndarray:
    """Union of the scene's object masks."""
    mask = np.zeros((scene.size, scene.size), dtype=bool)
    for obj in scene.objects:
        mask |= shape_mask(obj, scene.size)
    return mask


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes with exclusive ends (the detector's ``bbox``)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def content_box_iou(content_objects, output_objects) -> float:
    """The lowest, over the content's detections, of the best box IoU with an output detection of any colour
    (0 when the output has none; 1 when the content has none)."""
    best = [max((box_iou(c.bbox, o.bbox) for o in output_objects), default=0.0) for c in content_objects]
    return min(best, default=1.0)


def _main_object(detections, mask: np.ndarray):
    """The detection overlapping ``mask`` most (None when none does)."""
    best, best_overlap = None, 0
    for detection in detections:
        x0, y0, x1, y1 = detection.bbox
        overlap = int(mask[y0:y1, x0:x1].sum())
        if overlap > best_overlap:
            best, best_overlap = detection, overlap
    return best


def score_pair(content: np.ndarray, style: np.ndarray, output: np.ndarray, content_scene: Scene, style_scene: Scene):
    """Colour, shape, background and pattern figures of one stylization (see the module docstring)."""
    to_style, to_content = colour_distance(output, style), colour_distance(output, content)
    before = colour_distance(content, style)
    mask = scene_mask(content_scene)
    content_objects, output_objects = detect(content), detect(output)
    main = _main_object(output_objects, mask)
    style_pattern = style_scene.objects[0].pattern if style_scene.objects else "solid"
    return {
        "palette_nearer_style": float(to_style < to_content),
        "colour_moved_toward_style": float(to_style < before),
        "colour_distance_ratio": to_style / before if before else 1.0,
        "content_mask_iou": mask_iou(foreground_mask(output), mask),
        "content_box_iou": content_box_iou(content_objects, output_objects),
        "layout_kept": layout_kept(content_objects, output_objects),
        "style_pattern": style_pattern,
        "output_pattern": main.pattern if main is not None else "none",
        "background_changed": content_scene.background != style_scene.background,
        "background_transferred": _background_of(output) == style_scene.background,
        "distances": (before, to_style),
    }


def layout_kept(content_objects, output_objects, tolerance: float = 4.0) -> bool:
    """Every object detected in the content has an output detection (any colour) within ``tolerance`` px."""
    return all(
        any(np.hypot(o.centroid[0] - c.centroid[0], o.centroid[1] - c.centroid[1]) <= tolerance for o in output_objects)
        for c in content_objects
    )


def succeeded(score: dict, iou: str = "content_mask_iou") -> bool:
    """Colour moved toward the style and the content kept (``iou`` >= 0.7: the mask's, or the detector boxes')."""
    return score["colour_moved_toward_style"] > 0 and score[iou] >= 0.7


def summarize(scores: list[dict]) -> dict:
    """The stylize benchmarks' figures over ``score_pair`` rows (fractions of pairs, means, medians)."""
    patterned = [s for s in scores if s["style_pattern"] != "solid"]
    new_background = [s for s in scores if s["background_changed"]]
    mean = lambda key, rows: float(np.mean([r[key] for r in rows])) if rows else None  # noqa: E731
    return {
        "layout_kept": mean("layout_kept", scores),
        "palette_nearer_style_than_content": mean("palette_nearer_style", scores),
        "colour_moved_toward_style": mean("colour_moved_toward_style", scores),
        "mean_colour_distance_content_to_style": float(np.mean([s["distances"][0] for s in scores])),
        "mean_colour_distance_output_to_style": float(np.mean([s["distances"][1] for s in scores])),
        "median_colour_distance_ratio": float(np.median([s["colour_distance_ratio"] for s in scores])),
        "content_mask_iou_mean": mean("content_mask_iou", scores),
        "content_mask_iou_at_least_0.7": float(np.mean([s["content_mask_iou"] >= 0.7 for s in scores])),
        "content_box_iou_mean": mean("content_box_iou", scores),
        "content_box_iou_at_least_0.7": float(np.mean([s["content_box_iou"] >= 0.7 for s in scores])),
        "success_moved_and_iou_0.7": float(np.mean([succeeded(s, "content_mask_iou") for s in scores])),
        "success_moved_and_box_iou_0.7": float(np.mean([succeeded(s, "content_box_iou") for s in scores])),
        "background_transferred": mean("background_transferred", new_background),
        "background_pairs": len(new_background),
        "pattern_transferred": float(np.mean([s["output_pattern"] not in ("solid", "none") for s in patterned]))
        if patterned
        else None,
        "pattern_pairs": len(patterned),
    }


def _background_of(image: np.ndarray) -> str:
    from benchmarks.shapes.detect import build_palette, detect_background

    return detect_background(image[None], build_palette())[0]
