"""The shapes verifier on clean renders of the shapes world (the detector is exact on them)."""

from __future__ import annotations

from PIL import Image

from benchmarks.shapes.world import Scene, ShapeObject, render
from editkit.constraints import align, parse_rules
from editkit.shapes.verifier import NOT_AN_OBJECT, ShapesVerifier
from editkit.testing import tiny_tokenizer
from editkit.verifiers import make_verifier

WORDS = [
    "a",
    "red",
    "blue",
    "purple",
    "circle",
    "square",
    "triangle",
    "dog",
    "moon",
    "to",
    "the",
    "left",
    "of",
    "on",
    "and",
    "striped",
]


def _image(*objects: tuple[str, str, float, float], pattern: str = "solid") -> Image.Image:
    shapes = tuple(ShapeObject(shape, color, pattern, cx, cy, 6.0) for shape, color, cx, cy in objects)
    return Image.fromarray(render(Scene("white", shapes, "pair")))


def _verdicts(prompt: str, image: Image.Image) -> dict[str, tuple[bool, float, str]]:
    aligned = align(parse_rules(prompt), tiny_tokenizer(WORDS))
    statuses = ShapesVerifier().verify(image, aligned, None)
    assert all(s.verifier == "shapes" and s.threshold is not None for s in statuses)
    return {f"{s.kind} {s.description}": (s.satisfied, s.score, s.note) for s in statuses}


def test_a_scene_drawn_right_passes_every_constraint():
    image = _image(("circle", "red", 8, 16), ("square", "blue", 24, 16))
    verdicts = _verdicts("a red circle to the left of a blue square", image)
    assert {k: v[0] for k, v in verdicts.items()} == {
        "entity circle": True,
        "entity square": True,
        "attribute red circle": True,
        "attribute blue square": True,
        "relation circle left square": True,
    }
    assert verdicts["relation circle left square"][1] > 0.4  # centroids 16 px apart on a 32 px side


def test_wrong_colours_and_relations_fail():
    image = _image(("circle", "blue", 24, 16), ("square", "red", 8, 16))
    verdicts = _verdicts("a red circle to the left of a blue square", image)
    assert verdicts["entity circle"][0] and verdicts["entity square"][0]
    assert not verdicts["attribute red circle"][0] and not verdicts["attribute blue square"][0]
    assert not verdicts["relation circle left square"][0] and verdicts["relation circle left square"][1] < 0


def test_objects_outside_the_world_fail_with_a_note():
    image = _image(("circle", "purple", 16, 16))
    verdicts = _verdicts("a purple dog on the moon", image)
    assert verdicts["entity dog"] == (False, 0.0, NOT_AN_OBJECT)
    assert not verdicts["attribute purple dog"][0] and not verdicts["relation dog above moon"][0]


def test_two_objects_of_one_shape_are_told_apart_by_their_attributes():
    image = _image(("circle", "red", 24, 16), ("circle", "blue", 8, 16))
    verdicts = _verdicts("a blue circle to the left of a red circle", image)
    assert all(v[0] for v in verdicts.values()), verdicts


def test_faulty_entities_and_factory():
    image = _image(("circle", "red", 8, 16))
    aligned = align(parse_rules("a red circle and a blue square"), tiny_tokenizer(WORDS))
    verifier = make_verifier("shapes")
    statuses = verifier.verify(image, aligned, None)
    assert isinstance(verifier, ShapesVerifier) and not verifier.heuristic
    assert verifier.faulty_entities(statuses) == [1]  # the square is missing
