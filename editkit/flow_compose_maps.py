"""Cross-attention maps of MM-DiT transformers (SD3 / SD3.5, FLUX.1) for constraint guidance.

An MM-DiT has no cross-attention layer: image and text tokens attend jointly. The map of a text
token is the image-query x text-key block of chosen joint blocks' attention, normalised over ALL
keys (image and text) as the model computes it (``on_probs`` of editkit's MM-DiT processors),
averaged over heads and blocks. Every block shares one token grid (the patchified latent), so
"which UNet level" becomes "which blocks" (``map_sites``).

Token indices. The text keys are the sequence ``encode_prompt`` builds:

- SD3 / SD3.5: the CLIP tokens (``tokenizer.model_max_length``: start token, prompt, end token,
  padding; CLIP-L and CLIP-G share positions, concatenated on the feature axis) then T5's
  ``max_sequence_length`` tokens (prompt, end token, padding; none without T5 or with
  ``max_sequence_length=0``, as on ``assets/models/shapes-sd3``);
- FLUX.1: T5's ``max_sequence_length`` tokens only (no start token).

:func:`align_prompt` maps each constraint phrase to ALL its tokens in each chosen text stream
(``map_text_encoders``: CLIP, T5 or both) with the tokenizers' character offsets (the rule-based
parser and ``editkit.constraints.align_offsets``, as on UNets). A phrase's map is the sum of its
tokens' maps, so on SD3 with T5 it sums the CLIP and the T5 tokens of the word.

Two views of the text keys feed the two loss presets: the *compact* view ``[slot 0, the prompt's
real tokens of every stream]`` (A&E's "softmax over the real prompt tokens", start/end/padding
excluded; slot 0 is dropped by ``token_maps``) and the *full* view (the whole text sequence, with a
zero start column prepended on FLUX, which has no start token) for the paper's softmax over every
key but the first and the last, padding included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editkit.attention import Site
from editkit.attention.sites import TEXT_KINDS, select_sites
from editkit.constraints import AlignedConstraints, Constraints, align_offsets
from editkit.errors import InputError
from editkit.refine import EarlyExitMapStore

__all__ = [
    "DEFAULT_MAP_SPAN",
    "TEXT_ENCODERS",
    "FlowMapStore",
    "PromptTokens",
    "TextStream",
    "align_prompt",
    "default_map_sites",
    "map_sites_for",
    "text_streams",
]

TEXT_ENCODERS = ("clip", "t5")
#: Default map blocks: the joint (SD3) / double-stream (FLUX) blocks whose index, as a fraction of their
#: number, lies in ``[start, stop)``: the middle half (SD3.5-medium: blocks 6-17 of 24; FLUX.1: 5-14 of
#: the 19 double-stream blocks; FLUX single-stream blocks only when named). Chosen by measurement on
#: ``assets/models/shapes-sd3`` (4 blocks: 1-2; ``benchmarks/flow_compose.py --shapes --map-sites``,
#: ``benchmarks/RESULTS.md``, issue 24): blocks 1-2 beat 0-1 (early maps are weak) at a cost below all four.
DEFAULT_MAP_SPAN = (0.25, 0.75)


@dataclass(frozen=True)
class TextStream:
    """One text encoder's tokens in the transformer's text sequence.

    ``first``: the text position of the stream's first prompt token; ``window``: how many prompt
    tokens the encoder keeps (CLIP: ``model_max_length - 2``; T5: ``max_sequence_length - 1``).
    """

    name: str
    tokenizer: Any
    first: int
    window: int


def text_streams(
    pipe: Any, family: str, max_sequence_length: int, encoders: Sequence[str] | None = None
) -> list[TextStream]:
    """The text streams of ``pipe``'s conditioning whose tokens the maps use (``encoders``: None = all)."""
    if family == "sd3":
        clip_length = int(pipe.tokenizer.model_max_length)
        streams = [TextStream("clip", pipe.tokenizer, 1, clip_length - 2)]
        if getattr(pipe, "text_encoder_3", None) is not None and max_sequence_length > 0:
            streams.append(TextStream("t5", pipe.tokenizer_3, clip_length, max_sequence_length - 1))
    else:
        streams = [TextStream("t5", pipe.tokenizer_2, 0, max_sequence_length - 1)]
    if encoders is None:
        return streams
    encoders = (encoders,) if isinstance(encoders, str) else tuple(encoders)
    unknown = [name for name in encoders if name not in TEXT_ENCODERS]
    if unknown or not encoders:
        raise InputError(f"map_text_encoders must be some of {', '.join(TEXT_ENCODERS)}, got {list(encoders)}")
    chosen = [stream for stream in streams if stream.name in encoders]
    if not chosen:
        present = ", ".join(stream.name for stream in streams)
        raise InputError(
            f"map_text_encoders {list(encoders)}: this {family} model's text sequence holds only {present} tokens"
        )
    return chosen


@dataclass(frozen=True)
class PromptTokens:
    """The prompt's constraints as token indices of the compact view, and where those tokens sit.

    ``aligned``: indices ``1..n`` of the compact view (``aligned.last_token == n``);
    ``positions[k - 1]``: the text position of compact token ``k``; ``start_slot``: whether text
    position 0 is a start token (SD3's CLIP start token; FLUX has none).
    """

    aligned: AlignedConstraints
    positions: tuple[int, ...]
    start_slot: bool

    @property
    def compact_index(self) -> list[int]:
        """Text positions of the compact view: slot 0 (any key; ``token_maps`` drops it), then the real tokens."""
        return [0, *self.positions]

    def full_view(self, text_probs: torch.Tensor) -> torch.Tensor:
        """``(..., text tokens)`` -> the paper's view: as is on SD3, a zero start column first on FLUX."""
        if self.start_slot:
            return text_probs
        return torch.cat([text_probs.new_zeros((*text_probs.shape[:-1], 1)), text_probs], dim=-1)

    @property
    def full_aligned(self) -> AlignedConstraints:
        """``aligned`` with its indices moved to the full view (token ``k`` -> its text position, + 1 on FLUX)."""
        shift = 0 if self.start_slot else 1
        move = lambda tokens: [self.positions[k - 1] + shift for k in tokens]  # noqa: E731
        return dataclasses.replace(
            self.aligned,
            entities=[move(tokens) for tokens in self.aligned.entities],
            bindings=[(move(tokens), entity, text) for tokens, entity, text in self.aligned.bindings],
            last_token=(self.positions[-1] + shift) if self.positions else 0,
        )


def align_prompt(constraints: Constraints, streams: Sequence[TextStream], family: str) -> PromptTokens:
    """Every constraint phrase -> ALL its tokens in each of ``streams`` (compact-view indices)."""
    offsets: list[tuple[int, int]] = []
    positions: list[int] = []
    for stream in streams:
        encoded = stream.tokenizer(constraints.prompt, add_special_tokens=False, return_offsets_mapping=True)
        kept = [tuple(offset) for offset in encoded["offset_mapping"][: max(stream.window, 0)]]
        offsets.extend(kept)
        positions.extend(stream.first + i for i in range(len(kept)))
    return PromptTokens(align_offsets(constraints, offsets), tuple(positions), start_slot=family == "sd3")


def _text_sites(transformer: torch.nn.Module) -> list[Site]:
    """The transformer's text-attending sites in execution order (double/joint blocks, then single blocks)."""
    from editkit.attention import attention_sites

    sites = [site for site in attention_sites(transformer) if site.kind in TEXT_KINDS]
    return sorted(sites, key=lambda site: (site.block == "single", site.block_index or 0))


def default_map_sites(transformer: torch.nn.Module, span: tuple[float, float] = DEFAULT_MAP_SPAN) -> list[str]:
    """The joint / double-stream sites whose block index, over their count, lies in ``span``.

    At least one site (the one at the span's start) is always chosen.
    """
    sites = [site for site in _text_sites(transformer) if site.block == "transformer"]
    count = len(sites)
    chosen = [site.name for i, site in enumerate(sites) if span[0] <= i / count < span[1]]
    return chosen or [sites[min(int(span[0] * count), count - 1)].name]


def map_sites_for(transformer: torch.nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """The text-attending sites selected by ``patterns`` (names, prefixes such as ``transformer_blocks.2``,
    globs; None: :func:`default_map_sites`), in execution order; InputError when one matches no such site."""
    if patterns is None:
        return default_map_sites(transformer)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    sites = _text_sites(transformer)
    if not patterns:
        raise InputError("map_sites is empty; name at least one text-attending block, e.g. transformer_blocks.1")
    try:
        chosen = set(select_sites(sites, patterns))
    except ValueError as error:
        names = ", ".join(site.name for site in sites)
        raise InputError(f"map_sites: {error}; the text-attending sites are {names}") from None
    return [site.name for site in sites if site.name in chosen]


class FlowMapStore(EarlyExitMapStore):
    """The guidance map store of MM-DiT sites: records only while ``active``, stops after ``stop_after``.

    With ``early_exit`` it raises :class:`editkit.refine.MapsCaptured` once the map of the last chosen
    site in execution order is complete: a guided pass needs the maps, not the velocity, so the
    blocks after it run neither forward nor backward (as ``GuidanceMapStore`` on UNets). Not under
    ``torch.compile`` (there the pass runs whole).
    """

    def __init__(self, sites: Sequence[str], role: str = "cond") -> None:
        super().__init__(grids=None, role=role, sites=list(sites), with_grad=True)
        self.stop_after = list(sites)[-1]
        self.active = False
        self.early_exit = False

    def applies_to(self, site: Site) -> bool:
        return site.name in self.site_patterns and super().applies_to(site)
