"""Diagnostic for MM-DiT style transfer on the shapes world: object-aware matching from ground-truth masks.

Not a method of editkit. :func:`oracle_matching` swaps the style pipeline's injection controller for one
whose injected attention keeps each content image query on the matching part of the style: queries on the
content's objects see only the style's object keys, the others only the style's background keys (text keys
for all, as without it). The masks are the scenes' own (``benchmarks.shapes.style_metrics.scene_mask``),
so the figures are an upper bound on what better query-key correspondence could give, not a setting a user
has. The restriction rides on two extra q / k dimensions whose product is a -1e4 logit penalty, as the
controller's own ``mask`` option does; the softmax scale stays ``1 / sqrt(head_dim)``.

:func:`ideal_stylization` draws what a perfect stylization of a pair would be (the content's objects, coloured
and patterned as the style's, on the style's background), so that the stylize metrics' ceiling can be read::

    python -m benchmarks.style_oracle --pairs 64
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from editkit.flow_style import _MASK_PENALTY, FlowStyleInjectionController, _with_extra

#: A token belongs to an object when the object covers at least this share of its pixels.
TOKEN_COVER = 0.25


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
            big = math.sqrt(_MASK_PENALTY * math.sqrt(self._head_dim))
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


def ideal_stylization(content_scene, style_scene, keep_background: bool = False) -> np.ndarray:
    """The content's objects (shapes, positions, sizes) in the style's object colours and patterns (object ``i``
    takes style object ``i`` modulo their count), on the style's background (or the content's)."""
    from benchmarks.shapes.world import render

    styled = [
        dataclasses.replace(obj, color=source.color, pattern=source.pattern)
        for i, obj in enumerate(content_scene.objects)
        for source in [style_scene.objects[i % len(style_scene.objects)]]
    ]
    background = content_scene.background if keep_background else style_scene.background
    return render(dataclasses.replace(content_scene, objects=tuple(styled), background=background))


def metric_ceiling(pairs: int, keep_background: bool = False) -> dict:
    """The stylize benchmark's figures for :func:`ideal_stylization` on its pairs (seeds 101 / 202)."""
    from benchmarks.shapes.style_metrics import score_pair, stylize_pairs

    (contents, content_scenes), (styles, style_scenes) = stylize_pairs(pairs)
    scores = [
        score_pair(content, style, ideal_stylization(cs, ss, keep_background), cs, ss)
        for content, style, cs, ss in zip(contents, styles, content_scenes, style_scenes, strict=True)
    ]
    moved = [s["colour_moved_toward_style"] > 0 for s in scores]
    kept = [s["content_mask_iou"] >= 0.7 for s in scores]
    return {
        "pairs": pairs,
        "background": "content's" if keep_background else "style's",
        "palette_nearer_style_than_content": float(np.mean([s["palette_nearer_style"] for s in scores])),
        "colour_moved_toward_style": float(np.mean(moved)),
        "content_mask_iou_at_least_0.7": float(np.mean(kept)),
        "success_moved_and_iou_0.7": float(np.mean([m and k for m, k in zip(moved, kept, strict=True)])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="the stylize metrics on ideal stylizations of the shapes pairs")
    parser.add_argument("--pairs", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps([metric_ceiling(args.pairs, keep) for keep in (False, True)], indent=2))


if __name__ == "__main__":
    main()
