"""Hard negative captions: the same words with the colours swapped or the relation flipped.

Random in-batch captions differ from an image's own caption in several attributes, which a frozen
model already tells apart; what generation gets wrong is attribute binding and spatial relations.
:func:`hard_negatives` turns a caption into captions that differ from it in exactly that: the colour
words of two objects swapped ("a red circle and a blue square" -> "a blue circle and a red square")
and the relation flipped ("left of" <-> "right of", "above" <-> "below"). Pure text rules on
:mod:`editkit.lexicon`'s word lists (no parser, no model):

- object colours are the words of ``COLORS`` not directly followed by a ``SCENE_WORDS`` word (so
  "on a gray background" is not an object colour); neighbouring distinct object colours are
  swapped, one negative per neighbouring pair, and an article before a swapped colour follows the
  new word ("a orange" -> "an orange");
- relations are the phrases of ``RELATION_PHRASES`` whose relation is left, right, above or below
  and whose words map by ``OPPOSITE_WORDS`` onto a phrase of the opposite relation ("to the left
  of" -> "to the right of", "on top of" -> "on bottom of", "under" -> "over"). The one-word
  phrase "on" is never flipped (it also means "on a background", and has no opposite word);
  "near" and the like have no direction. Only the first relation phrase of a caption is flipped.

A caption with one object colour and no relation has no hard negatives; the caption itself is
never returned.
"""

from __future__ import annotations

import itertools
import re

from editkit.lexicon import COLORS, RELATION_PHRASES, SCENE_WORDS

__all__ = ["OPPOSITE_RELATIONS", "OPPOSITE_WORDS", "hard_negatives"]

OPPOSITE_RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: Word replacements that turn a relation phrase into the opposite one.
OPPOSITE_WORDS = {
    "left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom", "bottom": "top",
    "over": "under", "under": "over", "beneath": "above", "underneath": "above",
}  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_VOWELS = "aeiou"


def _flips() -> dict[tuple[str, ...], tuple[str, ...]]:
    """Relation phrase -> opposite phrase, for the directional phrases whose mapped words name the opposite."""
    relation_of = {tuple(phrase.split()): relation for phrase, relation in RELATION_PHRASES}
    flips = {}
    for words, relation in relation_of.items():
        if relation not in OPPOSITE_RELATIONS:
            continue
        mapped = tuple(OPPOSITE_WORDS.get(word, word) for word in words)
        if mapped != words and relation_of.get(mapped) == OPPOSITE_RELATIONS[relation]:
            flips[words] = mapped
    return flips


_FLIPS = _flips()
_LONGEST = max(len(words) for words in _FLIPS)


def _words(caption: str) -> list[re.Match]:
    return list(_WORD.finditer(caption))


def _rebuild(caption: str, words: list[re.Match], replacements: dict[int, str]) -> str:
    """``caption`` with the words at the given indices replaced (capitalisation of the first letter kept)."""
    out, position = [], 0
    for index, new in sorted(replacements.items()):
        match = words[index]
        old = match.group()
        out += [caption[position : match.start()], new[:1].upper() + new[1:] if old[:1].isupper() else new]
        position = match.end()
    return "".join([*out, caption[position:]])


def _article_fix(words: list[re.Match], index: int, new_word: str, replacements: dict[int, str]) -> None:
    """Make the article right before word ``index`` agree with ``new_word`` ("a" / "an")."""
    if index > 0 and words[index - 1].group().lower() in ("a", "an"):
        replacements[index - 1] = "an" if new_word[0].lower() in _VOWELS else "a"


def colour_swaps(caption: str) -> list[str]:
    """The caption with each pair of neighbouring distinct object colours swapped."""
    words = _words(caption)
    lowered = [w.group().lower() for w in words]
    colours = [
        i
        for i, word in enumerate(lowered)
        if word in COLORS and not (i + 1 < len(lowered) and lowered[i + 1] in SCENE_WORDS)
    ]
    out = []
    for first, second in itertools.pairwise(colours):
        if lowered[first] == lowered[second]:
            continue
        replacements = {first: lowered[second], second: lowered[first]}
        _article_fix(words, first, lowered[second], replacements)
        _article_fix(words, second, lowered[first], replacements)
        out.append(_rebuild(caption, words, replacements))
    return out


def relation_flip(caption: str) -> str | None:
    """The caption with its first directional relation phrase replaced by the opposite one (``None``: none)."""
    words = _words(caption)
    lowered = [w.group().lower() for w in words]
    for start in range(len(lowered)):
        for length in range(min(_LONGEST, len(lowered) - start), 0, -1):
            phrase = tuple(lowered[start : start + length])
            if phrase in _FLIPS:
                flipped = _FLIPS[phrase]
                replacements = {start + k: new for k, new in enumerate(flipped) if new != phrase[k]}
                return _rebuild(caption, words, replacements)
    return None


def hard_negatives(caption: str, limit: int | None = None) -> list[str]:
    """Up to ``limit`` hard negatives of ``caption``: its colour swaps, then its relation flip (no duplicates).

    ``limit`` ``None``: all of them. Never contains ``caption`` itself.
    """
    flipped = relation_flip(caption)
    candidates = [*colour_swaps(caption), *([flipped] if flipped is not None else [])]
    out = [c for c in dict.fromkeys(candidates) if c != caption]
    return out if limit is None else out[: max(0, limit)]
