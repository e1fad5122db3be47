"""Constraint losses on cross-attention maps, and initial-noise refiners.

Maps are captured by the shared attention layer (:class:`GuidanceMapStore`, a
``CrossAttentionMapStore`` that records only while switched on), on the conditional branch at
the grid whose side is a quarter of the latent's. :func:`token_maps` turns them into one
normalised map per prompt token (A&E: drop start-of-text, x100 logits, softmax over the real
prompt tokens, Gaussian smoothing). The losses (Fine-Grained Alignment and Noise Refinement,
arXiv 2503.06506; Attend-and-Excite) work on maps of any grid size, coordinates in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from editkit.attention import CrossAttentionMapStore, Site
from editkit.constraints import AlignedConstraints

__all__ = [
    "GUIDANCE_BLOCKS",
    "EarlyExitMapStore",
    "GuidanceMapStore",
    "LossPlan",
    "LossWeights",
    "MapsCaptured",
    "binding_loss",
    "centroid",
    "constraint_loss",
    "entity_maps",
    "gaussian_smooth",
    "initno_refine",
    "kl_to_standard_normal",
    "loss_plan",
    "map_divisor",
    "map_grid",
    "min_peak",
    "missing_loss",
    "mixing_loss",
    "refine_in_rounds",
    "single_step_refine",
    "soft_iou",
    "spatial_loss",
    "step_sizes",
    "token_maps",
]


# A&E and the paper average the down and up layers at the guidance grid (the mid block is coarser).
GUIDANCE_BLOCKS = ("down", "up")


class MapsCaptured(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by :class:`GuidanceMapStore` once the last needed map is in: the rest of the UNet is skipped."""


class EarlyExitMapStore(CrossAttentionMapStore):
    """A map store that records only while ``active`` and, with ``early_exit``, raises
    :class:`MapsCaptured` once the map of ``stop_after`` is complete (UNet and MM-DiT guidance)."""

    active: bool = False
    early_exit: bool = False
    stop_after: str | None = None

    def wants_probs(self, site: Site) -> bool:
        return self.active and super().wants_probs(site)

    def on_probs(self, site: Site, probs: torch.Tensor, queries: slice) -> None:
        super().on_probs(site, probs, queries)
        # Under torch.compile the pass runs whole: an exception out of a traced frame makes dynamo fall
        # back to compiling each block on its own (48 graphs for a 12-step run instead of 2).
        compiling = torch.compiler.is_compiling()
        if self.early_exit and not compiling and site.name == self.stop_after and site.name in self.maps:
            raise MapsCaptured


class GuidanceMapStore(EarlyExitMapStore):
    """A map store that asks for probabilities only while ``active`` (guidance and verification passes).

    With ``early_exit`` it raises :class:`MapsCaptured` as soon as the map of ``stop_after`` (the
    last site of the grid in execution order, learnt on the first full pass) is complete: a guided
    pass needs the maps, not the UNet's output, so the layers after them (SD 1.5: the 32x32 and
    64x64 up blocks) are neither run nor backpropagated through. Not under ``torch.compile``:
    there the guided pass runs the whole UNet forward (the backward still stops at the maps in
    eager autograd; aot-autograd backends such as inductor run the compiled backward whole, with
    zero gradients for the unused output), so that one graph serves every guided step. That costs
    the layers after the maps: SD 1.5 at 512 px, 1.48x the early-exit pass's FLOPs with eager
    autograd, 2.05x with inductor (``python -m benchmarks.compile_graphs --guided-cost``).

    ``blocks`` chooses the UNet blocks whose layers at the grid are averaged: ``("down", "up")``
    (A&E and the paper: SD 1.5's down_blocks.2 and up_blocks.1) or ``("down",)``, which stops the
    guided pass after down_blocks.2 (no mid or up block in the forward or the backward).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        role: str = "cond",
        with_grad: bool = True,
        blocks: Sequence[str] = GUIDANCE_BLOCKS,
    ) -> None:
        blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
        if not blocks or set(blocks) - {"down", "mid", "up"}:
            raise ValueError(f"attention blocks must be some of ['down', 'mid', 'up'], got {blocks!r}")
        super().__init__(grids=[grid], role=role, with_grad=with_grad)
        self.blocks = frozenset(blocks)
        self.active = False
        self.early_exit = False
        self.stop_after: str | None = None

    def applies_to(self, site: Site) -> bool:
        return site.block in self.blocks and super().applies_to(site)

    def learn_last_site(self) -> None:
        """Remember the last site recorded by a full pass (``maps`` keeps completion order after ``clear``)."""
        if not torch.compiler.is_compiling() and self.stop_after is None and self.maps:  # eager only: see on_probs
            self.stop_after = list(self.maps)[-1]


def map_grid(latent_hw: tuple[int, int], divisor: int = 4) -> tuple[int, int]:
    """The attention grid used for guidance: a quarter of the latent side (16x16 for SD at 512 px)."""
    return math.ceil(latent_hw[0] / divisor), math.ceil(latent_hw[1] / divisor)


def map_divisor(unet_config) -> int:
    """Latent side / guidance-map side for a UNet: its lowest-resolution cross-attention level.

    A&E fixes 16x16 maps for SD 1.x/2.x at 512 px, which is the lowest-resolution cross-attention
    level of the down/up blocks (the mid block excluded): 64 / 4. Taking that level from the UNet's
    ``down_block_types`` gives the same 4 for SD 1.x/2.x and SDXL (32x32 at 1024 px) and the
    equivalent level for other topologies (a UNet with cross-attention in its first two levels
    only: 2), where a fixed quarter could fall below every cross-attention layer but the mid block.
    """
    levels = [i for i, kind in enumerate(unet_config.down_block_types) if "CrossAttn" in kind]
    return 2 ** levels[-1] if levels else 4


def step_sizes(
    num_steps: int, scale_factor: float = 20.0, scale_range: tuple[float, float] = (1.0, 0.5)
) -> list[float]:
    """A&E's latent step sizes: ``scale_factor * sqrt(linspace(scale_range))`` over the steps."""
    values = torch.linspace(scale_range[0], scale_range[1], max(num_steps, 1), dtype=torch.float64)
    return [float(scale_factor * math.sqrt(v)) for v in values]


def gaussian_smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian blur of ``(..., h, w)`` maps (A&E: kernel 3, sigma 0.5), reflect padding where possible."""
    coords = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - (kernel_size - 1) / 2
    kernel_1d = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :])[None, None]
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = kernel_size // 2
    mode = "reflect" if min(shape[-2:]) > pad else "replicate"
    flat = F.pad(flat, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(flat, kernel).reshape(shape)


def token_maps(
    probs: torch.Tensor,
    last_token: int,
    *,
    token_softmax_scale: float = 100.0,
    smooth: bool = True,
    kernel_size: int = 3,
    sigma: float = 0.5,
) -> torch.Tensor:
    """``(h, w, keys)`` attention -> ``(tokens, h, w)`` maps of the real prompt tokens (index 1..last).

    A&E: softmax over tokens 1..last of ``scale * probs`` (start-of-text and padding excluded),
    then optional Gaussian smoothing. Row ``k`` is the map of token ``k + 1``.
    """
    real = probs[..., 1 : last_token + 1].float()
    real = torch.softmax(real * token_softmax_scale, dim=-1).permute(2, 0, 1)  # (tokens, h, w)
    return gaussian_smooth(real, kernel_size, sigma) if smooth else real


def entity_maps(maps: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """A phrase's map: the sum over ALL its tokens (multi-piece words share the attention mass)."""
    return maps[[t - 1 for t in tokens]].sum(dim=0)


def _normalised(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return a / (a.amax() + eps)


def soft_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Soft IoU ``sum(min(a, b)) / sum(max(a, b))`` of max-normalised maps (in [0, 1])."""
    a, b = _normalised(a), _normalised(b)
    return torch.minimum(a, b).sum() / (torch.maximum(a, b).sum() + eps)


def centroid(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Centre of mass ``(x, y)`` of a non-negative map, coordinates in [0, 1] (cell centres)."""
    height, width = a.shape[-2:]
    ys = (torch.arange(height, dtype=a.dtype, device=a.device) + 0.5) / height
    xs = (torch.arange(width, dtype=a.dtype, device=a.device) + 0.5) / width
    mass = a.sum() + eps
    return torch.stack([(a.sum(dim=0) * xs).sum() / mass, (a.sum(dim=1) * ys).sum() / mass])


def min_peak(maps: torch.Tensor, aligned: AlignedConstraints) -> float:
    """The weakest entity's peak on ``(tokens, h, w)`` token maps (A&E's iterative-refinement test)."""
    return min((float(entity_maps(maps, tokens).amax()) for tokens in aligned.entities), default=1.0)


def missing_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """A&E's entity-missing loss: ``max_i (1 - max(map_i))`` (the most neglected entity)."""
    return torch.stack([1 - m.amax() for m in maps]).amax()


def mixing_loss(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Entity mixing: mean soft IoU over pairs of different entities' maps (0 when disjoint)."""
    pairs = [soft_iou(maps[i], maps[j]) for i in range(len(maps)) for j in range(i + 1, len(maps))]
    return torch.stack(pairs).mean() if pairs else maps[0].new_zeros(())


def binding_loss(attribute_maps: Sequence[torch.Tensor], noun_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attribute binding: mean ``1 - softIoU(attribute, noun)`` over the bindings."""
    return torch.stack([1 - soft_iou(a, n) for a, n in zip(attribute_maps, noun_maps)]).mean()


def relation_gap(subject: torch.Tensor, obj: torch.Tensor, relation: str, near_distance: float = 0.35) -> torch.Tensor:
    """How far the centroids are from satisfying ``relation``: > 0 violated, <= 0 satisfied.

    ``left``: x_subject - x_object; ``right``: the opposite; ``above``/``below`` likewise in y
    (y grows downwards); ``near``: centroid distance - ``near_distance``.
    """
    (xs, ys), (xo, yo) = centroid(subject), centroid(obj)
    if relation == "near":
        return torch.sqrt((xs - xo) ** 2 + (ys - yo) ** 2 + 1e-12) - near_distance
    gaps = {"left": xs - xo, "right": xo - xs, "above": ys - yo, "below": yo - ys}
    return gaps[relation]


def spatial_loss(
    subject: torch.Tensor, obj: torch.Tensor, relation: str, *, margin: float = 0.1, softness: float | None = None
) -> torch.Tensor:
    """Spatial relation as a margin hinge ``relu(gap + margin)`` (or ``softness * softplus(./softness)``).

    Unlike the paper's sigmoid of the centroid difference, the gradient does not vanish when the
    relation is badly violated.
    """
    gap = relation_gap(subject, obj, relation) + margin
    return F.relu(gap) if softness is None else softness * F.softplus(gap / softness)


@dataclass
class LossWeights:
    """Weights of the unified loss: entity missing, entity mixing, attribute binding, spatial."""

    missing: float = 1.0
    mixing: float = 0.5
    binding: float = 0.5
    spatial: float = 1.0
    spatial_margin: float = 0.1
    spatial_softness: float | None = None

    @property
    def any(self) -> bool:
        return any(w > 0 for w in (self.missing, self.mixing, self.binding, self.spatial))


@dataclass(frozen=True)
class LossPlan:
    """What :func:`constraint_loss` gathers, as device tensors, for one constraint set (:func:`loss_plan`).

    With a plan made once per generation the loss copies nothing from the host and branches only on
    the plan's Python fields, so a guided step that uses it can be captured whole (CUDA graphs).
    """

    selection: torch.Tensor  # (phrases, tokens): row p sums phrase p's token maps; entities first, then attributes
    entities: int
    missing: torch.Tensor | slice | None  # entity rows of the missing term; None: no such term
    first: torch.Tensor | None  # phrase rows of the soft-IoU pairs: the mixing pairs, then the bindings
    second: torch.Tensor | None
    mixing: int  # how many of the pairs are mixing pairs
    bindings: int
    coords: torch.Tensor | None  # (h * w, 2): (x, y) cell centres in [0, 1]; None: no relation
    subject: torch.Tensor | None  # entity rows of the relations' subjects and objects
    obj: torch.Tensor | None
    axis_signs: torch.Tensor | None  # (relations, 2): the relation's axis, signed (left/above +, right/below -)
    near: torch.Tensor | None  # (relations,) bool where the relation is "near"; None when none is
    near_distance: float


def loss_plan(
    aligned: AlignedConstraints,
    weights: LossWeights,
    maps_shape: Sequence[int],
    *,
    entities: set[int] | None = None,
    near_distance: float = 0.35,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LossPlan:
    """The :class:`LossPlan` of ``aligned`` for ``(tokens, h, w)`` maps: the terms ``weights`` turn on, ``entities``."""
    chosen = set(range(len(aligned.entities))) if entities is None else set(entities)
    count, (tokens, height, width) = len(aligned.entities), maps_shape
    bindings = [(t, e) for t, e, _ in aligned.bindings if e in chosen] if weights.binding > 0 else []
    mixing = [(i, j) for i in range(count) for j in range(i + 1, count) if i in chosen or j in chosen]
    mixing = mixing if weights.mixing > 0 and chosen else []
    pairs = mixing + [(count + k, e) for k, (_, e) in enumerate(bindings)]  # binding: (attribute row, noun row)
    relations = [r for r in aligned.relations if r[0] in chosen or r[2] in chosen] if weights.spatial > 0 else []
    index = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    selection = [[0.0] * tokens for _ in range(count + len(bindings))]
    for row, phrase in zip(selection, [*aligned.entities, *(t for t, _ in bindings)], strict=True):
        for token in phrase:
            row[token - 1] += 1.0  # row k of the maps is token k + 1
    missing = None
    if chosen and weights.missing > 0:
        order = sorted(chosen)
        missing = slice(0, count) if order == list(range(count)) else index(order)
    axes = {"left": (1.0, 0.0), "right": (-1.0, 0.0), "above": (0.0, 1.0), "below": (0.0, -1.0), "near": (0.0, 0.0)}
    cells = [((c % width + 0.5) / width, (c // width + 0.5) / height) for c in range(height * width)]
    near = [rel == "near" for _, rel, _ in relations]
    return LossPlan(
        selection=torch.tensor(selection, dtype=dtype, device=device), entities=count, missing=missing,
        first=index([i for i, _ in pairs]) if pairs else None, second=index([j for _, j in pairs]) if pairs else None,
        mixing=len(mixing), bindings=len(bindings),
        coords=torch.tensor(cells, dtype=dtype, device=device) if relations else None,
        subject=index([r[0] for r in relations]) if relations else None,
        obj=index([r[2] for r in relations]) if relations else None,
        axis_signs=torch.tensor([axes[r[1]] for r in relations], dtype=dtype, device=device) if relations else None,
        near=torch.tensor(near, device=device) if any(near) else None, near_distance=near_distance,
    )  # fmt: skip


def constraint_loss(
    maps: torch.Tensor,
    aligned: AlignedConstraints,
    weights: LossWeights,
    *,
    entities: set[int] | None = None,
    near_distance: float = 0.35,
    plan: LossPlan | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The unified loss on ``(tokens, h, w)`` maps and its terms; ``entities`` restricts it (selective loss).

    Terms (each a mean over its constraints): :func:`missing_loss` over the chosen entities,
    entity mixing (soft IoU of each pair with a chosen entity), :func:`binding_loss` and
    :func:`spatial_loss`. Computed vectorised, the same values as those functions applied one
    constraint at a time (to float rounding): every phrase map is one row of a selection-matrix
    product, and the IoUs, centroids and gaps are batched over pairs and relations, so the number
    of operations does not grow with the number of constraints. ``plan``: a :func:`loss_plan` made
    for the same ``aligned``, ``weights``, ``entities`` and map shape (built here when not given).
    """
    if plan is None:
        options = {"entities": entities, "near_distance": near_distance, "device": maps.device, "dtype": maps.dtype}
        plan = loss_plan(aligned, weights, maps.shape, **options)
    phrases = plan.selection @ maps.flatten(1)  # (phrases, h * w)
    peaks = phrases.amax(dim=1)
    terms: dict[str, torch.Tensor] = {}
    if plan.missing is not None:
        terms["missing"] = (1 - peaks[plan.missing]).amax()
    if plan.first is not None:
        normalised = phrases / (peaks[:, None] + 1e-8)
        first, second = normalised[plan.first], normalised[plan.second]
        ious = torch.minimum(first, second).sum(dim=1) / (torch.maximum(first, second).sum(dim=1) + 1e-8)
        if plan.mixing:
            terms["mixing"] = ious[: plan.mixing].mean()
        if plan.bindings:
            terms["binding"] = (1 - ious[plan.mixing :]).mean()
    if plan.coords is not None:
        gaps = _relation_gaps(phrases[: plan.entities], plan) + weights.spatial_margin
        softness = weights.spatial_softness
        losses = F.relu(gaps) if softness is None else softness * F.softplus(gaps / softness)
        terms["spatial"] = losses.mean()
    total = sum((getattr(weights, name) * value for name, value in terms.items()), maps.new_zeros(()))
    return total, terms


def _relation_gaps(entities: torch.Tensor, plan: LossPlan) -> torch.Tensor:
    """:func:`relation_gap` of each relation of the plan, ``(relations,)``, from one centroid product."""
    centroids = (entities @ plan.coords) / (entities.sum(dim=1, keepdim=True) + 1e-8)  # (entities, 2): (x, y)
    offsets = centroids[plan.subject] - centroids[plan.obj]  # (relations, 2)
    gaps = (offsets * plan.axis_signs).sum(dim=1)  # sign * (subject - object) on the relation's axis
    if plan.near is None:
        return gaps
    distance = torch.sqrt((offsets**2).sum(dim=1) + 1e-12) - plan.near_distance
    return torch.where(plan.near, distance, gaps)


# -- initial-noise refiners ---------------------------------------------------------------------
LossFn = Callable[[torch.Tensor, set[int]], torch.Tensor]


def single_step_refine(
    noise: torch.Tensor, faulty: Sequence[int], loss_fn: LossFn, *, step_size: float = 20.0
) -> torch.Tensor:
    """The paper's refinement: one gradient step of ``step_size`` on z_T per faulty entity."""
    refined = noise.detach().float()
    for entity in faulty:
        with torch.enable_grad():
            current = refined.clone().requires_grad_(True)
            loss = loss_fn(current, {entity})
            (grad,) = torch.autograd.grad(loss, current)
        refined = refined - step_size * grad
    return refined.to(noise.dtype)


def kl_to_standard_normal(mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Mean elementwise ``KL(N(mean, exp(log_var)) || N(0, 1)) = (mean^2 + var - 1 - log_var) / 2``."""
    return 0.5 * (mean**2 + log_var.exp() - 1 - log_var).mean()


def initno_refine(
    noise: torch.Tensor,
    faulty: Sequence[int],
    loss_fn: LossFn,
    *,
    steps: int = 10,
    learning_rate: float = 1e-2,
    kl_weight: float = 500.0,
    max_kl: float = 0.01,
) -> torch.Tensor:
    """InitNO-style refinement: Adam on ``z = mean + exp(log_var / 2) * z_T`` with a KL penalty.

    The KL to N(0, 1) is penalised (``kl_weight``) and bounded: a step that would take it past
    ``max_kl`` stops the optimisation, so the noise stays Gaussian-like.
    """
    base = noise.detach().float()
    mean = torch.zeros_like(base, requires_grad=True)
    log_var = torch.zeros_like(base, requires_grad=True)
    optimiser = torch.optim.Adam([mean, log_var], lr=learning_rate)
    best = base
    for _ in range(steps):
        with torch.enable_grad():
            latents = mean + (0.5 * log_var).exp() * base
            kl = kl_to_standard_normal(mean, log_var)
            if kl.item() > max_kl:
                break
            best = latents.detach()
            loss = loss_fn(latents, set(faulty)) + kl_weight * kl
            optimiser.zero_grad()
            loss.backward()
        optimiser.step()
    else:
        with torch.no_grad():
            if kl_to_standard_normal(mean, log_var).item() <= max_kl:
                best = (mean + (0.5 * log_var).exp() * base).detach()
    return best.to(noise.dtype)


def refine_in_rounds(
    noise: torch.Tensor,
    faulty: Sequence[int],
    rounds: int,
    refine: Callable[[torch.Tensor, Sequence[int]], torch.Tensor],
    regenerate: Callable[[torch.Tensor], tuple[torch.Tensor, list]],
    verifier,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, torch.Tensor, list] | None:
    """Stage 2 in up to ``rounds`` rounds: ``(latents, refined noise, report)`` of the best round, or ``None``.

    Round 1 is the paper's stage 2: ``refine(noise, faulty)``, then ``regenerate`` (stage 1 again, and the
    verifier's report). Each further round is editkit's extension: it refines the previous round's noise on
    the entities its image still fails, and runs only while a constraint fails. (InitNO's own rounds restart
    from fresh noise; continuing from the last round keeps stage 2 a refinement of stage 1's z_T. A refiner's
    bound, such as InitNO's KL, holds per round, so R rounds may move the noise up to R times as far.)
    The best round by ``verifier.rank`` is returned (the earliest on a tie); the caller compares it with
    stage 1. ``stop()`` (a callback's interrupt) ends the rounds early.
    """
    best = None
    for _ in range(rounds):
        if not faulty or stop():
            break
        noise = refine(noise, faulty)
        latents, report = regenerate(noise)
        if best is None or verifier.rank(report) > verifier.rank(best[2]):
            best = (latents, noise, report)
        faulty = verifier.faulty_entities(report) if not all(status.satisfied for status in report) else []
    return best
