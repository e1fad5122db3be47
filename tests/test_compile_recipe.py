"""diffusers' compile recipe, ``pipe.unet = torch.compile(pipe.unet)``, works with every editkit pipeline.

The wrapper (``OptimizedModule``) is what broke editkit (its type, its ``_orig_mod.`` name
prefixes); tracing itself is tested in ``test_acceleration``. Dynamo is switched off here so the
wrapper's forward calls the module directly and the test stays fast.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from editkit.attention import attention_sites
from editkit.models import model_family

PROMPT = "a red circle on the left of a blue square"


def _runs():
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    image = Image.new("RGB", (64, 64), (200, 40, 40))
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    edit = {"num_inference_steps": 1, "output_type": "pt"}
    return {
        "stylize": (StyleTransferPipeline, lambda p: p(image, image, num_inference_steps=2, output_type="pt")),
        "edit": (
            ContrastiveEditPipeline,
            lambda p: p(image, "a red circle", "a blue circle", generator=seed(), **edit),
        ),
        "compose": (
            ComposePipeline,
            lambda p: p(PROMPT, height=64, width=64, num_inference_steps=2, generator=seed(), output_type="pt"),
        ),
    }


@pytest.mark.parametrize("method", ["stylize", "edit", "compose"])
def test_compiled_unet_gives_the_eager_result(method):
    from editkit.testing import tiny_sd15_pipeline

    pipeline_class, run = _runs()[method]
    pipe = pipeline_class.from_pipe(tiny_sd15_pipeline(seed=0, words=PROMPT.split()))
    eager = run(pipe).images
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert model_family(pipe) == "sd"
    assert [s.name for s in attention_sites(pipe.unet)] == [s.name for s in attention_sites(pipe.unet._orig_mod)]
    with torch._dynamo.config.patch(disable=True):
        compiled = run(pipe).images
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
