"""Attention sites: one attention layer of a UNet, named as in ``unet.attn_processors``.

A site's name is the processor key minus ``.processor``
(``up_blocks.2.attentions.1.transformer_blocks.0.attn1``). Block (down/mid/up) and kind
(self = attn1, cross = attn2) are decided from the name, never from a position in
``attn_processors`` (its order is registration order: down, up, mid).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from typing import Literal

Block = Literal["down", "mid", "up", "other"]
Kind = Literal["self", "cross"]

_BLOCK_PATTERN = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


@dataclasses.dataclass(frozen=True)
class Site:
    """One attention layer.

    ``grid`` is the (height, width) token grid of the call being run; it is known only at run
    time (``None`` in a site built from a name alone).
    """

    name: str
    block: Block
    block_index: int | None
    kind: Kind
    grid: tuple[int, int] | None = None

    @classmethod
    def from_name(cls, name: str, is_cross_attention: bool | None = None) -> Site:
        """Parse a site from a processor key (``.processor`` suffix optional)."""
        name = name.removesuffix(".processor")
        match = _BLOCK_PATTERN.match(name)
        if match is None:
            block, index = "other", None
        elif match.group(3):
            block, index = "mid", None
        else:
            block, index = ("down" if match.group(1) == "down_blocks" else "up"), int(match.group(2))
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("attn1", "attn2"):
            kind: Kind = "self" if leaf == "attn1" else "cross"
        else:
            kind = "cross" if is_cross_attention else "self"
        return cls(name=name, block=block, block_index=index, kind=kind)

    def with_grid(self, grid: tuple[int, int] | None) -> Site:
        """The same site, annotated with the token grid of the current call."""
        return self if grid == self.grid else dataclasses.replace(self, grid=grid)

    @property
    def is_self(self) -> bool:
        return self.kind == "self"

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"


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


def select_sites(names: Iterable[str], patterns: str | Sequence[str] | None, *, kind: Kind | None = None) -> list[str]:
    """Site names matching any of ``patterns`` (exact names, prefixes or fnmatch globs).

    A pattern that is a prefix of a site name ending at a dot (``up_blocks.2``) selects every
    site under it. ``patterns=None`` selects everything (of ``kind`` when given). A pattern that
    matches nothing raises ``ValueError`` naming it: a typo never silently selects no layer.
    """
    names = [name.removesuffix(".processor") for name in names]
    if kind is not None:
        names = [name for name in names if Site.from_name(name).kind == kind]
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
