"""The object-matching diagnostic of benchmarks/style_oracle.py: its kernel inputs give the attention written by
hand with mismatched style keys removed (object queries see style objects, the rest the style background)."""

from __future__ import annotations

import math

import numpy as np
import torch

from benchmarks.style_oracle import ideal_stylization, matched_controller, oracle_matching, token_mask
from editkit.attention import AttentionController, attach
from editkit.backbones import backbone_for
from editkit.flow_style import FlowStyleInjectionController, timestep_key
from editkit.style import StyleCache

SITE = "transformer_blocks.0.attn"


class _Probe(AttentionController):
    """Runs after the injection: the kernel's output from the inputs it is given (and the first inputs seen)."""

    def __init__(self, scale_of):
        super().__init__()
        self.scale_of, self.out, self.first = scale_of, None, None

    def applies_to(self, site):
        return site.name == SITE

    def on_qkv(self, site, query, key, value):
        if self.first is None:
            self.first = (query.clone(), key.clone(), value.clone(), site.layout.image, site.grid)
        self.out = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=self.scale_of(site, None))
        return query, key, value


def test_token_mask_counts_a_token_when_a_quarter_is_covered():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # token (0, 0) of a 2x2 grid whole
    mask[4, 4] = True  # token (1, 1): 1 of 16 pixels
    mask[:2, 4:6] = True  # token (0, 1): 4 of 16 pixels
    assert token_mask(mask, (2, 2)).tolist() == [1.0, 1.0, 0.0, 0.0]


@torch.no_grad()
def test_matched_injection_equals_hand_written_masked_attention(sd3_pipe):
    backbone = backbone_for(sd3_pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = backbone.encode_text("a")

    def call():
        return backbone.denoise(latents, torch.tensor(500.0), text)

    probe = _Probe(lambda site, default: default)
    with attach(sd3_pipe.transformer, probe):
        call()
    query, key, value, image, grid = probe.first
    tokens = image.stop - image.start
    heads, dim = query.shape[1], query.shape[-1]
    k = timestep_key(500.0)
    generator = torch.Generator().manual_seed(1)
    style_k, style_v = (torch.randn(1, heads, tokens, dim, generator=generator) for _ in range(2))
    style = StyleCache("style", {(SITE, k): {"key": style_k, "value": style_v}}, torch.zeros(1, 4, 8, 8), "x",
                       (64, 64), 1, 0, (SITE,), (k,))  # fmt: skip
    side = 64
    content_mask, style_mask = np.zeros((side, side), dtype=bool), np.zeros((side, side), dtype=bool)
    content_mask[:, : side // 2] = True  # left half
    style_mask[: side // 4] = True  # top quarter
    controller = matched_controller(content_mask, style_mask)([SITE], style, gamma=0.0, tau=1.0, keys=[k])
    probe = _Probe(controller.softmax_scale)
    with attach(sd3_pipe.transformer, [controller, probe]):
        controller.begin_step(0, 500.0)
        call()

    on_content, on_style = token_mask(content_mask, grid).bool(), token_mask(style_mask, grid).bool()
    assert 0 < on_content.sum() < tokens and 0 < on_style.sum() < tokens
    keys = torch.cat([style_k, key[:, :, image.stop :]], dim=2)
    values = torch.cat([style_v, value[:, :, image.stop :]], dim=2)
    logits = query @ keys.transpose(-1, -2) / math.sqrt(dim)
    allowed = torch.ones(query.shape[-2], keys.shape[-2], dtype=torch.bool)
    allowed[image, :tokens] = on_content[:, None] == on_style[None, :]
    expected = logits.masked_fill(~allowed, -math.inf).softmax(-1) @ values
    torch.testing.assert_close(probe.out, expected, rtol=1e-5, atol=1e-5)


def test_oracle_context_swaps_the_pipeline_controller_and_restores_it():
    import pipelines.flow_style_transfer as module

    mask = np.ones((4, 4), dtype=bool)
    with oracle_matching(mask, mask):
        assert issubclass(module.FlowStyleInjectionController, FlowStyleInjectionController)
        assert module.FlowStyleInjectionController is not FlowStyleInjectionController
    assert module.FlowStyleInjectionController is FlowStyleInjectionController


def test_ideal_stylization_keeps_the_content_mask_and_takes_the_style_colours():
    from benchmarks.shapes.style_metrics import scene_mask
    from benchmarks.shapes.world import BACKGROUNDS, COLORS, sample_batch

    _, _, contents = sample_batch(seed=5, n=6, training=False, pattern_prob=0.0)
    _, _, styles = sample_batch(seed=6, n=6, training=False, pattern_prob=0.0, background_prob=1.0)
    for content, style in zip(contents, styles, strict=True):
        image = ideal_stylization(content, style)
        mask = scene_mask(content)
        assert (image[~mask] == BACKGROUNDS[style.background]).all()
        assert (image[mask] == COLORS[style.objects[0].color]).all(axis=-1).any()  # the first object's colour
        kept = ideal_stylization(content, style, keep_background=True)
        assert (kept[~mask] == BACKGROUNDS[content.background]).all()
