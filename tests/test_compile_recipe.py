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


def test_cuda_check_parses_and_its_compiled_part_dry_runs_on_the_cpu(tmp_path):
    """``benchmarks/cuda_check.sh`` is valid bash, names known methods, and its Python part runs (tiny, dynamo off)."""
    import json
    import re
    import subprocess
    from pathlib import Path

    from benchmarks.compiled_speed import main
    from benchmarks.opcount import methods

    script = Path(__file__).parents[1] / "benchmarks" / "cuda_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    (default,) = re.findall(r"COMPILED_METHODS:-([^}]*)\}", script.read_text())
    out = tmp_path / "compiled.json"
    result = main(["--dry-run", "--methods", "pass_through", "compose_stage1", "--output", str(out)])
    assert torch.is_grad_enabled()  # the benchmark leaves the process's grad mode alone
    assert json.loads(out.read_text())["methods"].keys() == result["methods"].keys()
    assert set(result["methods"]) == {"stock_forward", "plain_generation", "pass_through", "compose_stage1"}
    for name in ("pass_through", "compose_stage1"):
        entry = result["methods"][name]
        stock = result["methods"][entry["baseline"]]
        assert entry["compiled_vs_stock_compiled"] == pytest.approx(
            entry["compiled"]["median_s"] / stock["compiled"]["median_s"]
        )
        assert entry["compiled"]["first_call_s"] > 0 and entry["eager"]["median_s"] > 0
    assert default.split() and set(default.split()) <= set(methods(64, 2, 1))  # the script names known methods
