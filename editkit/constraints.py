"""Compositional constraints of a prompt: schema, parsers, and word -> token-index alignment.

A prompt such as ``"a red car on the left of a blue bird"`` yields entities (``car``, ``bird``),
attribute bindings (``red -> car``, ``blue -> bird``) and spatial relations
(``car left bird``). Every phrase is a character span of the prompt, so repeated words keep
their identity; :func:`align` maps each span to ALL of its tokens with the tokenizer's offsets
(multi-piece words), +1 for the start-of-text token.

Sources, in order of precedence: constraints given by the user (Python objects or JSON,
:func:`constraints_from_dict`), the optional spaCy parser (used when spaCy and an English model
are installed), the built-in rule-based parser (:func:`parse_rules`). Nothing is dropped
silently: what a parser could not turn into a constraint is listed in ``Constraints.unparsed``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editkit.errors import InputError
from editkit.lexicon import (
    ARTICLES,
    ATTRIBUTES,
    COLORS,
    COPULAS,
    COUNTS,
    RELATION_PHRASES,
    RELATION_WORDS,
    SCENE_WORDS,
    SEPARATORS,
)

__all__ = [
    "AlignedConstraints",
    "Binding",
    "Constraints",
    "Phrase",
    "Relation",
    "align",
    "align_offsets",
    "constraints_from_dict",
    "load_constraints",
    "parse_prompt",
    "parse_rules",
    "parse_spacy",
]

logger = logging.getLogger(__name__)

#: Most distinct constraints (entities + attributes + relations) accepted from a user.
MAX_CONSTRAINTS = 64
#: Most entries read from user constraints before deduplication.
MAX_CONSTRAINT_ITEMS = 1024
RELATIONS = ("left", "right", "above", "below", "near")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[,;]")


@dataclass(frozen=True)
class Phrase:
    """A phrase of the prompt: its text and character ``start`` (``None``: every occurrence)."""

    text: str
    start: int | None = None

    @property
    def end(self) -> int | None:
        return None if self.start is None else self.start + len(self.text)


@dataclass(frozen=True)
class Binding:
    """An attribute phrase (``red``) that must describe an entity phrase (``car``)."""

    attribute: Phrase
    entity: Phrase


@dataclass(frozen=True)
class Relation:
    """``subject`` stands ``relation`` (left/right/above/below/near) of ``object``."""

    subject: Phrase
    relation: str
    object: Phrase


@dataclass
class Constraints:
    """What a prompt asks for; ``unparsed`` lists the parts no constraint covers, with a reason."""

    prompt: str
    entities: list[Phrase] = field(default_factory=list)
    bindings: list[Binding] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    source: str = "rules"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form accepted by :func:`constraints_from_dict`."""
        return {
            "entities": [p.text for p in self.entities],
            "attributes": [{"attribute": b.attribute.text, "entity": b.entity.text} for b in self.bindings],
            "relations": [
                {"subject": r.subject.text, "relation": r.relation, "object": r.object.text} for r in self.relations
            ],
        }


# -- rule-based parser --------------------------------------------------------------------------
def _words(prompt: str) -> list[tuple[str, int]]:
    return [(m.group(0), m.start()) for m in _WORD.finditer(prompt)]


def _match_relation(words: list[tuple[str, int]], index: int) -> tuple[str, int] | None:
    """The relation phrase starting at word ``index``: (relation, number of words)."""
    for phrase, relation in RELATION_PHRASES:
        parts = phrase.split()
        window = [w.lower() for w, _ in words[index : index + len(parts)]]
        if window == parts:
            return relation, len(parts)
    return None


def _has_noun(segment: list[tuple[str, int]]) -> bool:
    """Whether a segment already holds a word that can head a noun phrase (not an article or attribute)."""
    return any(w.lower() not in ARTICLES and w.lower() not in ATTRIBUTES for w, _ in segment)


def _is_verb(words: list[tuple[str, int]], index: int, segment: list) -> bool:
    """A gerund after a noun, before a noun phrase ("a dog chasing a cat"): a non-spatial relation.

    Without a noun before it the -ing word is the noun itself ("a painting on the right of a pig").
    """
    word = words[index][0].lower()
    following = words[index + 1][0].lower() if index + 1 < len(words) else ""
    before_phrase = following in ARTICLES or _match_relation(words, index + 1) is not None
    return word.endswith("ing") and _has_noun(segment) and before_phrase


def _segments(prompt: str) -> tuple[list[list[tuple[str, int]]], list[tuple[int, str, str]], list[str]]:
    """Split into noun-phrase segments; relations as (segment index before, relation, text)."""
    words = _words(prompt)
    segments: list[list[tuple[str, int]]] = [[]]
    relations: list[tuple[int, str, str]] = []
    unparsed: list[str] = []
    index = 0
    while index < len(words):
        word, _ = words[index]
        found = _match_relation(words, index)
        if found is not None:
            relation, length = found
            text = " ".join(w for w, _ in words[index : index + length])
            relations.append((len(segments) - 1, relation, text))
            segments.append([])
            index += length
            continue
        lower = word.lower()
        relation_follows = _match_relation(words, index + 1) is not None
        if lower in COPULAS and relation_follows:  # "a cow is on the right of a car"
            pass
        elif lower in SEPARATORS or _is_verb(words, index, segments[-1]):
            if lower not in ("and", ",", ";", "with"):
                unparsed.append(f"{word!r} (not a supported relation)")
            if not relation_follows:  # "sitting on": the relation follows
                segments.append([])
        else:
            segments[-1].append((word, words[index][1]))
        index += 1
    return segments, relations, unparsed


def _noun_phrase(segment: list[tuple[str, int]], prompt: str, unparsed: list[str]):
    """(entity phrase or None, attribute phrases) of one segment: attributes are lexicon words."""
    attributes, rest = [], []
    for word, start in segment:
        lower = word.lower()
        if lower in ARTICLES:
            continue
        if lower in COUNTS or lower.isdigit():
            unparsed.append(f"{word!r} (counts are not constrained)")
        elif lower in ATTRIBUTES and not rest:
            attributes.append(Phrase(word, start))
        else:
            rest.append((word, start))
    if not rest and attributes and (len(attributes) > 1 or attributes[-1].text.lower() not in COLORS):
        last = attributes.pop()  # "a red square", "a red orange": the last lexicon word is the noun
        rest = [(last.text, last.start)]
    if not rest:
        if attributes:
            unparsed.append(f"{' '.join(a.text for a in attributes)!r} (attribute without a noun)")
        return None, []
    start, end = rest[0][1], rest[-1][1] + len(rest[-1][0])
    return Phrase(prompt[start:end], start), attributes


def _not_an_object(text: str) -> str | None:
    """Why a noun phrase is no entity ("background", "the top"), or ``None`` when it is one."""
    words = text.lower().split()
    if words[-1] in SCENE_WORDS:
        return "scene, not an object"
    if all(w in RELATION_WORDS for w in words):
        return "a position, not an object"
    return None


def parse_rules(prompt: str) -> Constraints:
    """Constraints of the common prompt shapes, without any model.

    Handles articles, several attributes per noun (``a big red car``), multi-word entities
    (``a brown teddy bear``), ``and``/commas/``with`` and the relation phrases of
    ``RELATION_PHRASES``; everything else is reported in ``unparsed``.
    """
    segments, relation_marks, unparsed = _segments(prompt)
    constraints = Constraints(prompt, unparsed=unparsed, source="rules")
    heads: list[Phrase | None] = []
    for segment in segments:
        entity, attributes = _noun_phrase(segment, prompt, constraints.unparsed)
        reason = None if entity is None else _not_an_object(entity.text)
        if reason is not None:
            constraints.unparsed.append(f"{entity.text!r} ({reason})")
            entity = None
        heads.append(entity)
        if entity is not None:
            constraints.entities.append(entity)
            constraints.bindings.extend(Binding(a, entity) for a in attributes)
    for before, relation, text in relation_marks:
        subject, obj = heads[before], heads[before + 1] if before + 1 < len(heads) else None
        if relation == "unsupported" or subject is None or obj is None:
            reason = "not a supported relation" if relation == "unsupported" else "needs an object on both sides"
            if not (text == "on" and obj is None):
                constraints.unparsed.append(f"{text!r} ({reason})")
            continue
        constraints.relations.append(Relation(subject, relation, obj))
    return constraints


# -- optional spaCy parser ----------------------------------------------------------------------
def _spacy_model(name: str = "en_core_web_sm"):
    """The spaCy pipeline ``name`` when spaCy and the model are installed, else ``None``."""
    try:
        import spacy
    except ImportError:
        return None
    try:
        return spacy.load(name)
    except OSError:
        return None


def _spacy_chunk(chunk, prompt: str) -> tuple[Phrase | None, list[Phrase]]:
    """(entity, attributes) of a spaCy noun chunk, with the rule parser's lexicon.

    The entity is the root with its ``compound`` tokens, minus leading lexicon attributes (spaCy
    often tags "gold" in "a gold clock" as a compound); ``amod`` children are attributes.
    """
    nouns = [t for t in chunk if t.dep_ == "compound" or t == chunk.root]
    attributes = [Phrase(t.text, t.idx) for t in chunk.root.children if t.dep_ == "amod"]
    while len(nouns) > 1 and nouns[0].text.lower() in ATTRIBUTES:
        attributes.append(Phrase(nouns[0].text, nouns[0].idx))
        nouns = nouns[1:]
    start, end = nouns[0].idx, nouns[-1].idx + len(nouns[-1].text)
    entity = Phrase(prompt[start:end], start)
    return (None, []) if _not_an_object(entity.text) else (entity, sorted(attributes, key=lambda a: a.start))


def parse_spacy(prompt: str, nlp) -> Constraints:
    """Constraints from a spaCy dependency parse: noun chunks, ``amod``/``compound`` attributes.

    Relations come from the rule parser (the same phrase table, "on the top of" included) and are
    kept when both of their phrases are spaCy entities; chunks that are positions ("the top",
    "the right") or scenes are not entities, as in the rule parser.
    """
    doc = nlp(prompt)
    constraints = Constraints(prompt, source="spacy")
    for chunk in doc.noun_chunks:
        entity, attributes = _spacy_chunk(chunk, prompt)
        if entity is None:
            continue
        constraints.entities.append(entity)
        constraints.bindings.extend(Binding(a, entity) for a in attributes)
    rules = parse_rules(prompt)
    by_text = {e.text: e for e in constraints.entities}
    for relation in rules.relations:
        subject, obj = by_text.get(relation.subject.text), by_text.get(relation.object.text)
        if subject is None or obj is None:
            constraints.unparsed.append(f"relation {relation.relation!r} between unparsed phrases")
            continue
        constraints.relations.append(Relation(subject, relation.relation, obj))
    constraints.unparsed.extend(u for u in rules.unparsed if "relation" in u)
    return constraints


def parse_prompt(prompt: str, parser: str = "auto") -> Constraints:
    """Constraints of ``prompt`` with ``parser``: ``"rules"``, ``"spacy"`` or ``"auto"`` (spaCy if present)."""
    if parser not in ("auto", "rules", "spacy"):
        raise InputError(f"unknown constraint parser {parser!r}; use auto, rules or spacy")
    nlp = _spacy_model() if parser in ("auto", "spacy") else None
    if parser == "spacy" and nlp is None:
        raise InputError(
            "the spaCy parser needs spaCy and its English model: "
            "pip install spacy && python -m spacy download en_core_web_sm"
        )
    constraints = parse_spacy(prompt, nlp) if nlp is not None else parse_rules(prompt)
    for part in constraints.unparsed:
        logger.info("prompt part not constrained: %s", part)
    return constraints


# -- user constraints (Python dict / JSON) --------------------------------------------------------
def _phrase(prompt: str, value: Any, where: str) -> Phrase:
    """A phrase named in user constraints: ``"car"`` (every occurrence) or ``{"text", "occurrence"}``."""
    occurrence = None
    if isinstance(value, dict):
        if set(value) - {"text", "occurrence"} or not isinstance(value.get("text"), str):
            raise InputError(f"constraints: {where} must be a word or {{'text': ..., 'occurrence': N}}")
        value, occurrence = value["text"], value.get("occurrence")
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"constraints: {where} must be a non-empty word, got {value!r}")
    starts = [m.start() for m in re.finditer(rf"(?<![A-Za-z]){re.escape(value)}(?![A-Za-z])", prompt, re.IGNORECASE)]
    if not starts:
        raise InputError(f"constraints: {where} {value!r} does not occur in the prompt {prompt!r}")
    if occurrence is None:
        return Phrase(value, None)
    if not isinstance(occurrence, int) or not 0 <= occurrence < len(starts):
        raise InputError(
            f"constraints: {where} {value!r} occurs {len(starts)} time(s); occurrence must be 0..{len(starts) - 1}"
        )
    return Phrase(prompt[starts[occurrence] : starts[occurrence] + len(value)], starts[occurrence])


def _items(data: dict, key: str, fields: tuple[str, ...]) -> list[dict]:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) and set(i) == set(fields) for i in items):
        raise InputError(f"constraints: {key!r} must be a list of objects with exactly the keys {list(fields)}")
    return items


def constraints_from_dict(data: dict, prompt: str) -> Constraints:
    """User constraints (the JSON schema of ``Constraints.to_dict``), checked against ``prompt``.

    Repeated constraints count once. At most :data:`MAX_CONSTRAINT_ITEMS` entries are read and
    at most :data:`MAX_CONSTRAINTS` distinct constraints accepted (the losses grow with their
    number and pairs; a 77-token prompt holds far fewer distinct phrases).
    """
    if not isinstance(data, dict) or set(data) - {"entities", "attributes", "relations"}:
        raise InputError("constraints must be an object with the keys entities, attributes, relations")
    entities = data.get("entities", [])
    if not isinstance(entities, list):
        raise InputError("constraints: 'entities' must be a list of words")
    items = sum(len(value) for value in data.values() if isinstance(value, list))
    if items > MAX_CONSTRAINT_ITEMS:
        raise InputError(f"constraints: {items} entries; at most {MAX_CONSTRAINT_ITEMS} are read")
    constraints = Constraints(prompt, source="user")
    constraints.entities = list(dict.fromkeys(_phrase(prompt, e, "entity") for e in entities))
    for item in _items(data, "attributes", ("attribute", "entity")):
        entity = _phrase(prompt, item["entity"], "attribute entity")
        constraints.bindings.append(Binding(_phrase(prompt, item["attribute"], "attribute"), entity))
        if entity not in constraints.entities:
            constraints.entities.append(entity)
    for item in _items(data, "relations", ("subject", "relation", "object")):
        if item["relation"] not in RELATIONS:
            raise InputError(f"constraints: relation {item['relation']!r} is not one of {', '.join(RELATIONS)}")
        subject, obj = _phrase(prompt, item["subject"], "subject"), _phrase(prompt, item["object"], "object")
        constraints.relations.append(Relation(subject, item["relation"], obj))
        constraints.entities.extend(e for e in (subject, obj) if e not in constraints.entities)
    constraints.bindings = list(dict.fromkeys(constraints.bindings))
    constraints.relations = list(dict.fromkeys(constraints.relations))
    count = len(constraints.entities) + len(constraints.bindings) + len(constraints.relations)
    if count > MAX_CONSTRAINTS:
        raise InputError(f"constraints: {count} distinct constraints; at most {MAX_CONSTRAINTS} are accepted")
    return constraints


def load_constraints(path: str | Path, prompt: str) -> Constraints:
    """User constraints from a JSON file (see :func:`constraints_from_dict`)."""
    from editkit.jsonio import parse_json

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"constraints file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"constraints file {path} is a folder; give a JSON file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"constraints file {path} is not valid JSON: {error}") from None
    return constraints_from_dict(parse_json(text, f"constraints file {path}"), prompt)


# -- token alignment ----------------------------------------------------------------------------
@dataclass
class AlignedConstraints:
    """Constraints as token indices of the encoded prompt (index 0 is start-of-text).

    ``entities[i]`` lists entity ``i``'s token indices; bindings are ``(attribute tokens, entity
    index)``; relations ``(subject index, relation, object index)``; ``names`` label entities.
    ``last_token`` is the index of the prompt's last real token.
    """

    entities: list[list[int]]
    names: list[str]
    bindings: list[tuple[list[int], int, str]]
    relations: list[tuple[int, str, int]]
    last_token: int
    dropped: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.entities


def _spans(prompt: str, phrase: Phrase) -> list[tuple[int, int]]:
    if phrase.start is not None:
        return [(phrase.start, phrase.end)]
    pattern = rf"(?<![A-Za-z]){re.escape(phrase.text)}(?![A-Za-z])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, prompt, re.IGNORECASE)]


def token_indices(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Every token (index + 1 for start-of-text) whose character range overlaps one of ``spans``."""
    return [i + 1 for i, (s, e) in enumerate(offsets) if e > s and any(s < end and e > start for start, end in spans)]


def align(constraints: Constraints, tokenizer) -> AlignedConstraints:
    """Map every phrase to ALL its token indices; phrases past the text window are dropped, reported."""
    encoded = tokenizer(constraints.prompt, add_special_tokens=False, return_offsets_mapping=True)
    window = tokenizer.model_max_length - 2
    return align_offsets(constraints, [tuple(o) for o in encoded["offset_mapping"][:window]])


def align_offsets(constraints: Constraints, offsets: list[tuple[int, int]]) -> AlignedConstraints:
    """:func:`align` on given token character ``offsets`` (token ``i`` gets index ``i + 1``).

    The offsets of several tokenizations may be concatenated (an MM-DiT's CLIP and T5 tokens): a
    phrase then gets the indices of its tokens in each of them.
    """
    prompt = constraints.prompt
    aligned = AlignedConstraints([], [], [], [], last_token=len(offsets))
    index_of: dict[Phrase, int] = {}
    for entity in constraints.entities:
        tokens = token_indices(offsets, _spans(prompt, entity))
        if not tokens:
            aligned.dropped.append(f"entity {entity.text!r} (beyond the text encoder's window)")
            continue
        index_of[entity] = len(aligned.entities)
        aligned.entities.append(tokens)
        aligned.names.append(entity.text)
    for binding in constraints.bindings:
        tokens = token_indices(offsets, _spans(prompt, binding.attribute))
        if not tokens or binding.entity not in index_of:
            aligned.dropped.append(
                f"attribute {binding.attribute.text!r} of {binding.entity.text!r} (beyond the window)"
            )
            continue
        aligned.bindings.append((tokens, index_of[binding.entity], binding.attribute.text))
    for relation in constraints.relations:
        if relation.subject not in index_of or relation.object not in index_of:
            aligned.dropped.append(f"relation {relation.relation!r} (an entity is beyond the window)")
            continue
        aligned.relations.append((index_of[relation.subject], relation.relation, index_of[relation.object]))
    return aligned
