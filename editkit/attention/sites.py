"""Attention sites: one attention layer of a UNet or an MM-DiT transformer, named as in ``attn_processors``.

A site's name is the processor key minus ``.processor``
(``up_blocks.2.attentions.1.transformer_blocks.0.attn1``, ``transformer_blocks.3.attn``). Block
(down/mid/up; transformer/single for MM-DiT blocks) and, on UNets, kind (self = attn1, cross =
attn2) are decided from the name, never from a position in ``attn_processors`` (its order is
registration order: down, up, mid).

MM-DiT kinds (decided from the layer and its stock processor, see ``editkit.attention.mmdit``):

- ``joint``: SD3's ``transformer_blocks.{i}.attn`` (sequence ``[image; text]``) and FLUX's
  double-stream ``transformer_blocks.{i}.attn`` (``[text; image]``);
- ``image_self``: SD3.5's image-only ``transformer_blocks.{i}.attn2``;
- ``single``: FLUX's ``single_transformer_blocks.{i}.attn`` (``[text; image]`` already
  concatenated; the text length comes from the transformer call, never guessed).

At run time a site also carries its ``TokenLayout``: which slice of the sequence is image and
which is text. Controllers ask the layout, never index positions by hand.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

Block = Literal["down", "mid", "up", "transformer", "single", "other"]
Kind = Literal["self", "cross", "joint", "image_self", "single"]

#: Kinds whose queries are image tokens attending to text keys (cross-attention maps live there).
TEXT_KINDS: tuple[str, ...] = ("cross", "joint", "single")
#: Kinds whose output holds image-token features attended over image tokens (self-attention-like).
IMAGE_KINDS: tuple[str, ...] = ("self", "joint", "image_self", "single")

_BLOCK_PATTERN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")
_TRANSFORMER_PATTERN = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where image and text tokens sit in an attention layer's (joint) sequence.

    ``text_first`` is FLUX's ``[text; image]``; otherwise SD3's ``[image; text]``. An image-only
    layer (SD3.5 ``attn2``) has ``text_tokens == 0``. ``text_tokens`` counts the text tokens the
    kernel sees, inserted ones (``inserted_tokens``) included.
    """

    image_tokens: int
    text_tokens: int
    text_first: bool

    @property
    def image(self) -> slice:
        """The image tokens' positions in the sequence."""
        start = self.text_tokens if self.text_first else 0
        return slice(start, start + self.image_tokens)

    @property
    def text(self) -> slice:
        """The text tokens' positions in the sequence (empty for an image-only layer)."""
        start = 0 if self.text_first else self.image_tokens
        return slice(start, start + self.text_tokens)

    @property
    def total(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclasses.dataclass(frozen=True)
class Site:
    """One attention layer.

    ``grid`` is the (height, width) image-token grid of the call being run and ``layout`` (MM-DiT
    sites) its token layout; both are known only at run time (``None`` in a site built from a
    name alone).
    """

    name: str
    block: Block
    block_index: int | None
    kind: Kind
    grid: tuple[int, int] | None = None
    layout: TokenLayout | None = None

    @classmethod
    def from_name(cls, name: str, is_cross_attention: bool | None = None, kind: Kind | None = None) -> Site:
        """Parse a site from a processor key (``.processor`` suffix optional).

        ``kind`` overrides the kind read from the name (MM-DiT layers: ``joint``, ``image_self``,
        ``single``, decided from the layer by ``editkit.attention.mmdit.mmdit_kind``).
        """
        name = name.removesuffix(".processor")
        block, index = _block_of(name)
        if kind is None:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("attn1", "attn2"):
                kind = "self" if leaf == "attn1" else "cross"
            else:
                kind = "cross" if is_cross_attention else "self"
        return cls(name=name, block=block, block_index=index, kind=kind)

    def with_grid(self, grid: tuple[int, int] | None) -> Site:
        """The same site, annotated with the token grid of the current call."""
        return self if grid == self.grid else dataclasses.replace(self, grid=grid)

    def with_call(self, grid: tuple[int, int] | None, layout: TokenLayout | None) -> Site:
        """The same site, annotated with the token grid and layout of the current call."""
        if grid == self.grid and layout == self.layout:
            return self
        return dataclasses.replace(self, grid=grid, layout=layout)

    @property
    def is_self(self) -> bool:
        return self.kind == "self"

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"

    @property
    def has_text(self) -> bool:
        """Whether image queries attend to text keys here (cross, joint and single sites)."""
        return self.kind in TEXT_KINDS


def _block_of(name: str) -> tuple[Block, int | None]:
    match = _BLOCK_PATTERN.match(name)
    if match is not None:
        if match.group(3):
            return "mid", None
        return ("down" if match.group(1) == "down_blocks" else "up"), int(match.group(2))
    match = _TRANSFORMER_PATTERN.match(name)
    if match is not None:
        return ("transformer" if match.group(1) == "transformer_blocks" else "single"), int(match.group(2))
    return "other", None


def infer_grid(num_tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """The (height, width) grid of ``num_tokens`` spatial tokens for a latent of ``latent_hw``.

    UNet levels halve the latent (rounding up) per downsampling; the level is the one whose
    grid has exactly ``num_tokens`` cells. Without a latent size a square grid is assumed.
    """
    if latent_hw is not None:
        height, width = latent_hw
        for _ in range(12):
            if height * width == num_tokens:
                return height, width
            if height * width < num_tokens:
                break
            height, width = math.ceil(height / 2), math.ceil(width / 2)
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens else None


def select_sites(
    names: Iterable[str | Site], patterns: str | Sequence[str] | None, *, kind: Kind | None = None
) -> list[str]:
    """Site names matching any of ``patterns`` (exact names, prefixes or fnmatch globs).

    A pattern that is a prefix of a site name ending at a dot (``up_blocks.2``) selects every
    site under it. ``patterns=None`` selects everything (of ``kind`` when given). A pattern that
    matches nothing raises ``ValueError`` naming it: a typo never silently selects no layer.
    Pass ``Site`` objects (``attention_sites(model)``) where the kind is not in the name (MM-DiT).
    """
    sites = [item if isinstance(item, Site) else Site.from_name(item) for item in names]
    if kind is not None:
        sites = [site for site in sites if site.kind == kind]
    names = [site.name for site in sites]
    if patterns is None:
        return names
    if isinstance(patterns, str):
        patterns = [patterns]
    selected: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise ValueError(f"attention site pattern {pattern!r} matches no{' ' + kind if kind else ''} site")
        selected.extend(hit for hit in hits if hit not in selected)
    return [name for name in names if name in selected]


def site_matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """Whether site ``name`` is selected by ``patterns`` (``None`` selects every site)."""
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(_matches(name, pattern) for pattern in patterns)


def _matches(name: str, pattern: str) -> bool:
    pattern = pattern.removesuffix(".processor")
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")
