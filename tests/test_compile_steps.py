"""Per-step controller state never makes a compiled UNet recompile (issue: one graph per timestep).

Each controller runs over several timesteps on a compiled one-level UNet (dynamo's "eager"
backend: tracing only, fast on the CPU). Before, the recorders and the style injection read the
Python timestep inside the hooks, so dynamo specialised on it and compiled a graph per step.
"""

from __future__ import annotations

import pytest
import torch

from editkit.attention import AttentionController, QKVRecorder, attach
from editkit.style import FeatureRecorder, StyleCache, StyleInjectionController

TIMESTEPS = (901, 701, 501, 301, 101)


@pytest.fixture
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    ).eval()  # fmt: skip


def _self_sites(unet) -> list[str]:
    return [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn1.processor")]


def _steps(unet, controller, sample, context) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad(), attach(unet, controller):
        for index, t in enumerate(TIMESTEPS):
            controller.begin_step(index, t)
            outputs.append(unet(sample, torch.tensor(t), encoder_hidden_states=context).sample)
    return outputs


def _style_cache(unet, sample, context) -> tuple[StyleCache, StyleCache]:
    """Style keys/values and content queries recorded eagerly at every timestep."""
    sites = _self_sites(unet)
    header = {"model": "m", "size": (64, 64), "num_inference_steps": len(TIMESTEPS), "resample_steps": 0,
              "sites": tuple(sites), "timesteps": TIMESTEPS, "final_latent": torch.zeros(1, 4, 8, 8)}  # fmt: skip
    caches = []
    for kind, keep in (("style", ("key", "value")), ("content", ("query",))):
        recorder = FeatureRecorder(sites, keep, TIMESTEPS)
        _steps(unet, recorder, sample, context)
        caches.append(StyleCache(kind=kind, features=recorder.records, **header))
    return caches[0], caches[1]


def _controllers(unet, sample, context):
    sites = _self_sites(unet)
    style, content = _style_cache(unet, sample, context)
    return {
        "identity": AttentionController,
        "qkv_recorder": lambda: QKVRecorder(keep=("key", "value")),
        "feature_recorder": lambda: FeatureRecorder(sites, ("key", "value"), TIMESTEPS[:3]),
        "style_injection": lambda: StyleInjectionController(sites, style, content),
    }


@pytest.mark.parametrize("name", ["identity", "qkv_recorder", "feature_recorder", "style_injection"])
def test_graphs_do_not_grow_with_timesteps(unet, name):
    from torch._dynamo.utils import counters

    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8)
    make = _controllers(unet, sample, context)[name]
    eager_controller = make()
    eager = _steps(unet, eager_controller, sample, context)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    unet.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    compiled_controller = make()
    compiled = _steps(unet, compiled_controller, sample, context)
    torch._dynamo.reset()
    # feature_recorder stores 3 of the 5 steps: the choice is made outside the UNet, so one graph (2 before)
    assert len(graphs) == 1 and not counters["graph_break"]
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected)
    if isinstance(eager_controller, QKVRecorder):  # the compiled run recorded the same steps and tensors
        assert compiled_controller.records.keys() == eager_controller.records.keys()
        for key, record in eager_controller.records.items():
            for part, tensor in record.items():
                torch.testing.assert_close(compiled_controller.records[key][part], tensor)
    if isinstance(eager_controller, StyleInjectionController):
        assert compiled_controller.injected == eager_controller.injected
        assert len(eager_controller.injected) == len(TIMESTEPS) * len(_self_sites(unet))


@pytest.mark.parametrize("time_layout", ["shared", "per-token"])
def test_time_dependent_soft_tokens_keep_one_graph(unet, time_layout):
    """``use_soft_tokens``'s pre-hook is traced with the UNet: it passes the timestep as a tensor."""
    from torch._dynamo.utils import counters

    from editkit.softrepa import SoftTokenController, SoftTokens, use_soft_tokens
    from editkit.softrepa.tokens import TIME_LAYOUTS

    layout = next(name for name in TIME_LAYOUTS if name.replace("_", "-") == time_layout)
    cross = [k.removesuffix(".processor") for k in unet.attn_processors if k.endswith("attn2.processor")]
    soft = SoftTokens(torch.randn(2, 8), cross, time_buckets=100, time_layout=layout)
    with torch.no_grad():
        soft.time_embedding.normal_(generator=torch.Generator().manual_seed(0))  # every bucket different
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8)

    def run():
        with torch.no_grad(), use_soft_tokens(unet, SoftTokenController(soft)):
            return [unet(sample, torch.tensor(t), encoder_hidden_states=context).sample for t in TIMESTEPS]

    eager = run()
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    unet.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    compiled = run()
    torch._dynamo.reset()
    # the hook's bucket arithmetic and the UNet trace as two graphs; 5 timesteps recompiled 6 before
    assert len(graphs) <= 2 and not counters["graph_break"]
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(eager[0], eager[1])  # the buckets differ, and so do the outputs
