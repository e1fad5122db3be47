"""Ready-made recording controllers: cross-attention maps, per-site q/k/v, self-attention outputs.

Every store keys what it keeps by site name (and timestep where it says so) and overwrites on a
repeated call, so gradient checkpointing's second run of a processor never duplicates entries.

On MM-DiT transformers (SD3 / SD3.5, FLUX.1) the same stores work on the MM-DiT kinds: the map
store keeps the image-query x text-key block of joint and single sites, the q/k/v recorder the
joint q/k/v (or their image or text part, ``part=``) of the kinds it is given, the output recorder
the image part of every image-attending site.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from editkit.attention.controller import AttentionController
from editkit.attention.sites import IMAGE_KINDS, TEXT_KINDS, Site, site_matches

__all__ = ["CrossAttentionMapStore", "QKVRecorder", "SelfAttentionOutputRecorder"]


class _SiteFilter(AttentionController):
    """A controller restricted to a kind (or kinds) of site and, optionally, named sites (patterns)."""

    kind: str | tuple[str, ...] = "self"

    def __init__(self, sites: str | Sequence[str] | None = None, role: str | None = None) -> None:
        super().__init__()
        self.site_patterns = sites
        self.role = role

    def applies_to(self, site: Site) -> bool:
        kinds = (self.kind,) if isinstance(self.kind, str) else self.kind
        return site.kind in kinds and site_matches(site.name, self.site_patterns)

    def rows(self, batch_size: int) -> slice:
        return self.role_rows(self.role, batch_size) if self.role is not None else slice(0, batch_size)


class CrossAttentionMapStore(_SiteFilter):
    """Head-averaged cross-attention probabilities of chosen grids, for one batch role.

    On UNets from the cross-attention sites; on MM-DiT transformers the image-query x text-key
    block of joint and single sites (normalised over all keys, as the model computes it).

    Args:
        grids: token grids to keep, e.g. ``[(16, 16)]``; ``None`` keeps every grid.
        role: the batch role to keep (``"cond"`` under classifier-free guidance); ``None`` keeps
            the whole batch.
        sites: optional site patterns (see ``select_sites``).
        with_grad: keep the autograd graph (for losses on the maps); otherwise detached.

    ``maps[site]`` is ``(batch, height, width, text_tokens)``.
    """

    kind = TEXT_KINDS

    def __init__(
        self,
        grids: Sequence[tuple[int, int]] | None = None,
        role: str | None = "cond",
        sites: str | Sequence[str] | None = None,
        with_grad: bool = False,
    ) -> None:
        super().__init__(sites, role)
        self.grids = None if grids is None else {tuple(g) for g in grids}
        self.with_grad = with_grad
        self.maps: dict[str, torch.Tensor] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}

    def wants_probs(self, site: Site) -> bool:
        return site.grid is not None and (self.grids is None or site.grid in self.grids)

    def on_probs(self, site: Site, probs: torch.Tensor, queries: slice) -> None:
        probs = probs[self.rows(probs.shape[0])].mean(dim=1)  # (batch, queries, keys)
        if not self.with_grad:
            probs = probs.detach()
        chunks = [] if queries.start == 0 else self._pending.get(site.name, [])
        chunks.append(probs)
        height, width = site.grid
        if queries.stop == height * width:
            full = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
            self.maps[site.name] = full.reshape(full.shape[0], height, width, full.shape[-1])
            self._pending.pop(site.name, None)
        else:
            self._pending[site.name] = chunks

    def aggregate(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Mean of the stored maps over sites (of ``grid`` when given): ``(batch, h, w, tokens)``."""
        maps = [m for m in self.maps.values() if grid is None or tuple(m.shape[1:3]) == tuple(grid)]
        if not maps:
            raise RuntimeError("no cross-attention maps were recorded (wrong grid or sites?)")
        shapes = {tuple(m.shape) for m in maps}
        if len(shapes) > 1:
            raise ValueError(f"stored maps have different shapes {sorted(shapes)}; pass a grid")
        return torch.stack(maps).mean(dim=0)

    def clear(self) -> None:
        self.maps.clear()
        self._pending.clear()


class QKVRecorder(_SiteFilter):
    """Queries, keys and/or values per (site, timestep), for one batch role.

    Args:
        sites: site patterns (self-attention sites by default kind).
        keep: which of ``"query"``, ``"key"``, ``"value"`` to record (only those are stored).
        role: batch role to keep; ``None`` keeps the whole batch.
        dtype: storage dtype (float16 by default: half the memory of the research code's fp32).
        offload: move recordings to this device (e.g. ``"cpu"``) as they are made.
        kind: the site kind(s) to record: ``"self"`` or ``"cross"`` on UNets, ``"joint"``,
            ``"image_self"`` or ``"single"`` on MM-DiT transformers (or a tuple of kinds).
        part: ``"all"`` tokens of the (joint) sequence, or only its ``"image"`` or ``"text"``
            tokens (``site.layout``; MM-DiT sites only).

    ``records[(site, timestep)]`` maps ``"query"``/``"key"``/``"value"`` to
    ``(batch, heads, tokens, head_dim)`` tensors; the timestep is the one given to
    ``begin_step`` (the exact scheduler timestep).
    """

    def __init__(
        self,
        sites: str | Sequence[str] | None = None,
        keep: Sequence[str] = ("query", "key", "value"),
        role: str | None = None,
        dtype: torch.dtype | None = torch.float16,
        offload: str | torch.device | None = None,
        kind: str | tuple[str, ...] = "self",
        part: str = "all",
    ) -> None:
        super().__init__(sites, role)
        unknown = set(keep) - {"query", "key", "value"}
        if unknown:
            raise ValueError(f"QKVRecorder can keep 'query', 'key', 'value', not {sorted(unknown)}")
        if part not in ("all", "image", "text"):
            raise ValueError(f"QKVRecorder part must be 'all', 'image' or 'text', not {part!r}")
        self.kind = kind
        self.part = part
        self.keep = tuple(keep)
        self.dtype = dtype
        self.offload = offload
        self._by_step: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self._step: dict[str, dict[str, torch.Tensor]] | None = None

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        super().begin_step(index, timestep)
        # The step's own dict, looked up here rather than in the hooks: traced code then reads no
        # timestep, so torch.compile sees the same graph at every step.
        self._step = self._by_step.setdefault(self.timestep, {})

    @property
    def records(self) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
        """``{(site, timestep): {"query"|"key"|"value": tensor}}`` of everything recorded so far."""
        return {(site, t): rec for t, step in self._by_step.items() for site, rec in step.items()}

    def on_qkv(self, site, query, key, value):
        if self._step is None:
            raise RuntimeError("QKVRecorder needs begin_step(index, timestep) before each UNet call")
        tensors = {"query": query, "key": key, "value": value}
        rows = self.rows(query.shape[0])
        tokens = self._tokens(site)
        self._step[site.name] = {name: self._stored(tensors[name][rows, :, tokens]) for name in self.keep}
        return query, key, value

    def _tokens(self, site: Site) -> slice:
        if self.part == "all":
            return slice(None)
        if site.layout is None:
            raise ValueError(f"QKVRecorder part={self.part!r} needs an MM-DiT site; {site.name} has no token layout")
        return site.layout.image if self.part == "image" else site.layout.text

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """One contiguous copy: reuse from memory and from a reloaded (contiguous) file agree bit for bit."""
        device = self.offload or tensor.device
        return torch.empty(tensor.shape, dtype=self.dtype or tensor.dtype, device=device).copy_(tensor.detach())

    def nbytes(self) -> int:
        """Bytes held by the recordings."""
        return sum(t.numel() * t.element_size() for rec in self.records.values() for t in rec.values())


class SelfAttentionOutputRecorder(_SiteFilter):
    """Self-attention layer outputs (after ``to_out``) by site, for one batch role.

    ``outputs[site]`` is ``(batch, tokens, dim)``; with ``keep_grad`` the tensor stays in the
    autograd graph (contrastive losses backpropagate through it), otherwise it is detached.
    ``kind`` selects the sites: by default UNet self-attention and, on MM-DiT transformers, the
    image part of the joint, image-only and single-stream sites' outputs.
    """

    def __init__(
        self,
        sites: str | Sequence[str] | None = None,
        role: str | None = None,
        keep_grad: bool = False,
        kind: str | tuple[str, ...] = IMAGE_KINDS,
    ) -> None:
        super().__init__(sites, role)
        self.kind = kind
        self.keep_grad = keep_grad
        self.outputs: dict[str, torch.Tensor] = {}
        self.grids: dict[str, tuple[int, int] | None] = {}

    def on_output(self, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
        kept = hidden_states[self.rows(hidden_states.shape[0])]
        self.outputs[site.name] = kept if self.keep_grad else kept.detach()
        self.grids[site.name] = site.grid
        return hidden_states

    def clear(self) -> None:
        self.outputs.clear()
        self.grids.clear()
