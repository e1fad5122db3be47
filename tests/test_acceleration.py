"""Fast paths with the attention layer attached: torch.compile, channels_last, VAE tiling, memory savers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from editkit.acceleration import compile_unet, enable_memory_savers, graph_breaks, to_channels_last
from editkit.attention import AttentionController, CrossAttentionMapStore, attach
from editkit.errors import EditkitError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(unet, batch: int = 2, side: int = 16):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, side, side, generator=generator)
    context = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=generator)
    return sample, context


def _run(unet, controller, sample, context, timestep: int = 500):
    with torch.no_grad(), attach(unet, controller):
        controller.batch_roles = ("uncond", "cond")
        controller.begin_step(0, timestep)
        return unet(sample, torch.tensor(timestep), encoder_hidden_states=context).sample  # as diffusers passes t


class GraphCounter:
    """A dynamo backend that runs graphs eagerly and counts how many were compiled."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.fixture(scope="module")
def compiled():
    """The tiny SD 1.5-topology UNet, an eager copy, and the same weights compiled (fullgraph) once."""
    from editkit.testing import tiny_sd15_components

    torch._dynamo.reset()
    eager = tiny_sd15_components(seed=3)["unet"]
    unet = tiny_sd15_components(seed=3)["unet"]
    counter = GraphCounter()
    compile_unet(unet, backend=counter, fullgraph=True)  # fullgraph: any graph break raises
    yield eager, unet, counter
    torch._dynamo.reset()


def test_compiled_unet_with_controllers_matches_eager_in_one_graph_each(compiled):
    eager, unet, counter = compiled
    sample, context = _inputs(eager)
    expected = _run(eager, AttentionController(), sample, context)
    assert torch.allclose(_run(unet, AttentionController(), sample, context), expected, atol=1e-5)
    assert counter.graphs == 1
    # a new attach (new processor objects) at another timestep reuses the graph
    expected = _run(eager, AttentionController(), sample, context, 300)
    assert torch.allclose(_run(unet, AttentionController(), sample, context, 300), expected, atol=1e-5)
    assert counter.graphs == 1

    eager_store = CrossAttentionMapStore(grids=[(4, 4)], role="cond")
    compiled_store = CrossAttentionMapStore(grids=[(4, 4)], role="cond")
    expected = _run(eager, eager_store, sample, context)
    assert torch.allclose(_run(unet, compiled_store, sample, context), expected, atol=1e-5)
    assert counter.graphs == 2  # one more graph for the store, no break
    assert eager_store.maps.keys() == compiled_store.maps.keys() and eager_store.maps
    for site, maps in eager_store.maps.items():
        assert maps.shape == (1, 4, 4, 77)
        assert torch.allclose(compiled_store.maps[site], maps, atol=1e-6)


@pytest.fixture(scope="module")
def small_unet():
    """A one-level cross-attention UNet: dynamo traces it in a second or two."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
        cross_attention_dim=8, down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    ).eval()  # fmt: skip


class BreakingController(AttentionController):
    """Forces a graph break at every site it runs on (proves the check can fail)."""

    def on_output(self, site, hidden_states):
        torch._dynamo.graph_break()
        return hidden_states


@pytest.mark.parametrize(
    ("make", "breaks"),
    [
        (AttentionController, False),
        (lambda: CrossAttentionMapStore(grids=[(8, 8)], role="cond"), False),
        (BreakingController, True),
    ],
)
def test_graph_breaks_of_controllers(small_unet, make, breaks):
    sample, context = _inputs(small_unet, side=8)
    controller = make()
    sites = len(small_unet.attn_processors)

    def forward(sample, context):
        return small_unet(sample, 500, encoder_hidden_states=context).sample

    torch._dynamo.reset()
    with torch.no_grad(), attach(small_unet, controller):
        controller.batch_roles = ("uncond", "cond")
        controller.begin_step(0, 500)
        report = graph_breaks(forward, sample, context)
    if breaks:
        assert report.graph_break_count >= sites  # at least one break per site
        assert report.reasons
    else:
        assert report.graph_break_count == 0 and report.graph_count == 1, report.reasons


def test_channels_last_matches_contiguous_with_controller_attached():
    from editkit.testing import tiny_sd15_components

    contiguous = tiny_sd15_components(seed=4)["unet"]
    nhwc = to_channels_last(tiny_sd15_components(seed=4)["unet"])
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not contiguous.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sample, context = _inputs(contiguous)
    store = CrossAttentionMapStore(grids=[(8, 8)], role="cond")
    expected = _run(contiguous, AttentionController(), sample, context)
    out = _run(nhwc, store, sample.to(memory_format=torch.channels_last), context)
    assert torch.allclose(out, expected, atol=1e-5)
    assert store.maps  # the processor ran on the NHWC model


def _style_pipeline():
    from editkit.testing import tiny_sd15_components
    from pipelines.style_transfer import StyleTransferPipeline

    parts = tiny_sd15_components(seed=5)
    pipe = StyleTransferPipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_vae_tiling_runs_stylize_above_tile_size(monkeypatch):
    pipe = _style_pipeline()
    enable_memory_savers(pipe, vae_tiling=True, vae_slicing=True)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    side = 2 * pipe.vae.tile_sample_min_size  # above the tile size: the VAE must tile
    calls = {"_tiled_encode": 0, "tiled_decode": 0}  # diffusers 0.42's tiled paths
    for name in calls:
        original = getattr(pipe.vae, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipe.vae, name, counted)
    rng = np.random.default_rng(0)
    content, style = (Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(2))
    out = pipe(content, style, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, side, side)
    assert torch.isfinite(out.images).all()
    assert calls["_tiled_encode"] >= 2 and calls["tiled_decode"] >= 1  # content + style encoded, result decoded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cpu_offload_without_gpu_is_a_clear_error():
    pipe = _style_pipeline()
    with pytest.raises(EditkitError, match="needs a GPU"):
        enable_memory_savers(pipe, cpu_offload=True)


def test_memory_savers_refuse_a_pipeline_without_vae():
    class NoVae:
        model_cpu_offload_seq = "unet"

    with pytest.raises(EditkitError, match="no VAE"):
        enable_memory_savers(NoVae(), vae_tiling=True)


@pytest.mark.cuda
@cuda
def test_cpu_offload_stylize_on_cuda():
    pipe = _style_pipeline().to(torch.float16)
    enable_memory_savers(pipe, cpu_offload=True)
    rng = np.random.default_rng(0)
    content, style = (Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2))
    out = pipe(content, style, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 64, 64)
    assert pipe.unet.device.type == "cpu"  # moved back after the run


@pytest.mark.cuda
@cuda
def test_inductor_compile_on_cuda_matches_eager():
    from editkit.testing import tiny_sd15_components

    eager = tiny_sd15_components(seed=6)["unet"].cuda().half()
    unet = compile_unet(tiny_sd15_components(seed=6)["unet"].cuda().half())
    sample, context = (t.cuda().half() for t in _inputs(eager))
    expected = _run(eager, AttentionController(), sample, context)
    assert torch.allclose(_run(unet, AttentionController(), sample, context), expected, atol=2e-2)
