"""Attention controllers: the policy run inside editkit's one attention processor.

A controller overrides only the hooks it needs; the base class is the identity. Tensors are in
diffusers' layout:

- ``on_context``: ``(batch, text_tokens, dim)``, cross-attention sites only;
- ``on_qkv``: ``(batch, heads, tokens, head_dim)`` each, after ``norm_q``/``norm_k``;
- ``softmax_scale``: the logit scale (``default`` is ``1 / sqrt(head_dim)``, or the previous
  controller's choice); return ``None`` to keep the kernel's default;
- ``on_probs``: ``(batch, heads, queries, keys)`` for the query rows ``queries`` (a slice): the
  explicit-probability kernel is chunked over queries, so a controller sees the map in pieces
  and must not assume one call per layer. Keys that a controller inserted into the context
  (``inserted_tokens``, e.g. SoftREPA's soft tokens) are removed first, so token indices of the
  prompt never shift;
- ``on_output``: ``(batch, tokens, dim)``, the layer's output after ``to_out`` (before the
  residual connection and output rescaling).

On MM-DiT transformers (SD3 / SD3.5, FLUX.1) the hooks keep their names; ``on_context`` gets the
text stream, ``on_qkv`` the joint q/k/v in the order of ``site.layout``, ``on_probs`` the
image-query x text-key block (``queries`` indexes image tokens), ``on_output`` the image part
(details in ``editkit.attention.mmdit_processor``).

State lives on the controller, keyed by site name. Stores overwrite by site (gradient
checkpointing runs every processor twice). Batch roles (classifier-free guidance's
``("uncond", "cond")``, editing's ``("source", "target")``) are told to the controller by the
pipeline through ``batch_roles``; the batch is those roles' contiguous, equally sized chunks in
that order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from editkit.attention.sites import Site

__all__ = ["AttentionController", "ControllerList", "compose"]


class AttentionController:
    """Identity controller: every hook leaves the attention computation unchanged."""

    def __init__(self) -> None:
        self.batch_roles: tuple[str, ...] | None = None
        self.step_index: int | None = None
        self.timestep: int | None = None

    # -- which sites -------------------------------------------------------------------------
    def applies_to(self, site: Site) -> bool:
        """Whether the processor should be installed on ``site`` (decided at attach time)."""
        return True

    def wants_probs(self, site: Site) -> bool:
        """Whether this call needs explicit attention probabilities (decided per call)."""
        return False

    def register_hooks(self, model: torch.nn.Module) -> list:
        """Module hooks the controller needs while attached to ``model`` (their handles; ``attach``
        removes them on exit). None by default; e.g. MM-DiT soft tokens read the call's ``temb``."""
        return []

    # -- schedule ----------------------------------------------------------------------------
    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        """Called by the pipeline before the UNet evaluations of denoising/inversion step ``index``."""
        self.step_index = index
        self.timestep = int(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)

    def inserted_tokens(self, site: Site) -> tuple[int, int] | None:
        """``(start, count)`` of context tokens this controller inserts at ``site``, if any."""
        return None

    # -- hooks -------------------------------------------------------------------------------
    def on_context(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        return context

    def on_qkv(
        self, site: Site, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return query, key, value

    def softmax_scale(self, site: Site, default: float | None) -> float | None:
        return default

    def on_probs(self, site: Site, probs: torch.Tensor, queries: slice) -> None:
        return None

    def on_output(self, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    # -- batch roles -------------------------------------------------------------------------
    def role_rows(self, role: str, batch_size: int) -> slice:
        """The rows of a batch of ``batch_size`` that belong to ``role``.

        Without declared roles the whole batch is returned (one role).
        """
        roles = self.batch_roles
        if not roles:
            return slice(0, batch_size)
        if role not in roles:
            raise KeyError(f"batch role {role!r} not among the declared roles {roles}")
        if batch_size % len(roles):
            raise ValueError(f"batch of {batch_size} rows cannot hold the {len(roles)} roles {roles}")
        chunk = batch_size // len(roles)
        start = roles.index(role) * chunk
        return slice(start, start + chunk)


class ControllerList(AttentionController):
    """Several controllers run in order; each hook sees the previous controller's result.

    A controller's hooks run only on the sites it applies to. Batch roles and steps set on the
    list reach every member.
    """

    def __init__(self, controllers: Iterable[AttentionController]) -> None:
        super().__init__()
        self.controllers: list[AttentionController] = []
        for controller in controllers:
            if isinstance(controller, ControllerList):
                self.controllers.extend(controller.controllers)
            else:
                self.controllers.append(controller)
        self._active_cache: dict[str, list[AttentionController]] = {}

    @property
    def batch_roles(self) -> tuple[str, ...] | None:  # type: ignore[override]
        roles = {c.batch_roles for c in getattr(self, "controllers", [])}
        return roles.pop() if len(roles) == 1 else None

    @batch_roles.setter
    def batch_roles(self, roles: Sequence[str] | None) -> None:
        for controller in getattr(self, "controllers", []):
            controller.batch_roles = tuple(roles) if roles is not None else None

    def _active(self, site: Site) -> list[AttentionController]:
        active = self._active_cache.get(site.name)
        if active is None:
            active = [c for c in self.controllers if c.applies_to(site)]
            self._active_cache[site.name] = active
        return active

    def applies_to(self, site: Site) -> bool:
        return bool(self._active(site))

    def wants_probs(self, site: Site) -> bool:
        return any(c.wants_probs(site) for c in self._active(site))

    def inserted_tokens(self, site: Site) -> tuple[int, int] | None:
        insertions = [i for i in (c.inserted_tokens(site) for c in self._active(site)) if i is not None]
        if len(insertions) > 1:
            raise ValueError(f"several controllers insert context tokens at {site.name}; combine them into one")
        return insertions[0] if insertions else None

    def register_hooks(self, model: torch.nn.Module) -> list:
        return [handle for controller in self.controllers for handle in controller.register_hooks(model)]

    def begin_step(self, index: int, timestep: int | float | torch.Tensor) -> None:
        super().begin_step(index, timestep)
        for controller in self.controllers:
            controller.begin_step(index, timestep)

    def on_context(self, site: Site, context: torch.Tensor) -> torch.Tensor:
        for controller in self._active(site):
            context = controller.on_context(site, context)
        return context

    def on_qkv(self, site, query, key, value):
        for controller in self._active(site):
            query, key, value = controller.on_qkv(site, query, key, value)
        return query, key, value

    def softmax_scale(self, site: Site, default: float | None) -> float | None:
        for controller in self._active(site):
            default = controller.softmax_scale(site, default)
        return default

    def on_probs(self, site: Site, probs: torch.Tensor, queries: slice) -> None:
        for controller in self._active(site):
            if controller.wants_probs(site):
                controller.on_probs(site, probs, queries)

    def on_output(self, site: Site, hidden_states: torch.Tensor) -> torch.Tensor:
        for controller in self._active(site):
            hidden_states = controller.on_output(site, hidden_states)
        return hidden_states


def compose(*controllers: AttentionController | None) -> AttentionController:
    """One controller from several (``None`` entries are skipped); a single one is returned as is."""
    present = [c for c in controllers if c is not None]
    if not present:
        return AttentionController()
    return present[0] if len(present) == 1 else ControllerList(present)
