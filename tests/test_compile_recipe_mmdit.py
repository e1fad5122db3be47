"""diffusers' compile recipe on MM-DiT, ``pipe.transformer = torch.compile(pipe.transformer)``, with every
editkit MM-DiT pipeline (stylize, edit with its contrastive term, compose) on tiny SD3 and FLUX.1 models.

As in ``test_compile_recipe`` for UNets: what can break editkit is the wrapper (``OptimizedModule``: its
type, its ``_orig_mod.`` name prefixes, where sites and the family are read from), so dynamo is switched
off and the wrapper's forward calls the module directly; the compiled run must give the eager result.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.attention import attention_sites
from editkit.models import model_family

PROMPT = "a red car on the left of a blue bird"
WORDS = tuple(PROMPT.split())


def _runs():
    from pipelines.flow_compose import FluxComposePipeline, SD3ComposePipeline
    from pipelines.flow_edit import FluxContrastiveEditPipeline, SD3ContrastiveEditPipeline
    from pipelines.flow_style_transfer import FluxStyleTransferPipeline, SD3StyleTransferPipeline

    rng = np.random.default_rng(0)
    content, style = (Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2))
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    common = {"output_type": "pt", "max_sequence_length": 8}
    return {
        "stylize": (
            {"sd3": SD3StyleTransferPipeline, "flux": FluxStyleTransferPipeline},
            lambda p: p(content, style, num_inference_steps=3, **common),
        ),
        "edit": (
            {"sd3": SD3ContrastiveEditPipeline, "flux": FluxContrastiveEditPipeline},
            lambda p: p(content, "a red car", "a blue car", num_inference_steps=3, n_max=2, generator=seed(), **common),
        ),
        "compose": (
            {"sd3": SD3ComposePipeline, "flux": FluxComposePipeline},
            lambda p: p(PROMPT, height=32, width=32, num_inference_steps=4, generator=seed(), **common),
        ),
    }


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("method", ["stylize", "edit", "compose"])
def test_compiled_transformer_gives_the_eager_result(method, family):
    from editkit.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    classes, run = _runs()[method]
    stock = tiny_sd3_pipeline(seed=0, words=WORDS) if family == "sd3" else tiny_flux_pipeline(seed=0, words=WORDS)
    pipe = classes[family](**stock.components)
    pipe.set_progress_bar_config(disable=True)
    eager = run(pipe).images
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    assert model_family(pipe) == family
    names = [site.name for site in attention_sites(pipe.transformer)]
    assert names and names == [site.name for site in attention_sites(pipe.transformer._orig_mod)]
    with torch._dynamo.config.patch(disable=True):
        compiled = run(pipe).images
    assert eager.abs().sum() > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
