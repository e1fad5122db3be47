"""PatchNCE (CUT, Park et al. 2020), the contrastive term of CDS and of the dual contrastive loss.

The per-problem functions (:func:`patch_nce`, :func:`patch_nce_loss`) state the formula; the
loss the pipelines use, :func:`contrastive_loss`, solves every (site, patch size, item) problem
at once (:func:`batched_patch_nce`): a launch count that does not grow with the number of sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editkit.errors import InputError

__all__ = [
    "DIRECTIONS",
    "batched_patch_nce",
    "contrastive_loss",
    "patch_nce",
    "patch_nce_loss",
    "pool_patches",
    "sample_locations",
    "tokens_to_grid",
]

DIRECTIONS = ("source", "target", "dual")


# -- PatchNCE -----------------------------------------------------------------------------------
def tokens_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(batch, tokens, channels) -> (batch, channels, height, width)."""
    batch, tokens, channels = features.shape
    height, width = grid
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens do not fill a {height}x{width} grid")
    return features.transpose(1, 2).reshape(batch, channels, height, width)


def pool_patches(feature_map: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Mean of each non-overlapping patch_size x patch_size patch: (batch, channels, h // p, w // p)."""
    if patch_size == 1:
        return feature_map
    return F.avg_pool2d(feature_map, kernel_size=patch_size, stride=patch_size)


def sample_locations(
    num_cells: int, num_patches: int, generator: torch.Generator | None, allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Up to ``num_patches`` distinct cell indices (of ``allowed`` cells when given), from ``generator``."""
    count = num_cells if allowed is None else int(allowed.sum())
    device = generator.device if generator is not None else "cpu"
    order = torch.randperm(count, generator=generator, device=device).cpu()[:num_patches]
    return order if allowed is None else allowed.flatten().nonzero().flatten().cpu()[order]


def patch_nce(anchor: torch.Tensor, positive: torch.Tensor, *, tau: float = 0.07, diagonal_fill: float = -10.0):
    """PatchNCE: mean_i CE([a_i.p_i, a_i.p_j (j != i), -10] / tau, 0)  (CUT, Park et al. 2020, eq. 2).

    ``anchor`` and ``positive`` are (patches, channels), L2-normalised; row i of ``positive`` is
    the positive of anchor i and the other rows are its negatives (same image only). The
    diagonal of the negatives is set to ``diagonal_fill`` before dividing by ``tau``.
    """
    positive_logits = (anchor * positive).sum(dim=-1, keepdim=True)  # (patches, 1)
    negative_logits = anchor @ positive.transpose(0, 1)  # (patches, patches)
    eye = torch.eye(anchor.shape[0], dtype=torch.bool, device=anchor.device)
    negative_logits = negative_logits.masked_fill(eye, diagonal_fill)
    logits = torch.cat([positive_logits, negative_logits], dim=1) / tau
    target = torch.zeros(anchor.shape[0], dtype=torch.long, device=anchor.device)
    return F.cross_entropy(logits, target)


def patch_nce_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    direction: str = "dual",
    tau: float = 0.07,
    diagonal_fill: float = -10.0,
) -> torch.Tensor:
    """Source-anchored (CDS, rows of S), target-anchored (CUT, columns of S) or dual (their mean) PatchNCE.

    ``source`` and ``target``: (patches, channels) features at the same locations (normalised here).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    source = F.normalize(source.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    losses = []
    if direction in ("source", "dual"):
        losses.append(patch_nce(source, target, tau=tau, diagonal_fill=diagonal_fill))
    if direction in ("target", "dual"):
        losses.append(patch_nce(target, source, tau=tau, diagonal_fill=diagonal_fill))
    return losses[0] if len(losses) == 1 else (losses[0] + losses[1]) / 2


def _allowed_cells(region: torch.Tensor | None, grid: tuple[int, int], patch_size: int) -> torch.Tensor | None:
    """Cells (after pooling) that overlap ``region`` (batch, 1, H, W); None when fewer than two do."""
    if region is None:
        return None
    covered = F.adaptive_avg_pool2d(region.float().amax(dim=0, keepdim=True), grid)
    covered = pool_patches(covered, patch_size)[0, 0] > 0  # (h // p, w // p)
    return covered if int(covered.sum()) >= 2 else None


@dataclass(frozen=True)
class _Block:
    """One PatchNCE problem: the sampled cells of one site, patch size and batch item."""

    site: str
    item: int
    patch_size: int
    cells: tuple[int, ...]  # row-major indices into the (h // p, w // p) pooled grid


def _draw_blocks(
    features: Mapping[str, torch.Tensor],
    grids: Mapping[str, tuple[int, int] | None],
    patch_sizes: Sequence[int],
    num_patches: int,
    generator: torch.Generator | list[torch.Generator] | None,
    region: torch.Tensor | None,
) -> list[_Block]:
    """The locations of every (site, patch size, item), drawn in sorted-site, patch-size, item order."""
    generators = generator if isinstance(generator, list) else [generator]
    blocks = []
    for site in sorted(features):
        grid, batch = grids[site], features[site].shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for a batch of {batch}")
        for patch_size in patch_sizes:
            cells = (grid[0] // patch_size) * (grid[1] // patch_size)
            if min(grid) < patch_size or cells < 2:  # no whole patch, or no negative
                continue
            allowed = _allowed_cells(region, grid, patch_size)
            drawn = [tuple(sample_locations(cells, num_patches, g, allowed).tolist()) for g in generators]
            drawn = drawn if isinstance(generator, list) else drawn * batch  # one draw shared by the batch
            blocks += [_Block(site, item, patch_size, cells) for item, cells in enumerate(drawn)]
    return blocks


def _cell_tokens(grid: tuple[int, int], patch_size: int, slots: int) -> list[list[int]]:
    """Per pooled cell, the token indices of its patch, each repeated so that every cell has ``slots``."""
    width, repeat = grid[1], slots // patch_size**2
    side = range(patch_size)
    return [
        [(row * patch_size + dy) * width + col * patch_size + dx for dy in side for dx in side] * repeat
        for row in range(grid[0] // patch_size)
        for col in range(grid[1] // patch_size)
    ]


def _gather_cells(
    blocks: list[_Block],
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    grids: Mapping[str, tuple[int, int] | None],
    patches: int,
) -> torch.Tensor:
    """(2, blocks, patches, channels) cell features (source, target) of sites of one width, not normalised.

    One concatenation, one gather and one sum pool every block's cells (avg pooling as the sum of
    the patch's tokens: the scale is normalised away later); slots past a block's own cell count
    repeat token 0 (masked later). Callers group blocks by patch size too, so that every gathered
    token is used once (a mixed group would repeat a 1x1 cell's token to fill a 2x2 cell's four
    slots: 4x the gather and its backward).
    """
    sites = sorted({block.site for block in blocks})
    offsets, tokens = {}, 0
    for site in sites:
        offsets[site], tokens = tokens, tokens + source[site].shape[1]
    table = torch.cat([source[s] for s in sites] + [target[s] for s in sites], dim=1)  # (batch, 2 * tokens, C)
    slots = math.lcm(*(block.patch_size**2 for block in blocks))
    lookup = {(grids[b.site], b.patch_size): None for b in blocks}
    lookup = {key: _cell_tokens(*key, slots) for key in lookup}
    index: list[int] = []
    for half in (0, tokens):
        for block in blocks:
            base = block.item * 2 * tokens + half + offsets[block.site]
            cell_tokens = lookup[(grids[block.site], block.patch_size)]
            index += [base + token for cell in block.cells for token in cell_tokens[cell]]
            index += [0] * (slots * (patches - len(block.cells)))
    index_tensor = torch.tensor(index, device=table.device)
    cells = table.flatten(0, 1).index_select(0, index_tensor)  # (2 * blocks * patches * slots, C)
    cells = cells.view(2, len(blocks), patches, slots, -1).float()
    return cells[:, :, :, 0] if slots == 1 else cells.sum(dim=3)  # the sum: the mean up to a scale normalised away


def batched_patch_nce(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    *,
    direction: str = "dual",
    tau: float = 0.07,
    diagonal_fill: float = -10.0,
    normalize: bool = False,
) -> torch.Tensor:
    """sum_k sum_i w_ki CE_i of many PatchNCE problems at once (CUT, Park et al. 2020, eq. 2).

    ``source`` and ``target`` are (blocks, patches, channels), L2-normalised, or raw with
    ``normalize=True``: the dot products are then divided by the two norms (``F.normalize``'s
    ``max(norm, 1e-12)``), the same value without a pass over the features; ``weights`` (blocks,
    patches) is 0 on padding slots (patches a block does not have). With S = source . target^T / tau,
    the source-anchored term (CDS) of patch i is the cross-entropy of row i of S, positive S_ii,
    with the diagonal's negative replaced by ``diagonal_fill`` / tau (one extra logit per row); the
    target-anchored term (CUT) is the same on column i; "dual" is their mean. One product serves
    both directions.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    patches = source.shape[1]
    logits = torch.bmm(source, target.transpose(1, 2))  # (blocks, patches, patches)
    if normalize:
        inverse = [torch.linalg.vector_norm(f, dim=-1).clamp_min(1e-12).reciprocal() for f in (source, target)]
        logits = logits * (inverse[0][:, :, None] * inverse[1][:, None, :])
    logits = logits / tau
    positive = logits.diagonal(dim1=1, dim2=2)  # (blocks, patches)
    padding = weights == 0
    logits = logits.masked_fill(padding[:, :, None] | padding[:, None, :], float("-inf"))
    # the negative at the positive's own place holds diagonal_fill: one more logit per row and column
    logits = F.pad(logits, (0, 1, 0, 1), value=diagonal_fill / tau)
    terms = []
    if direction in ("source", "dual"):
        terms.append(logits[:, :patches, :].logsumexp(dim=2))  # rows: anchored on the source
    if direction in ("target", "dual"):
        terms.append(logits[:, :, :patches].logsumexp(dim=1))  # columns: anchored on the target
    normaliser = terms[0] if len(terms) == 1 else (terms[0] + terms[1]) / 2
    return ((normaliser - positive) * weights).sum()


def contrastive_loss(
    source_features: Mapping[str, torch.Tensor],
    target_features: Mapping[str, torch.Tensor],
    grids: Mapping[str, tuple[int, int] | None],
    *,
    direction: str = "dual",
    patch_sizes: Sequence[int] = (1, 2),
    num_patches: int = 256,
    tau: float = 0.07,
    diagonal_fill: float = -10.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over sites and patch sizes of the PatchNCE loss (mean over patches and batch items).

    Features are (batch, tokens, channels) by site; the SAME locations (drawn from ``generator``,
    inside ``region`` when given) are used for source and target; a list of generators (one per batch
    item) draws each item's own locations. Sites and scales with fewer than two cells are skipped.

    Computed batched (the same value as a loop of :func:`patch_nce_loss` over sites, patch sizes
    and items, to float rounding): per feature width and patch size one gather, then one
    :func:`batched_patch_nce` for all of them, narrower widths zero-padded (dot products and norms
    unchanged), the normalisation applied to the similarities (no division of the features).
    Its similarity tensor holds every block at once: memory grows as blocks x num_patches^2.
    """
    for site in target_features:
        if grids.get(site) is None or site not in source_features:
            raise KeyError(f"no source features or grid recorded at {site}")
    blocks = _draw_blocks(target_features, grids, patch_sizes, num_patches, generator, region)
    if not blocks:
        raise InputError(
            "the image is too small for the contrastive loss (every feature grid is smaller than two patches); "
            "use a larger image or no contrast"
        )
    patches = max(len(block.cells) for block in blocks)
    groups: dict[tuple[int, int], list[_Block]] = {}  # by (feature width, patch size)
    for block in blocks:
        groups.setdefault((target_features[block.site].shape[-1], block.patch_size), []).append(block)
    widest = max(width for width, _ in groups)
    cells = []
    for (width, _), group in groups.items():
        gathered = _gather_cells(group, source_features, target_features, grids, patches)
        cells.append(gathered if width == widest else F.pad(gathered, (0, widest - width)))
    cells = cells[0] if len(cells) == 1 else torch.cat(cells, dim=1)  # (2, blocks, patches, widest)
    ordered = [block for group in groups.values() for block in group]
    batch = next(iter(target_features.values())).shape[0]
    weights = [[1.0 / (batch * len(b.cells))] * len(b.cells) + [0.0] * (patches - len(b.cells)) for b in ordered]
    weights = torch.tensor(weights, device=cells.device)
    options = {"direction": direction, "tau": tau, "diagonal_fill": diagonal_fill, "normalize": True}
    return batched_patch_nce(cells[0], cells[1], weights, **options)
