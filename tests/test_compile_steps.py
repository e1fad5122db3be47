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


# -- whole method runs (issue 21: at most 2 graphs and no graph break) ------------------------------
PROMPT = "a red circle on the left of a blue square"


def _one_level_pipeline(pipeline_class):
    """A tiny pipeline whose UNet has one level (dynamo traces it in seconds), the real processors."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from editkit.testing import tiny_sd15_components

    parts = tiny_sd15_components(seed=0, words=PROMPT.split())
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    ).eval()  # fmt: skip
    if pipeline_class is StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    else:
        pipe = pipeline_class(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _method(name: str):
    """(pipeline class, run) of a method at the issue's sizes: 12 steps, 3 edit iterations."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    image = Image.new("RGB", (64, 64), (200, 40, 40))

    def seeded() -> dict:  # a fresh generator per run: the eager and the compiled run draw the same
        return {"output_type": "pt", "generator": torch.Generator().manual_seed(0)}

    def soft_tokens(pipe):
        from editkit.softrepa import SoftTokenController, SoftTokens, use_soft_tokens
        from editkit.softrepa.tokens import default_sites

        tokens = SoftTokens(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)), default_sites(pipe.unet))
        with use_soft_tokens(pipe.unet, SoftTokenController(tokens)):
            return pipe(PROMPT, height=64, width=64, num_inference_steps=12, **seeded()).images

    return {
        "stylize": (StyleTransferPipeline, lambda p: p(image, image, num_inference_steps=12, output_type="pt").images),
        "compose_stage1": (
            ComposePipeline,
            lambda p: p(PROMPT, height=64, width=64, num_inference_steps=12, refine=False, **seeded()).images,
        ),
        "edit": (
            ContrastiveEditPipeline,
            lambda p: p(image, "a red circle", "a blue circle", num_inference_steps=3, **seeded()).images,
        ),
        "soft_tokens": (StableDiffusionPipeline, soft_tokens),
    }[name]


@pytest.mark.parametrize("name", ["stylize", "compose_stage1", "edit", "soft_tokens"])
def test_a_compiled_method_run_compiles_at_most_two_graphs(name):
    """Before: stylize 36 graphs (then 3), compose stage 1 48, edit 4, soft tokens 15 with 5 graph breaks."""
    from torch._dynamo.utils import counters

    pipeline_class, run = _method(name)
    pipe = _one_level_pipeline(pipeline_class)
    eager = run(pipe)
    torch._dynamo.reset()
    counters.clear()
    graphs = []
    pipe.unet.compile(backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    with torch._dynamo.config.patch(recompile_limit=64):  # count every recompile instead of falling back
        compiled = run(pipe)
    torch._dynamo.reset()
    assert 1 <= len(graphs) <= 2 and not counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def _compose_run(pipe):
    return pipe(
        PROMPT, height=64, width=64, num_inference_steps=4, max_iter_to_alter=3, refine=False,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip


def test_the_guided_step_traces_whole_as_one_graph_for_every_step():
    """Item 4: forward with grad to the map layers, loss and autograd.grad in one graph (fullgraph: no break)."""
    from pipelines.compose import ComposePipeline

    pipe = _one_level_pipeline(ComposePipeline)
    eager = _compose_run(pipe)
    torch._dynamo.reset()
    graphs = []
    pipe.guided_step = torch.compile(
        pipe.guided_step, fullgraph=True, backend=lambda gm, inputs: graphs.append(gm) or gm.forward
    )
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = _compose_run(pipe)
    torch._dynamo.reset()
    assert len(graphs) == 1  # three guided steps, one graph: no constant of a step is baked in
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_guided_step_is_captured_in_a_cuda_graph():
    """One capture of ``guided_step`` replays every guided step of a run and gives the eager results."""
    from editkit.acceleration import frozen_weights
    from pipelines.compose import ComposePipeline

    pipe = _one_level_pipeline(ComposePipeline).to("cuda")
    step, calls = pipe.guided_step, []

    def recording(latents, t, step_size, run):
        result = step(latents, t, step_size, run)
        calls.append(((latents.clone(), t.clone(), step_size.clone()), [r.clone() for r in result], run))
        return result

    pipe.guided_step = recording
    _compose_run(pipe)
    del pipe.guided_step
    run = calls[0][2]
    static = [tensor.clone() for tensor in calls[0][0]]  # latents, timestep, step size: the graph's inputs
    with pipe.attach_controllers(run.controller), frozen_weights(pipe.unet):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (and the eager early exit learns its last map layer)
                step(*static, run)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step(*static, run)
        for inputs, expected, _ in calls:
            for buffer, value in zip(static, inputs, strict=True):
                buffer.copy_(value)
            graph.replay()
            for got, want in zip(outputs, expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(calls) == 3
