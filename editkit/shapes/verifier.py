"""The shapes world's deterministic detector as a compose verifier (``verifier="shapes"``).

For ``assets/models/shapes-sd``: each constraint is checked on the generated image by
:func:`editkit.shapes.detect.detect` (no learned weights): an entity holds when an object of
its shape is found, an attribute when that object has the colour or pattern, a relation when
the objects' centroids stand in the stated direction. Words outside the world (a "dog", a
"wooden" square) cannot be detected: their constraints fail with a note saying why.

The benchmark (``benchmarks/compose.py``) scores images with the same detector, so choosing
the better stage with this verifier selects by the evaluation metric itself (as the paper's
BLIP-VQA verifier does for T2I-CompBench's attribute metric); its "refined" column is not
affected by that.
"""

from __future__ import annotations

import numpy as np
import torch

from editkit.constraints import AlignedConstraints
from editkit.shapes.detect import MIN_AREA, Detection, detect
from editkit.shapes.palette import COLORS, PATTERNS, SHAPES
from editkit.verifiers import ConstraintStatus, Verifier, descriptions

__all__ = ["ShapesVerifier"]

NOT_AN_OBJECT = f"not a shapes-world object (the detector knows {', '.join(SHAPES)})"
NOT_AN_ATTRIBUTE = "not a shapes-world colour or pattern"


def _features(detection: Detection) -> set[str]:
    return {detection.shape, detection.color, detection.pattern}


def _match(detections: list[Detection], aligned: AlignedConstraints) -> list[Detection | None]:
    """One detection per entity: of the entity's shape, the one with most of its attributes (then the largest)."""
    wanted = [set() for _ in aligned.names]
    for _, entity, attribute in aligned.bindings:
        wanted[entity].add(attribute.lower())
    free, matches = list(detections), []
    for name, attributes in zip(aligned.names, wanted):
        noun = name.lower().split()[-1]
        candidates = [d for d in free if d.shape == noun]
        best = max(candidates, key=lambda d: (len(attributes & _features(d)), d.area), default=None)
        if best is not None:
            free.remove(best)
        matches.append(best)
    return matches


def _relation_margin(subject: Detection, obj: Detection, relation: str, size: int, near: float) -> float:
    """How well the centroids satisfy ``relation``, in image sides: > 0 holds (y grows downwards)."""
    (xs, ys), (xo, yo) = subject.centroid, obj.centroid
    if relation == "near":
        return near - ((xs - xo) ** 2 + (ys - yo) ** 2) ** 0.5 / size
    return {"left": xo - xs, "right": xs - xo, "above": yo - ys, "below": ys - yo}[relation] / size


class ShapesVerifier(Verifier):
    """Constraint checks by the shapes world's detector.

    Args:
        threshold: entities and attributes score 1 (found) or 0; they hold at ``threshold``.
        near_distance: ``near`` holds when the centroids are closer than this fraction of the side.
        min_area: the detector's smallest object, in pixels.
    """

    name = "shapes"

    def __init__(self, threshold: float = 0.5, near_distance: float = 0.35, min_area: int = MIN_AREA):
        self.threshold = threshold
        self.near_distance = near_distance
        self.min_area = min_area

    def verify(self, image, aligned: AlignedConstraints, maps: torch.Tensor | None) -> list[ConstraintStatus]:
        pixels = np.asarray(image.convert("RGB"))
        matches = _match(detect(pixels, min_area=self.min_area), aligned)
        return [self._status(row, matches, aligned, pixels.shape[1]) for row in descriptions(aligned)]

    def _status(self, row, matches, aligned, size: int) -> ConstraintStatus:
        kind, text, involved, detail = row
        found = [matches[i] for i in involved]
        note, threshold = "", 0.0 if kind == "relation" else self.threshold
        if any(aligned.names[i].lower().split()[-1] not in SHAPES for i in involved):
            score, note = (-1.0 if kind == "relation" else 0.0), NOT_AN_OBJECT
        elif kind == "entity":
            score = float(found[0] is not None)
        elif kind == "attribute":
            attribute = text[: -len(aligned.names[involved[0]])].strip().lower()
            if attribute not in COLORS and attribute not in PATTERNS:
                score, note = 0.0, NOT_AN_ATTRIBUTE
            else:
                score = float(found[0] is not None and attribute in _features(found[0]))
        elif None in found:
            score = -1.0
        else:
            score = _relation_margin(found[0], found[1], detail, size, self.near_distance)
        satisfied = score > threshold if kind == "relation" else score >= threshold
        return ConstraintStatus(kind, text, satisfied, score, involved, threshold, self.name, note)
