"""Kernel options on editkit pipelines: diffusers' xformers/slicing methods reach editkit's layer."""

from __future__ import annotations

import logging

import pytest
import torch

import editkit.attention.kernels as kernels
from editkit.attention import AttentionKernel, AttentionKernelMixin
from editkit.attention.pipeline_mixin import SLICED_CHUNK_SIZE

PROMPT = "a red car on the left of a blue bird"


@pytest.fixture
def compose_pipe():
    from editkit.testing import tiny_sd15_components
    from pipelines.compose import ComposePipeline

    parts = tiny_sd15_components(seed=0, words=["red", "car", "blue", "bird", "left", "of"])
    pipe = ComposePipeline(**{k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    options = {"height": 64, "width": 64, "num_inference_steps": 3, "max_iter_to_alter": 2, "output_type": "pt"}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), refine=False, **options).images


@pytest.fixture
def explicit_chunks(monkeypatch):
    """Chunk sizes the explicit-probability path was called with."""
    seen: list[int] = []
    original = kernels.explicit_attention

    def spy(query, key, value, attn_mask, scale, chunk_size, on_probs):
        seen.append(chunk_size)
        return original(query, key, value, attn_mask, scale, chunk_size, on_probs)

    monkeypatch.setattr(kernels, "explicit_attention", spy)
    return seen


def test_every_pipeline_has_the_kernel_methods():
    from pipelines.compose import ComposePipeline
    from pipelines.contrastive_edit import ContrastiveEditPipeline
    from pipelines.style_transfer import StyleTransferPipeline

    for cls in (ComposePipeline, ContrastiveEditPipeline, StyleTransferPipeline):
        assert issubclass(cls, AttentionKernelMixin)
        # diffusers' enable_/disable_ methods call these; ours must win the MRO
        for name in ("set_use_memory_efficient_attention_xformers", "set_attention_slice"):
            assert getattr(cls, name) is getattr(AttentionKernelMixin, name)


def test_xformers_toggle_uses_editkit_kernel_and_falls_back_on_cpu(compose_pipe, caplog):
    stock = {k: type(v) for k, v in compose_pipe.unet.attn_processors.items()}
    expected = _generate(compose_pipe)
    compose_pipe.enable_xformers_memory_efficient_attention()
    assert compose_pipe.attention_kernel.backend == "xformers"
    # diffusers would have swapped the UNet's processors; editkit leaves them to attach
    assert {k: type(v) for k, v in compose_pipe.unet.attn_processors.items()} == stock
    with caplog.at_level(logging.WARNING, logger="editkit.attention.kernels"):
        out = _generate(compose_pipe)
    assert "using torch SDPA instead" in caplog.text
    assert torch.equal(out, expected)
    compose_pipe.disable_xformers_memory_efficient_attention()
    assert compose_pipe.attention_kernel.backend == "sdpa"


def test_chunk_size_reaches_the_explicit_path_and_keeps_the_result(compose_pipe, explicit_chunks):
    expected = _generate(compose_pipe)
    assert explicit_chunks and set(explicit_chunks) == {AttentionKernel.chunk_size}
    explicit_chunks.clear()
    compose_pipe.set_attention_chunk_size(5)
    out = _generate(compose_pipe)
    assert set(explicit_chunks) == {5}
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    explicit_chunks.clear()
    compose_pipe.enable_attention_slicing()
    assert compose_pipe.attention_kernel.chunk_size == SLICED_CHUNK_SIZE
    compose_pipe.disable_attention_slicing()
    _generate(compose_pipe)
    assert set(explicit_chunks) == {AttentionKernel.chunk_size}


def test_bad_kernel_options_are_refused(compose_pipe):
    with pytest.raises(ValueError, match="chunk_size"):
        compose_pipe.set_attention_chunk_size(0)
    assert compose_pipe.attention_kernel.chunk_size == AttentionKernel.chunk_size  # unchanged
