"""Constraint parsing, user constraints and word -> token alignment (T2I-CompBench-style prompts)."""

from __future__ import annotations

import json

import pytest

from editkit.constraints import (
    Phrase,
    align,
    constraints_from_dict,
    load_constraints,
    parse_prompt,
    parse_rules,
    token_indices,
)
from editkit.errors import InputError
from editkit.testing import tiny_tokenizer

# prompt, entities, "attribute>entity" bindings, "subject relation object" relations, has unparsed parts
TABLE = [
    # colour
    ("a red car and a blue bird", ["car", "bird"], ["red>car", "blue>bird"], [], False),
    ("A green bench and a red car", ["bench", "car"], ["green>bench", "red>car"], [], False),
    (
        "a blue backpack and a yellow umbrella",
        ["backpack", "umbrella"],
        ["blue>backpack", "yellow>umbrella"],
        [],
        False,
    ),
    ("a pink cake, a white plate", ["cake", "plate"], ["pink>cake", "white>plate"], [], False),
    ("a brown teddy bear and a black cat", ["teddy bear", "cat"], ["brown>teddy bear", "black>cat"], [], False),
    (
        "an orange traffic light and a purple fire hydrant",
        ["traffic light", "fire hydrant"],
        ["orange>traffic light", "purple>fire hydrant"],
        [],
        False,
    ),
    ("a red apple", ["apple"], ["red>apple"], [], False),
    ("the gray elephant and the golden crown", ["elephant", "crown"], ["gray>elephant", "golden>crown"], [], False),
    ("a red car and a red bus", ["car", "bus"], ["red>car", "red>bus"], [], False),
    (
        "a big red car with a small blue bird",
        ["car", "bird"],
        ["big>car", "red>car", "small>bird", "blue>bird"],
        [],
        False,
    ),
    # shape
    ("a round clock and a square table", ["clock", "table"], ["round>clock", "square>table"], [], False),
    ("a triangular sign and an oval mirror", ["sign", "mirror"], ["triangular>sign", "oval>mirror"], [], False),
    ("a rectangular box and a circular plate", ["box", "plate"], ["rectangular>box", "circular>plate"], [], False),
    ("a red square and a blue circle", ["square", "circle"], ["red>square", "blue>circle"], [], False),
    ("a cubic block and a spherical ball", ["block", "ball"], ["cubic>block", "spherical>ball"], [], False),
    # texture
    ("a wooden chair and a metallic lamp", ["chair", "lamp"], ["wooden>chair", "metallic>lamp"], [], False),
    ("a fluffy towel and a glass cup", ["towel", "cup"], ["fluffy>towel", "glass>cup"], [], False),
    ("a leather bag and a plastic bottle", ["bag", "bottle"], ["leather>bag", "plastic>bottle"], [], False),
    ("a rubber duck and a marble statue", ["duck", "statue"], ["rubber>duck", "marble>statue"], [], False),
    ("a striped shirt and a dotted tie", ["shirt", "tie"], ["striped>shirt", "dotted>tie"], [], False),
    # spatial
    ("a cat on the left of a dog", ["cat", "dog"], [], ["cat left dog"], False),
    ("a cat to the right of a dog", ["cat", "dog"], [], ["cat right dog"], False),
    ("a bird on top of a car", ["bird", "car"], [], ["bird above car"], False),
    ("a lamp above a sofa", ["lamp", "sofa"], [], ["lamp above sofa"], False),
    ("a ball below a table", ["ball", "table"], [], ["ball below table"], False),
    ("a green bench under a tree", ["bench", "tree"], ["green>bench"], ["bench below tree"], False),
    ("a dog next to a chair", ["dog", "chair"], [], ["dog near chair"], False),
    ("a vase on the right of a teddy bear", ["vase", "teddy bear"], [], ["vase right teddy bear"], False),
    ("a horse beneath a kite", ["horse", "kite"], [], ["horse below kite"], False),
    ("a mouse on the left side of a keyboard", ["mouse", "keyboard"], [], ["mouse left keyboard"], False),
    ("a cup on a table", ["cup", "table"], [], ["cup above table"], False),
    (
        "a red circle to the left of a blue square",
        ["circle", "square"],
        ["red>circle", "blue>square"],
        ["circle left square"],
        False,
    ),
    (
        "a yellow triangle below a purple circle on a gray background",
        ["triangle", "circle"],
        ["yellow>triangle", "purple>circle"],
        ["triangle below circle"],
        True,
    ),
    # complex / reported
    ("a dog chasing a cat", ["dog", "cat"], [], [], True),
    ("a car in front of a house", ["car", "house"], [], [], True),
    ("a cat behind a sofa", ["cat", "sofa"], [], [], True),
    ("two dogs and a red ball", ["dogs", "ball"], ["red>ball"], [], True),
    ("a red and blue car", ["car"], ["blue>car"], [], True),
    (
        "a black cat sitting on a wooden chair",
        ["cat", "chair"],
        ["black>cat", "wooden>chair"],
        ["cat above chair"],
        True,
    ),
    (
        "a white horse and a brown dog next to a red barn",
        ["horse", "dog", "barn"],
        ["white>horse", "brown>dog", "red>barn"],
        ["dog near barn"],
        False,
    ),
    (
        "a tall giraffe above a small turtle, a green frog",
        ["giraffe", "turtle", "frog"],
        ["tall>giraffe", "small>turtle", "green>frog"],
        ["giraffe above turtle"],
        False,
    ),
    ("a photo", [], [], [], True),
]


def _summary(constraints):
    return (
        [e.text for e in constraints.entities],
        [f"{b.attribute.text}>{b.entity.text}" for b in constraints.bindings],
        [f"{r.subject.text} {r.relation} {r.object.text}" for r in constraints.relations],
        bool(constraints.unparsed),
    )


def test_table_has_enough_prompts():
    assert len(TABLE) >= 40


@pytest.mark.parametrize(("prompt", "entities", "bindings", "relations", "unparsed"), TABLE)
def test_rule_parser(prompt, entities, bindings, relations, unparsed):
    constraints = parse_rules(prompt)
    assert _summary(constraints) == (entities, bindings, relations, unparsed), constraints.unparsed
    for phrase in constraints.entities:  # spans point at the prompt's own text
        assert prompt[phrase.start : phrase.end] == phrase.text


def test_parse_prompt_auto_falls_back_to_rules_without_spacy():
    assert parse_prompt("a red car").source in ("rules", "spacy")
    with pytest.raises(InputError, match="unknown constraint parser"):
        parse_prompt("a red car", parser="llm")


def _words_of(tokenizer, prompt, indices):
    ids = tokenizer(prompt).input_ids
    return tokenizer.decode([ids[i] for i in indices]).replace(" ", "")


@pytest.mark.parametrize(("prompt", "entities", "bindings", "relations", "unparsed"), TABLE)
def test_alignment_covers_every_token_of_each_phrase(prompt, entities, bindings, relations, unparsed):
    # whole-word merges for half of the words only: the rest are multi-piece (one token per character)
    words = sorted({w.lower() for w in prompt.replace(",", " ").split()})
    tokenizer = tiny_tokenizer(words[::2])
    constraints = parse_rules(prompt)
    aligned = align(constraints, tokenizer)
    assert aligned.names == entities
    for name, tokens in zip(aligned.names, aligned.entities):
        assert _words_of(tokenizer, prompt, tokens) == name.lower().replace(" ", "")
        assert tokens == list(range(tokens[0], tokens[-1] + 1))  # contiguous, all pieces
    for tokens, _entity, attribute in aligned.bindings:
        assert _words_of(tokenizer, prompt, tokens) == attribute.lower()
    assert aligned.last_token == len(tokenizer(prompt).input_ids) - 2


def test_repeated_words_keep_their_occurrence():
    prompt = "a red car and a red bus"
    tokenizer = tiny_tokenizer(["red", "car", "and", "bus"])
    aligned = align(parse_rules(prompt), tokenizer)
    (red_car, car, _), (red_bus, bus, _) = aligned.bindings
    assert red_car != red_bus and aligned.names == ["car", "bus"]
    assert red_car[0] < aligned.entities[car][0] < red_bus[0] < aligned.entities[bus][0]
    # a user word without an occurrence means every occurrence: both "red" tokens
    user = constraints_from_dict({"attributes": [{"attribute": "red", "entity": "car"}]}, prompt)
    ((tokens, _, _),) = align(user, tokenizer).bindings
    assert tokens == sorted(red_car + red_bus)


def test_token_indices_overlap_rule():
    offsets = [(0, 1), (2, 5), (5, 7), (8, 11)]  # "a", "tedd", "y", "bear"
    assert token_indices(offsets, [(2, 11)]) == [2, 3, 4]
    assert token_indices(offsets, [(0, 1)]) == [1]


def test_user_constraints_override_and_validate(tmp_path):
    prompt = "a red car and a blue car"
    data = {
        "entities": [{"text": "car", "occurrence": 1}],
        "attributes": [{"attribute": "blue", "entity": {"text": "car", "occurrence": 1}}],
        "relations": [
            {
                "subject": {"text": "car", "occurrence": 0},
                "relation": "left",
                "object": {"text": "car", "occurrence": 1},
            }
        ],
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    constraints = load_constraints(path, prompt)
    assert constraints.source == "user"
    assert constraints.entities == [Phrase("car", 21), Phrase("car", 6)]
    assert constraints.relations[0].relation == "left"
    bad = [
        ({"entities": ["boat"]}, "does not occur"),
        ({"objects": []}, "keys entities"),
        ({"relations": [{"subject": "car", "relation": "inside", "object": "car"}]}, "not one of"),
        ({"attributes": [{"attribute": "red"}]}, "exactly the keys"),
        ({"entities": [{"text": "car", "occurrence": 5}]}, "occurrence must be"),
        ({"entities": "car"}, "must be a list"),
    ]
    for data, message in bad:
        with pytest.raises(InputError, match=message):
            constraints_from_dict(data, prompt)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_constraints(path, prompt)
    with pytest.raises(InputError, match="does not exist"):
        load_constraints(tmp_path / "missing.json", prompt)


def test_phrases_beyond_the_window_are_dropped_and_reported():
    prompt = "a red car " + "and a tree " * 30 + "and a blue bird"
    tokenizer = tiny_tokenizer(["red", "car", "and", "tree", "blue", "bird"])
    aligned = align(parse_rules(prompt), tokenizer)
    assert "bird" not in aligned.names and aligned.names[0] == "car"
    assert any("bird" in d for d in aligned.dropped) and any("blue" in d for d in aligned.dropped)
    assert aligned.last_token == tokenizer.model_max_length - 2
