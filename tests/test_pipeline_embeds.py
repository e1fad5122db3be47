"""Precomputed inputs as diffusers pipelines take them (issue 19, points 4 and 7).

``edit`` takes ``*_prompt_embeds`` per text role in place of its prompts; ``stylize`` takes
``ip_adapter_image`` / ``ip_adapter_image_embeds`` (one per loaded IP-Adapter, diffusers'
``IPAdapterMixin`` convention) in place of the content/style images as image prompts.
"""

from __future__ import annotations

import pytest
import torch

from editkit.errors import InputError
from editkit.testing import tiny_sd15_components, tiny_sdxl_pipeline

SIZE = 32


def _rand_images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _edit_pipe(base=None):
    from pipelines.contrastive_edit import ContrastiveEditPipeline

    if base is None:
        parts = tiny_sd15_components(words=("cat", "dog"))
        base = {k: parts[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
        pipe = ContrastiveEditPipeline(**base)
    else:
        pipe = ContrastiveEditPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit(pipe, **kwargs):
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(_rand_images(1), num_inference_steps=2, contrast=None, output_type="pt", **kwargs).images


@pytest.fixture(scope="module")
def edit_pipe():
    return _edit_pipe()


def test_edit_prompt_embeds_replace_the_prompts(edit_pipe):
    from_text = _edit(edit_pipe, source_prompt="a cat", target_prompt="a dog", negative_prompt="")
    source, negative = edit_pipe.encode_prompt("a cat", None, 1, True, "")[:2]
    target = edit_pipe.encode_prompt("a dog", None, 1, False)[0]
    from_embeds = _edit(edit_pipe, source_prompt_embeds=source, target_prompt_embeds=target,
                        negative_prompt_embeds=negative)  # fmt: skip
    assert torch.equal(from_text, from_embeds)
    mixed = _edit(edit_pipe, source_prompt="a cat", target_prompt_embeds=target)  # negative "" by default
    assert torch.equal(from_text, mixed)
    other = _edit(edit_pipe, source_prompt_embeds=source, target_prompt_embeds=source + 1.0)
    assert (other - from_text).abs().max() > 1e-4  # the embeddings are really used


def test_edit_prompt_embeds_rows_batch_like_prompts(edit_pipe):
    target = edit_pipe.encode_prompt(["a dog", "dog"], None, 1, False)[0]
    pair = _edit(edit_pipe, source_prompt="a cat", target_prompt_embeds=target)
    texts = _edit(edit_pipe, source_prompt="a cat", target_prompt=["a dog", "dog"])
    assert pair.shape[0] == 2 and torch.equal(pair, texts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_prompt": "a dog"}, "give source_prompt or source_prompt_embeds"),
        ({"source_prompt": "a cat", "source_prompt_embeds": torch.zeros(1, 77, 32), "target_prompt": "a dog"},
         "not both"),
        ({"source_prompt": "a cat", "target_prompt_embeds": torch.zeros(77, 32)}, r"\(batch, tokens, dim\)"),
        ({"source_prompt": "a cat", "target_prompt": "a dog", "negative_prompt": "",
          "negative_prompt_embeds": torch.zeros(1, 77, 32)}, "give negative_prompt or negative_prompt_embeds, not"),
        ({"source_prompt": "a cat", "target_prompt_embeds": torch.zeros(3, 77, 32), "negative_prompt": ["", ""]},
         "target: 3"),
    ],
)  # fmt: skip
def test_edit_prompt_embeds_bad_combinations_are_refused(edit_pipe, kwargs, message):
    with pytest.raises(InputError, match=message):
        _edit(edit_pipe, **kwargs)


def test_sdxl_edit_prompt_embeds_need_their_pooled_embeds():
    pipe = _edit_pipe(tiny_sdxl_pipeline(seed=0))
    embeds, _, pooled, _ = pipe.encode_prompt("a dog", None, 1, False)
    with pytest.raises(InputError, match="pooled_prompt_embeds"):
        _edit(pipe, source_prompt="a cat", target_prompt_embeds=embeds)
    from_embeds = _edit(pipe, source_prompt="a cat", target_prompt_embeds=embeds, target_pooled_prompt_embeds=pooled)
    assert torch.equal(from_embeds, _edit(pipe, source_prompt="a cat", target_prompt="a dog"))


# -- stylize: ip_adapter_image / ip_adapter_image_embeds ------------------------------------------
def _stylize(pipe, **kwargs):
    content, style = _rand_images(1, seed=3), _rand_images(1, seed=4)
    return pipe(content, style, num_inference_steps=2, output_type="pt", **kwargs).images


def _adapter_pipe():
    from test_style import _with_tiny_ip_adapters

    return _with_tiny_ip_adapters()


def test_ip_adapter_image_embeds_equal_the_images_they_come_from():
    from editkit.image import tensor_to_pil

    pipe = _adapter_pipe()
    default = _stylize(pipe)  # AttenST: content image to the first adapter, style image to the second
    content, style = (tensor_to_pil(_rand_images(1, seed=s) * 2 - 1) for s in (3, 4))
    assert torch.equal(_stylize(pipe, ip_adapter_image=[content, style]), default)
    extracted = [pipe.feature_extractor(image, return_tensors="pt").pixel_values for image in (content, style)]
    embeds = [pipe.image_encoder(pixels).image_embeds[:, None] for pixels in extracted]  # (1, 1, dim) each
    assert torch.equal(_stylize(pipe, ip_adapter_image_embeds=embeds), default)
    swapped = _stylize(pipe, ip_adapter_image_embeds=embeds[::-1])
    assert (swapped - default).abs().max() > 1e-4  # the given embeddings are what the adapters see
    guided = _stylize(pipe, guidance_scale=3.0, prompt="a cat")
    with_negative = [torch.cat([torch.zeros_like(e), e]) for e in embeds]  # CFG: negative rows first
    assert torch.equal(
        _stylize(pipe, guidance_scale=3.0, prompt="a cat", ip_adapter_image_embeds=with_negative), guided
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}, r"one entry per loaded IP-Adapter \(2"),
        ({"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)] * 2, "guidance_scale": 3.0},
         r"must be \(2, num_images, dim\) \(negative first"),
        ({"ip_adapter_image_embeds": [torch.zeros(1, 8)] * 2}, r"must be \(1, num_images, dim\), got \(1, 8\)"),
        ({"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)] * 2, "ip_adapter_image": [None, None]}, "not both"),
    ],
)  # fmt: skip
def test_ip_adapter_inputs_bad_combinations_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        _stylize(_adapter_pipe(), **kwargs)


def test_ip_adapter_image_without_an_adapter_says_how_to_load_one():
    from pipelines.style_transfer import StyleTransferPipeline

    parts = tiny_sd15_components()
    pipe = StyleTransferPipeline(**{k: v for k, v in parts.items() if k != "safety_checker"})
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(InputError, match="load_ip_adapter"):
        _stylize(pipe, ip_adapter_image_embeds=[torch.zeros(1, 1, 8)])
