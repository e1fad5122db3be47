"""The two loss presets: today's A&E-style losses and the paper's own formulation (``loss_preset``).

``"attend-excite"`` is :func:`editkit.refine.constraint_loss` on A&E's token maps (x100 softmax
over the real prompt tokens, Gaussian smoothing; max-attention missing loss, soft-IoU mixing and
binding, margin-hinge spatial loss). ``"paper"`` is the formulation below.

"Fine-Grained Alignment and Noise Refinement for Compositional Text-to-Image Generation"
(arXiv 2503.06506). The formulation follows the audit of its release recorded in the project's
method note (``shared/methods/noise-refinement.md``); this session could not read the release's
Python code, so where the note leaves a detail open the choice is stated here:

- maps: softmax at temperature 1 over keys 1..K-2 (SD: tokens 1..75), padding included, start
  token and the last position excluded, no Gaussian smoothing; the spatial loss alone uses x100
  logits over the same keys (:func:`paper_token_maps`);
- entity missing: a hinge on peak differences, ``sum over ordered pairs (i, j) of
  relu(peak_scale * (max A_j - max A_i))`` (each entity's peak must reach every other's; the
  peaks are scaled by 1000 because T=1 maps are nearly uniform, ~1/75); 0 for one entity;
- entity mixing: ``sum over pairs of sum(a * b) / sum(a + b)`` (capped at 0.5, as the paper);
  only when the prompt has no spatial relation;
- attribute binding: ``sum over bindings of 1 - IoU``, ``IoU = sum(min) / sum(max)`` of the
  raw maps;
- spatial: ``sigmoid`` of the centroid difference in grid-cell units (no gradient left when
  badly violated, unlike ``refine.spatial_loss``); ``near`` (not in the paper): the sigmoid of
  the centroid distance minus ``near_distance`` of the side, in cells;
- all weights 1 (``PAPER_WEIGHTS``); a phrase's map is the sum over all its tokens (the paper
  takes one token per word; multi-piece words are editkit's addition).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from editkit.compose_choices import LOSS_PRESETS
from editkit.constraints import AlignedConstraints
from editkit.refine import LossPlan, LossWeights, constraint_loss, entity_maps, relation_gap

__all__ = [
    "LOSS_PRESETS",
    "PAPER_WEIGHTS",
    "paper_binding_loss",
    "paper_constraint_loss",
    "paper_missing_loss",
    "paper_mixing_loss",
    "paper_spatial_loss",
    "paper_token_maps",
    "preset_weights",
    "unified_loss",
]

#: The paper's unified loss: every term with weight 1.
PAPER_WEIGHTS = LossWeights(missing=1.0, mixing=1.0, binding=1.0, spatial=1.0)


def preset_weights(preset: str, **overrides: float | None) -> LossWeights:
    """A preset's weights (the paper's all-ones, or ``LossWeights()``), with the non-``None`` ``overrides``."""
    if preset not in LOSS_PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; use {', '.join(LOSS_PRESETS)}")
    weights = replace(PAPER_WEIGHTS) if preset == "paper" else LossWeights()
    return replace(weights, **{name: value for name, value in overrides.items() if value is not None})


def paper_token_maps(probs: torch.Tensor, softmax_scale: float = 1.0) -> torch.Tensor:
    """``(h, w, keys)`` attention -> ``(keys - 2, h, w)``: softmax of ``scale * probs`` over keys 1..K-2.

    Row ``k`` is the map of token ``k + 1`` (as :func:`editkit.refine.token_maps`), padding included.
    """
    keys = probs[..., 1 : probs.shape[-1] - 1].float()
    return torch.softmax(keys * softmax_scale, dim=-1).permute(2, 0, 1)


def paper_missing_loss(
    maps: list[torch.Tensor], chosen: set[int] | None = None, peak_scale: float = 1000.0
) -> torch.Tensor:
    """``sum over (i in chosen, j != i) of relu(peak_scale * (max A_j - max A_i))``."""
    peaks = torch.stack([m.amax() for m in maps]) * peak_scale
    chosen = set(range(len(maps))) if chosen is None else chosen
    terms = [torch.relu(peaks[j] - peaks[i]) for i in sorted(chosen) for j in range(len(maps)) if j != i]
    return torch.stack(terms).sum() if terms else peaks.new_zeros(())


def paper_mixing_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum over pairs of sum(a * b) / sum(a + b)``."""
    return torch.stack([(a * b).sum() / (a + b).sum() for a, b in pairs]).sum()


def paper_binding_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]], eps: float = 1e-12) -> torch.Tensor:
    """``sum over (attribute, noun) of 1 - sum(min) / sum(max)``."""
    return torch.stack([1 - torch.minimum(a, n).sum() / (torch.maximum(a, n).sum() + eps) for a, n in pairs]).sum()


def paper_spatial_loss(
    subject: torch.Tensor, obj: torch.Tensor, relation: str, near_distance: float = 0.35
) -> torch.Tensor:
    """``sigmoid`` of the centroid difference in grid cells (> 0.5 when violated)."""
    cells = subject.shape[-1] if relation in ("left", "right", "near") else subject.shape[-2]
    return torch.sigmoid(relation_gap(subject, obj, relation, near_distance) * cells)


def paper_constraint_loss(
    probs: torch.Tensor,
    aligned: AlignedConstraints,
    weights: LossWeights = PAPER_WEIGHTS,
    *,
    entities: set[int] | None = None,
    peak_scale: float = 1000.0,
    spatial_softmax_scale: float = 100.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's unified loss on ``(h, w, keys)`` attention and its terms; ``entities``: selective loss."""
    chosen = set(range(len(aligned.entities))) if entities is None else set(entities)
    maps = paper_token_maps(probs)
    ents = [entity_maps(maps, tokens) for tokens in aligned.entities]
    terms: dict[str, torch.Tensor] = {}
    if chosen and len(ents) > 1 and weights.missing > 0:
        terms["missing"] = paper_missing_loss(ents, chosen, peak_scale)
    pairs = [(i, j) for i in range(len(ents)) for j in range(i + 1, len(ents)) if i in chosen or j in chosen]
    if pairs and not aligned.relations and weights.mixing > 0:
        terms["mixing"] = paper_mixing_loss([(ents[i], ents[j]) for i, j in pairs])
    bindings = [(entity_maps(maps, tokens), ents[e]) for tokens, e, _ in aligned.bindings if e in chosen]
    if bindings and weights.binding > 0:
        terms["binding"] = paper_binding_loss(bindings)
    relations = [r for r in aligned.relations if r[0] in chosen or r[2] in chosen]
    if relations and weights.spatial > 0:
        sharp = paper_token_maps(probs, spatial_softmax_scale)
        sharp_ents = [entity_maps(sharp, tokens) for tokens in aligned.entities]
        spatial = [paper_spatial_loss(sharp_ents[s], sharp_ents[o], rel) for s, rel, o in relations]
        terms["spatial"] = torch.stack(spatial).sum()
    total = sum((getattr(weights, name) * value for name, value in terms.items()), maps.new_zeros(()))
    return total, terms


def unified_loss(
    preset: str,
    probs: torch.Tensor,
    maps: torch.Tensor,
    aligned: AlignedConstraints,
    weights: LossWeights,
    *,
    entities: set[int] | None = None,
    plan: LossPlan | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The ``preset``'s loss: the paper's on raw ``probs`` (h, w, keys), A&E-style on token ``maps``.

    ``plan``: the A&E-style loss's precomputed :class:`editkit.refine.LossPlan` (the paper's ignores it).
    """
    if preset == "paper":
        return paper_constraint_loss(probs, aligned, weights, entities=entities)
    return constraint_loss(maps, aligned, weights, entities=entities, plan=plan)
