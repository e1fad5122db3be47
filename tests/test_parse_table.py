"""The rule parser on the hand-written table of T2I-CompBench-style prompts (benchmarks/parse_table.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.parse_accuracy import parse_accuracy, summarize
from benchmarks.parse_table import TABLE
from editkit.constraints import parse_rules, parse_spacy


def test_the_table_has_at_least_100_prompts_of_every_style():
    assert len(TABLE) >= 100
    categories = {row[0] for row in TABLE}
    assert {"color", "shape", "texture", "spatial"} <= categories
    spatial = " ".join(row[1] for row in TABLE if row[0] == "spatial")
    for phrase in ("on the top of", "on the bottom of", "on side of", "next to", "near", "on the left of"):
        assert phrase in spatial


@pytest.mark.parametrize(("category", "prompt", "entities", "bindings", "relations"), TABLE, ids=[r[1] for r in TABLE])
def test_rule_parser_reads_the_table(category, prompt, entities, bindings, relations):
    constraints = parse_rules(prompt)
    assert summarize(constraints) == (entities, bindings, relations), constraints.unparsed
    for phrase in constraints.entities:
        assert prompt[phrase.start : phrase.end] == phrase.text
    assert not [u for u in constraints.unparsed if "relation" in u]  # no relation phrase left over


def test_parse_accuracy_counts_failures():
    def wrong_on_spatial(prompt):
        constraints = parse_rules(prompt)
        if constraints.relations:
            constraints.relations = []
        return constraints

    result = parse_accuracy(wrong_on_spatial)
    spatial = sum(1 for row in TABLE if row[4])
    assert result["accuracy"] == pytest.approx(1 - spatial / len(TABLE))
    assert len(result["failures"]) == spatial
    assert parse_accuracy()["accuracy"] == 1.0


class _Chunk(list):
    """A spaCy-like noun chunk: its tokens (``text``, ``idx``, ``dep_``, ``children``) and ``root``."""

    def __init__(self, prompt: str, words: list[tuple[str, str]]):
        tokens, start = [], 0
        for text, dep in words:
            start = prompt.index(text, start)
            tokens.append(SimpleNamespace(text=text, idx=start, dep_=dep, children=[]))
            start += len(text)
        super().__init__(tokens)
        self.root = next(t for t in tokens if t.dep_ == "ROOT")
        self.root.children = [t for t in tokens if t is not self.root]


def test_spacy_path_drops_position_chunks_and_splits_lexicon_compounds():
    """What spaCy returns for T2I-CompBench prompts (chunk "the bottom", compound "gold") is fixed alike."""
    prompt = "a gold clock on the bottom of a school bus"
    chunks = [
        _Chunk(prompt, [("a", "det"), ("gold", "compound"), ("clock", "ROOT")]),
        _Chunk(prompt, [("the", "det"), ("bottom", "ROOT")]),
        _Chunk(prompt, [("a", "det"), ("school", "compound"), ("bus", "ROOT")]),
    ]
    constraints = parse_spacy(prompt, lambda text: SimpleNamespace(noun_chunks=chunks))
    assert summarize(constraints) == ("clock|school bus", "gold>clock", "clock below school bus")
