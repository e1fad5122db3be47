"""One switch to compile: ``pipe.compile_unet()`` on the pipelines and ``--compile [MODE]`` on the commands."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image

from editkit.commands.common import add_attention_option, compile_mode, load_method_pipeline


def test_pipeline_compile_unet_compiles_in_place_and_keeps_the_result():
    from diffusers import UNet2DConditionModel

    from editkit.testing import tiny_sd15_components
    from pipelines.style_transfer import StyleTransferPipeline

    parts = tiny_sd15_components(seed=0)
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(  # one level: dynamo traces it in seconds
        sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    ).eval()  # fmt: skip
    pipe = StyleTransferPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    content, style = Image.new("RGB", (64, 64), (200, 40, 40)), Image.new("RGB", (64, 64), (40, 40, 200))
    eager = pipe(content, style, num_inference_steps=3, output_type="pt").images
    unet = pipe.unet
    graphs = []
    torch._dynamo.reset()
    assert pipe.compile_unet(backend=lambda gm, inputs: graphs.append(gm) or gm.forward) is pipe
    compiled = pipe(content, style, num_inference_steps=3, output_type="pt").images
    torch._dynamo.reset()
    assert pipe.unet is unet and graphs  # compiled in place, and the run went through dynamo
    assert len(graphs) <= 2  # one for both inversions, one for generation: not one per step (nor per phase)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("argv", "mode"), [([], "off"), (["--compile"], None), (["--compile", "reduce-overhead"], "reduce-overhead")]
)
def test_compile_flag_reaches_compile_unet(monkeypatch, argv, mode):
    parser = argparse.ArgumentParser()
    add_attention_option(parser)
    args = parser.parse_args(argv)
    args.model, args.device, args.dtype, args.soft_tokens = "m", "cpu", None, None
    unet = torch.nn.Linear(1, 1)
    pipe = type("Pipe", (), {"unet": unet})()
    calls = []
    monkeypatch.setattr("editkit.models.load_pipeline", lambda *a, **k: pipe)
    monkeypatch.setattr("editkit.acceleration.compile_unet", lambda module, mode: calls.append((module, mode)))
    assert load_method_pipeline("stylize", args) == (pipe, [])
    assert calls == ([] if mode == "off" else [(unet, mode)])


def test_compile_flag_refuses_unknown_modes(capsys):
    parser = argparse.ArgumentParser()
    add_attention_option(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--compile", "fastest"])
    assert "invalid choice" in capsys.readouterr().err and compile_mode("default") is None
