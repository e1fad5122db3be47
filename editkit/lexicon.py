"""The word lists of the rule-based prompt parser (``editkit.constraints.parse_rules``).

Data only. The attribute words cover what T2I-CompBench's colour, shape and texture prompts use
("a gold clock", "an oblong carrot and a teardrop peach", "a pentagonal sign", "a fluffy
pillow"); the relation phrases cover its spatial prompts ("a X on the top of a Y", "on the
bottom of", "on side of", "next to", "near", "on the left / right of") and the common variants.
"""

from __future__ import annotations

__all__ = [
    "ARTICLES",
    "ATTRIBUTES",
    "COLORS",
    "COPULAS",
    "COUNTS",
    "RELATION_PHRASES",
    "RELATION_WORDS",
    "SCENE_WORDS",
    "SEPARATORS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
]


def _lexicon(words: str) -> frozenset[str]:
    """A word set from a space-separated list."""
    return frozenset(words.split())


# (phrase, relation); ``parse_rules`` tries the longest phrase first. "near" is enforced as
# proximity, not as a direction; "side" has no direction either, so "on side of" maps to "near".
RELATION_PHRASES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        [
            ("on the left side of", "left"),
            ("on the right side of", "right"),
            ("on the left of", "left"),
            ("on the right of", "right"),
            ("to the left of", "left"),
            ("to the right of", "right"),
            ("at the left of", "left"),
            ("at the right of", "right"),
            ("on left of", "left"),
            ("on right of", "right"),
            ("left of", "left"),
            ("right of", "right"),
            ("on the top of", "above"),
            ("at the top of", "above"),
            ("on top of", "above"),
            ("on the bottom of", "below"),
            ("at the bottom of", "below"),
            ("on bottom of", "below"),
            ("on the side of", "near"),
            ("on side of", "near"),
            ("by the side of", "near"),
            ("next to", "near"),
            ("close to", "near"),
            ("beside", "near"),
            ("near", "near"),
            ("in front of", "unsupported"),
            ("behind", "unsupported"),
            ("underneath", "below"),
            ("beneath", "below"),
            ("below", "below"),
            ("under", "below"),
            ("above", "above"),
            ("over", "above"),
            ("on", "above"),
        ],
        key=lambda item: -len(item[0].split()),
    )
)
# Nouns that only ever occur inside relation phrases ("the top of"): never entities.
RELATION_WORDS = _lexicon("top bottom side left right front")

ARTICLES = _lexicon("a an the this that some its their his her")
COUNTS = _lexicon("one two three four five six seven eight nine ten several many")
# Words that end a noun phrase; "is"/"are" before a relation phrase are dropped silently.
SEPARATORS = _lexicon("and with while , ; in at of is are")
COPULAS = _lexicon("is are")
COLORS = _lexicon(
    "red green blue yellow orange purple pink brown black white gray grey silver gold golden violet "
    "beige tan cyan magenta teal turquoise maroon navy cream ivory bronze copper crimson lavender "
    "indigo khaki olive"
)
SHAPES = _lexicon(
    "round square rectangular triangular oval circular spherical cubic cylindrical oblong teardrop "
    "pentagonal hexagonal octagonal conical pyramidal diamond crescent heart-shaped star-shaped "
    "curved flat"
)
TEXTURES = _lexicon(
    "solid wooden wood metallic metal plastic glass leather fluffy furry rubber fabric stone marble "
    "ceramic paper woolen wool silk velvet concrete brick glossy shiny matte striped spotted dotted "
    "checkered porcelain crystal denim cotton knitted smooth rough soft hard"
)
SIZES = _lexicon("big small large tiny huge little tall short long wide narrow giant thick thin")
ATTRIBUTES = COLORS | SHAPES | TEXTURES | SIZES
SCENE_WORDS = _lexicon("background scene image picture photo")
