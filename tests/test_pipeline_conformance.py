"""diffusers conformance of editkit's three pipelines: batched inputs, image formats, outputs.

Each test runs every pipeline on tiny SD 1.5 components (32 px, two steps) and checks one
convention of diffusers' stock pipelines (issue 19).
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from editkit.errors import InputError
from editkit.testing import tiny_sd15_components

SIZE = 32
PIPELINES = ("stylize", "edit", "compose")


def _rand_images(batch: int, seed: int = 0) -> torch.Tensor:
    """(batch, 3, SIZE, SIZE) in [0, 1], diffusers' tensor convention."""
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pipes():
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    components = {k: v for k, v in tiny_sd15_components(words=("cat", "dog")).items() if k != "safety_checker"}
    built = {
        "stylize": StyleTransferPipeline(**components),
        "edit": ContrastiveEditPipeline(**{k: v for k, v in components.items() if k in _BASE}),
        "compose": ComposePipeline(**{k: v for k, v in components.items() if k in _BASE}),
    }
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


_BASE = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def _call(pipes, name: str, image=None, **kwargs):
    """Run one pipeline with its smallest useful arguments (image: the content/edited image)."""
    pipe = pipes[name]
    image = _rand_images(1) if image is None else image
    if name == "stylize":
        kwargs.setdefault("style_image", _rand_images(1, seed=1))
        return pipe(image, num_inference_steps=2, **kwargs)
    if name == "edit":
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        kwargs.setdefault("contrast", None)
        return pipe(image, "a cat", "a dog", num_inference_steps=2, **kwargs)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(kwargs.pop("prompt", "a cat"), height=SIZE, width=SIZE, num_inference_steps=2, refine=False, **kwargs)


# -- 1. every item of a batch is processed ------------------------------------------------------
@pytest.mark.parametrize("name", ["stylize", "edit"])
def test_batched_image_gives_one_output_per_item_equal_to_its_own_run(pipes, name):
    batch = _rand_images(2)
    together = _call(pipes, name, batch, output_type="np").images
    assert together.shape == (2, SIZE, SIZE, 3)
    if name == "edit":  # one generator per item: item 1 is its own run with generator 1
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        together = _call(pipes, name, batch, output_type="np", generator=generators).images
    alone = _call(pipes, name, batch[1:], output_type="np", generator=torch.Generator().manual_seed(1)).images
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 1e-3  # the items really differ


def test_edit_with_contrast_and_one_generator_per_item_equals_each_item_alone(pipes):
    """The PatchNCE term too: per-item patch locations and a step not divided by the batch size."""
    batch = _rand_images(2)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    options = {"contrast": "dual", "num_patches": 8, "output_type": "latent"}
    together = _call(pipes, "edit", batch, generator=generators, **options).images
    alone = _call(pipes, "edit", batch[1:], generator=torch.Generator().manual_seed(1), **options).images
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-4)
