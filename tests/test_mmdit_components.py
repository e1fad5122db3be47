"""The tiny SD3 / SD3.5 / FLUX pipelines and the full-width transformer builders of editkit.testing."""

from __future__ import annotations

import pytest
import torch

from editkit.testing import (
    FLUX1_DEV_TRANSFORMER,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    full_width_transformer,
    tiny_t5_tokenizer,
)

FAMILIES = ("sd3_pipe", "sd35_pipe", "flux_pipe")


def _generate(pipe, prompt: str = "a red square") -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, height=32, width=32, num_inference_steps=2, generator=generator, output_type="pt").images


def test_t5_tokenizer_in_code_vocabulary():
    tokenizer = tiny_t5_tokenizer(words=("square",))
    ids = tokenizer("a red square, 3 pixels!").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "▁square" in tokens  # a listed word is one piece
    assert tokenizer.unk_token_id not in ids  # every ASCII character has a piece
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0


@pytest.mark.parametrize("fixture", FAMILIES)
def test_tiny_pipeline_round_trips(fixture, request, tmp_path):
    pipe = request.getfixturevalue(fixture)
    image = _generate(pipe)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert not torch.equal(image, _generate(pipe, "a blue circle"))  # the text reaches the transformer
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(image, _generate(loaded))


def test_tiny_topologies(sd3_pipe, sd35_pipe, flux_pipe):
    assert not any(".attn2" in name for name in sd3_pipe.transformer.attn_processors)
    assert "transformer_blocks.0.attn2.processor" in sd35_pipe.transformer.attn_processors
    assert sd35_pipe.transformer.transformer_blocks[0].attn.norm_q is not None  # qk_norm
    names = set(flux_pipe.transformer.attn_processors)
    assert {"transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"} <= names
    assert flux_pipe.transformer.config.guidance_embeds
    assert flux_pipe.vae.config.latent_channels * 4 == flux_pipe.transformer.config.in_channels  # 2x2 packing


@pytest.mark.parametrize(
    ("config", "published"),
    # parameter counts announced with the releases: SD3.5 Large "8.1 billion", FLUX.1 "12 billion"
    [(SD35_LARGE_TRANSFORMER, 8.1e9), (FLUX1_DEV_TRANSFORMER, 11.9e9)],
)
def test_full_depth_configs_match_published_sizes(config, published):
    model = full_width_transformer(config, num_blocks=None, device="meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("config", [SD35_MEDIUM_TRANSFORMER, FLUX1_DEV_TRANSFORMER])
def test_full_width_reduced_depth(config):
    model = full_width_transformer(config, num_blocks=2, device="meta", dtype=torch.bfloat16)
    assert len(model.transformer_blocks) == 2
    assert model.transformer_blocks[0].attn.to_q.weight.shape[0] == (
        config["num_attention_heads"] * config["attention_head_dim"]
    )
    assert model.dtype == torch.bfloat16 and model.device.type == "meta"
    if "num_single_layers" in config:
        assert len(model.single_transformer_blocks) == 2
    else:
        assert all(block.attn2 is not None for block in model.transformer_blocks)  # attn2 in blocks 0-12
