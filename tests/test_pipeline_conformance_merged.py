"""diffusers batching next to the method options merged beside it (issues 16, 17 and 19 together).

Batches must carry every method option: stylize's ``feature_timing`` per content image and cache,
compose's ``loss_preset`` and ``verifier`` per prompt. Tiny SD 1.5 components, 32 px, two steps.
"""

from __future__ import annotations

import pytest
import torch

from editkit.errors import InputError
from editkit.ip_adapter import IP_ADAPTER_BLOCKS
from editkit.testing import tiny_sd15_components

SIZE = 32
_BASE = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


@pytest.fixture(scope="module")
def pipes():
    from pipelines.compose import ComposePipeline
    from pipelines.style_transfer import StyleTransferPipeline

    components = {k: v for k, v in tiny_sd15_components(words=("cat", "dog")).items() if k != "safety_checker"}
    built = {
        "stylize": StyleTransferPipeline(**components),
        "compose": ComposePipeline(**{k: v for k, v in components.items() if k in _BASE}),
    }
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def _rand_images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_attensts_sdxl_style_blocks_are_the_ip_adapter_defaults():
    """issue 16's blocks survive the move to editkit.ip_adapter: style in up_blocks.0.attentions.1 and .2."""
    assert IP_ADAPTER_BLOCKS["sdxl"][1] == {"up": {"block_0": [0.0, 1.0, 1.0]}}


def test_stylize_batch_with_inverted_latent_timing_equals_each_image_alone(pipes):
    pipe, style = pipes["stylize"], _rand_images(1, seed=1)
    contents = _rand_images(2)
    options = {"num_inference_steps": 2, "feature_timing": "inverted_latent", "output_type": "latent"}
    together = pipe(contents, style, **options)
    alone = pipe(contents[1:], style, **options)
    torch.testing.assert_close(together.images[1:], alone.images, atol=1e-5, rtol=1e-4)
    plain = pipe(contents[1:], style, **{**options, "feature_timing": "inversion_step"})
    assert (plain.images - alone.images).abs().max() > 1e-4  # the timing reaches the batched run
    caches = together.content_caches + together.style_caches
    assert len(together.content_caches) == 2
    assert {cache.extra["feature_timing"] for cache in caches} == {"inverted_latent"}
    with pytest.raises(InputError, match="feature_timing"):  # each given content cache is checked
        pipe(contents, style, num_inference_steps=2, content_cache=together.content_caches)


@pytest.mark.parametrize("preset", ["attend-excite", "paper"])
def test_compose_prompt_list_with_a_loss_preset_equals_each_prompt_alone(pipes, preset):
    compose = pipes["compose"]
    common = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "max_iter_to_alter": 2, "refine": False}
    common |= {"loss_preset": preset, "output_type": "latent"}
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    prompts = ["a cat", "a cat and a dog"]  # two entities: the paper's missing loss is a peak difference
    together = compose(prompts, generator=generators, **common)
    alone = compose(prompts[1], generator=torch.Generator().manual_seed(1), **common)
    torch.testing.assert_close(together.images[1:], alone.images, atol=1e-5, rtol=1e-4)
    unguided = compose(prompts[1], generator=torch.Generator().manual_seed(1), **{**common, "max_iter_to_alter": 0})
    assert (unguided.images - alone.images).abs().max() > 0  # the preset's loss guided the batch item
    other = "paper" if preset == "attend-excite" else "attend-excite"
    other_run = compose(prompts, generator=generators, **{**common, "loss_preset": other})
    assert (other_run.images[1:] - together.images[1:]).abs().max() > 0  # and it was this preset's loss


def test_compose_prompt_list_refuses_an_unknown_preset_and_reports_per_image(pipes):
    compose = pipes["compose"]
    common = {"height": SIZE, "width": SIZE, "num_inference_steps": 2, "max_iter_to_alter": 1}
    with pytest.raises(InputError, match="loss preset"):
        compose(["a cat", "a dog"], loss_preset="neither", **common)
    out = compose(["a cat", "a dog"], verifier="shapes", generator=torch.Generator().manual_seed(0), **common)
    assert len(out.report_before) == 2 and len(out.warnings) == 2
    assert all(status.verifier == "shapes" for report in out.report_before for status in report)
