"""Diagnostic for MM-DiT style transfer on the shapes world: object-aware matching from ground-truth masks.

Not a method of editkit. :func:`oracle_matching` swaps the style pipeline's injection controller for one
whose injected attention keeps each content image query on the matching part of the style: queries on the
content's objects see only the style's object keys, the others only the style's background keys (text keys
for all, as without it). The masks are the scenes' own (``benchmarks.shapes.style_metrics.scene_mask``),
so the figures are an upper bound on what better query-key correspondence could give, not a setting a user
has. The restriction rides on two extra q / k dimensions whose product is a -1e4 logit penalty, as the
controller's own ``mask`` option does; the softmax scale stays ``1 / sqrt(head_dim)``.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from editkit.flow_style import FlowStyleInjectionController, _with_extra

#: A token belongs to an object when the object covers at least this share of its pixels.
TOKEN_COVER = 0.25
_PENALTY = 1e4


def token_mask(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool pixel mask -> flattened {0, 1} float mask of the ``grid`` tokens it covers by TOKEN_COVER."""
    covered = F.interpolate(torch.from_numpy(mask).float()[None, None], size=grid, mode="area")[0, 0]
    return (covered >= TOKEN_COVER).reshape(-1).float()


def matched_controller(content_mask: np.ndarray, style_mask: np.ndarray) -> type:
    """A :class:`FlowStyleInjectionController` subclass restricted to object <-> object, rest <-> rest."""

    class ObjectMatchedInjection(FlowStyleInjectionController):
        def on_qkv(self, site, query, key, value):
            query, key, value = super().on_qkv(site, query, key, value)
            if self._key is None or site.name not in self.sites:
                return query, key, value
            if self.mask is not None:
                raise ValueError("the oracle does not combine with the mask option")
            self._head_dim = query.shape[-1]
            image = site.layout.image  # after the swap the image keys are the style's
            on_content, on_style = token_mask(content_mask, site.grid), token_mask(style_mask, site.grid)
            big = math.sqrt(_PENALTY * math.sqrt(self._head_dim))
            query_extra, key_extra = query.new_zeros(query.shape[-2], 2), key.new_zeros(key.shape[-2], 2)
            query_extra[image, 0], query_extra[image, 1] = big * on_content, big * (1 - on_content)
            key_extra[image, 0], key_extra[image, 1] = -big * (1 - on_style), -big * on_style
            return _with_extra(query, query_extra), _with_extra(key, key_extra), value

        def softmax_scale(self, site, default):
            if self._key is None or site.name not in self.sites or default is not None:
                return default
            return 1.0 / math.sqrt(self._head_dim)

    return ObjectMatchedInjection


@contextlib.contextmanager
def oracle_matching(content_mask: np.ndarray, style_mask: np.ndarray):
    """Within the block, ``pipelines.flow_style_transfer`` injects with the object-matched controller."""
    import pipelines.flow_style_transfer as module

    original = module.FlowStyleInjectionController
    module.FlowStyleInjectionController = matched_controller(content_mask, style_mask)
    try:
        yield
    finally:
        module.FlowStyleInjectionController = original
